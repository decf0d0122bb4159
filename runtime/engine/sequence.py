"""A request's state inside the engine. It is what a policy sees of a call (policy/view.py's
Call) and what the reuse planner reads (kv/reuse/planner.py's Reader)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kvrt.runtime.engine.priorities import Priorities
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.owners import Owner


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity equality: a sequence is one request
class Sequence:
    request: GenerateRequest
    table: BlockTable
    arrival: float
    order: int = 0  # arrivals counted: breaks ties of `arrival` (a simulated clock gives a
    # burst of requests one time, and FCFS must still know who came first)
    token_ids: list[int] = field(default_factory=list)  # prompt, then generated tokens
    num_computed: int = 0  # leading tokens whose KV is in the pool
    num_cached: int = 0  # prompt tokens served from the prefix cache (first admission)
    status: Status = Status.WAITING
    generator: torch.Generator | None = None  # per-request RNG when the request has a seed
    admitted_once: bool = False
    priorities: Priorities = field(default_factory=Priorities)  # the engine's, shared
    index: int = 0  # which choice of its request (SamplingParams.n) it generates

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def owner(self) -> Owner | None:
        return self.table.owner

    @property
    def priority(self) -> float:
        """Its agent's graph priority now: the last the server pushed (engine/priorities.py),
        else the one stamped on the call when it was made."""
        return self.priorities.of(self.table.owner, self.request.attribution.priority)

    @property
    def request_rank(self) -> float:
        """The class a call is served in before any policy's order, as vLLM's `priority`
        field ranks requests (lower first): an unattributed call carries it (negated, as its
        kvrt priority); every call of a run is in class 0, ordered by the policy alone."""
        return 0.0 if self.table.owner is not None else -self.request.attribution.priority

    @property
    def remaining_s(self) -> float | None:
        """Its run's remaining critical path in seconds, as last pushed (None: unattributed, or
        not pushed yet)."""
        return self.priorities.remaining(self.table.owner)

    @property
    def salt(self) -> bytes:
        return self.request.salt

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        return self.request.segments
