"""kvrt.sdk: the Python client of a kvrt daemon.

    from kvrt.sdk import Client, Graph

`Graph` declares an agent graph; `Client` creates it on the daemon, starts runs of it, and hands
out `Run` and `AgentClient` handles whose chat calls and tool-call reports are attributed to the
run's agents. Everything here needs only aiohttp and msgspec (no torch, nothing from
kvrt.runtime); `kvrt.sdk.sync.Client` is the same client for code without an event loop.
"""

from kvrt.sdk.chat import ChatReply, ChatStream, ChatUsage
from kvrt.sdk.client import Client
from kvrt.sdk.errors import KvrtConnectionError, KvrtError, KvrtTimeoutError
from kvrt.sdk.graph import Graph
from kvrt.sdk.protocol.control import (
    AgentState,
    EventAck,
    GraphInfo,
    GraphSpec,
    RunInfo,
    RunState,
)
from kvrt.sdk.protocol.rounds import RoundResult
from kvrt.sdk.run import AgentClient, Run

__all__ = [
    "AgentClient",
    "AgentState",
    "ChatReply",
    "ChatStream",
    "ChatUsage",
    "Client",
    "EventAck",
    "GraphInfo",
    "GraphSpec",
    "Graph",
    "KvrtConnectionError",
    "KvrtError",
    "KvrtTimeoutError",
    "RoundResult",
    "Run",
    "RunInfo",
    "RunState",
]
