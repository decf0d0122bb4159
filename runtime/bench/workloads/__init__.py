"""The benchmark's workloads, by name. Each is seeded and built from a frozen params dataclass
(printed in the report); `run(session)` plays it against a daemon through the SDK."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Protocol

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads.generative_agents import GenerativeAgents, GenerativeAgentsParams
from kvrt.runtime.bench.workloads.map_reduce import MapReduce, MapReduceParams
from kvrt.runtime.bench.workloads.tool_agents import ToolAgents, ToolAgentsParams
from kvrt.runtime.bench.workloads.trace import TraceParams, TraceReplay


class Workload(Protocol):
    name: str
    params: Any  # a frozen dataclass with a `concurrent_agents` property

    async def run(self, session: BenchSession) -> None: ...


WORKLOADS: dict[str, tuple[type, Any]] = {
    "generative-agents": (GenerativeAgents, GenerativeAgentsParams),
    "tool-agents": (ToolAgents, ToolAgentsParams),
    "map-reduce": (MapReduce, MapReduceParams),
    "trace": (TraceReplay, TraceParams),  # --trace FILE
}

# `--quick`: small enough to finish in a couple of minutes on a 2-core CPU with the default model.
QUICK: dict[str, dict[str, Any]] = {
    "generative-agents": {"agents": 3, "rounds": 2, "persona_words": 120,
                          "min_output_tokens": 16, "max_output_tokens": 32},
    "tool-agents": {"runs": 2, "min_workers": 2, "max_workers": 2, "turns": 1,
                    "system_words": 120, "tool_median_s": 0.5, "tool_p95_s": 2.0,
                    "min_output_tokens": 16, "max_output_tokens": 32},
    "map-reduce": {"agents": 3, "document_words": 300, "min_output_tokens": 16,
                   "max_output_tokens": 32},
    "trace": {},
}


def workload_names() -> list[str]:
    return list(WORKLOADS)


def make_workload(name: str, quick: bool = False, **overrides: Any) -> Workload:
    """Overrides that are None, or that the workload has no parameter for, are ignored."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")
    cls, params_cls = WORKLOADS[name]
    known = {f.name for f in fields(params_cls)}
    chosen = {**(QUICK[name] if quick else {}),
              **{k: v for k, v in overrides.items() if v is not None and k in known}}
    return cls(replace(params_cls(), **chosen))
