"""All-Gather rounds: `POST /v1/runs/{run_id}/rounds`.

In a round every named agent reads the same shared messages after its own private ones, then
its own `after` messages (or the round's common `instruction`), and generates; the daemon
answers once all have. Sampling fields are those of a chat completion and apply to every
agent; `stream`, `n` and `kvrt` are refused (the run is in the path, the agents are the keys).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from kvrt.sdk.protocol.control import Name
from kvrt.sdk.protocol.openai_api import ChatMessage, SamplingRequest, Usage

MAX_ROUND_AGENTS = 4096  # a graph's limit too


class RoundAgent(Struct, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage] = []  # its private history, before the shared messages
    after: list[ChatMessage] | None = None  # after them; None: the round's `instruction`


class RoundRequest(SamplingRequest, kw_only=True, forbid_unknown_fields=True):
    shared: Annotated[list[ChatMessage], Meta(min_length=1)]
    agents: Annotated[dict[Name, RoundAgent], Meta(min_length=1, max_length=MAX_ROUND_AGENTS)]
    instruction: list[ChatMessage] | None = None


class RoundOutput(Struct, kw_only=True):
    content: str
    finish_reason: str | None
    usage: Usage


class RoundResult(Struct, kw_only=True):
    run: str
    round: int  # 1 for the run's first round
    agents: dict[str, RoundOutput]  # in the request's order
    usage: Usage  # summed over the agents


round_request_decoder = msgspec.json.Decoder(RoundRequest)

SCHEMA_TYPES = (RoundRequest, RoundResult)
