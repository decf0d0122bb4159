"""A blocking facade over the async SDK, for scripts and code without an event loop.

    from kvrt.sdk.sync import Client
    with Client("http://127.0.0.1:8400") as client:
        run = client.start_run(client.create_graph(g))
        print(run.agent("planner").chat([{"role": "user", "content": "hi"}]).content)

Each sync `Client` runs one async `kvrt.sdk.Client` on a private event loop thread and waits for
its results; the methods, arguments, return values and errors are the async ones. Do not call it
from inside a running event loop's thread with the expectation of concurrency: use the async
client there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import Any, TypeVar

from kvrt.sdk import client as aio
from kvrt.sdk.chat import ChatReply, ChatStream, ChatUsage, Message
from kvrt.sdk.graph import Graph
from kvrt.sdk.protocol.control import (
    Deleted,
    EventAck,
    GraphInfo,
    GraphSpec,
    RunClosed,
    RunInfo,
    RunState,
)
from kvrt.sdk.protocol.openai_api import Health
from kvrt.sdk.protocol.rounds import RoundResult
from kvrt.sdk.run import AgentClient as AsyncAgentClient
from kvrt.sdk.run import EventType
from kvrt.sdk.run import Run as AsyncRun

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvrt-sdk", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Client:
    """The blocking twin of kvrt.sdk.Client (same arguments)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8400", **options: Any) -> None:
        self._loop = _Loop()
        self._client = aio.Client(base_url, **options)

    @property
    def base_url(self) -> str:
        return self._client.base_url

    @property
    def headers(self) -> dict[str, str]:
        return self._client.headers

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_running():
            self._loop.run(self._client.close())
            self._loop.stop()

    def health(self) -> Health:
        return self._loop.run(self._client.health())

    def create_graph(self, graph: Graph | GraphSpec) -> GraphInfo:
        return self._loop.run(self._client.create_graph(graph))

    def get_graph(self, graph_id: str) -> GraphInfo:
        return self._loop.run(self._client.get_graph(graph_id))

    def list_graphs(self) -> list[GraphInfo]:
        return self._loop.run(self._client.list_graphs())

    def delete_graph(self, graph: GraphInfo | str) -> Deleted:
        return self._loop.run(self._client.delete_graph(graph))

    def start_run(self, graph: GraphInfo | str, key: str | None = None) -> Run:
        return Run(self._loop, self._loop.run(self._client.start_run(graph, key)))

    def get_run(self, run_id: str) -> Run:
        return Run(self._loop, self._loop.run(self._client.get_run(run_id)))

    def list_runs(self, graph_id: str | None = None, key: str | None = None) -> list[RunInfo]:
        return self._loop.run(self._client.list_runs(graph_id, key))

    def chat(self, messages: Sequence[Message], **options: Any) -> ChatReply:
        return self._loop.run(self._client.chat(messages, **options))

    def stream(self, messages: Sequence[Message], **options: Any) -> SyncChatStream:
        return SyncChatStream(self._loop, self._client.stream(messages, **options))


class Run:
    def __init__(self, loop: _Loop, run: AsyncRun) -> None:
        self._loop = loop
        self._run = run
        self.id, self.graph_id, self.graph = run.id, run.graph_id, run.graph

    def agent(self, name: str) -> AgentClient:
        return AgentClient(self._loop, self._run.agent(name))

    def state(self) -> RunState:
        return self._loop.run(self._run.state())

    def round(self, shared: Sequence[Message], agents: Mapping[str, Any],
              **options: Any) -> RoundResult:
        """The async Run.round: each agent's reply is at most ROUND_MAX_TOKENS (256) tokens
        unless `max_tokens` says otherwise."""
        return self._loop.run(self._run.round(shared, agents, **options))

    def close(self) -> RunClosed | None:
        return self._loop.run(self._run.close())

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._loop.run(self._run.__aexit__(*exc_info))


class AgentClient:
    def __init__(self, loop: _Loop, agent: AsyncAgentClient) -> None:
        self._loop = loop
        self._agent = agent
        self.name, self.system = agent.name, agent.system

    def chat(self, messages: Sequence[Message], **options: Any) -> ChatReply:
        return self._loop.run(self._agent.chat(messages, **options))

    def stream(self, messages: Sequence[Message], **options: Any) -> SyncChatStream:
        return SyncChatStream(self._loop, self._agent.stream(messages, **options))

    def tool_call(self, tool: str, expected_duration_s: float | None = None
                  ) -> AbstractContextManager[EventAck]:
        """As the async tool_call: the finish is reported also when the block raises."""
        return self._blocking(self._agent.tool_call(tool, expected_duration_s))

    def wait(self, reason: str = "interrupt", expected_s: float | None = None
             ) -> AbstractContextManager[EventAck]:
        """As the async wait: agent.resumed is reported also when the block raises."""
        return self._blocking(self._agent.wait(reason, expected_s))

    @contextmanager
    def _blocking(self, manager: AbstractAsyncContextManager[EventAck]) -> Iterator[EventAck]:
        """An async context manager of the agent, entered and exited on the client's loop."""
        ack = self._loop.run(manager.__aenter__())
        try:
            yield ack
        except BaseException as exc:
            if not self._loop.run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._loop.run(manager.__aexit__(None, None, None))

    def done(self) -> EventAck:
        return self._loop.run(self._agent.done())

    def event(self, type: EventType, **fields: Any) -> EventAck:
        return self._loop.run(self._agent.event(type, **fields))


class SyncChatStream:
    """An iterator of text deltas; `text`, `finish_reason`, `usage` as on ChatStream."""

    def __init__(self, loop: _Loop, stream: ChatStream) -> None:
        self._loop = loop
        self._stream = stream

    def __iter__(self) -> SyncChatStream:
        return self

    def __next__(self) -> str:
        try:
            return self._loop.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._loop.run(self._stream.aclose())

    def __enter__(self) -> SyncChatStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    @property
    def usage(self) -> ChatUsage | None:
        return self._stream.usage
