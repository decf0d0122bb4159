"""The benchmark's workloads, by name. Each is seeded and built from a frozen params dataclass
(printed in the report); `run(session)` plays it against a daemon through the SDK."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Protocol

from kvrt.runtime.bench.session import BenchSession
from kvrt.runtime.bench.workloads.dag_apps import DagApps, DagAppsParams
from kvrt.runtime.bench.workloads.generative_agents import GenerativeAgents, GenerativeAgentsParams
from kvrt.runtime.bench.workloads.langgraph_apps import LangGraphApps, LangGraphParams
from kvrt.runtime.bench.workloads.map_reduce import MapReduce, MapReduceParams
from kvrt.runtime.bench.workloads.swe_agents import SweAgents, SweAgentsParams
from kvrt.runtime.bench.workloads.tool_agents import ToolAgents, ToolAgentsParams
from kvrt.runtime.bench.workloads.tool_agents_langgraph import ToolAgentsLangGraph
from kvrt.runtime.bench.workloads.trace import TraceParams, TraceReplay
from kvrt.runtime.bench.workloads.workflows import Workflows, WorkflowsParams


class Workload(Protocol):
    name: str
    params: Any  # a frozen dataclass with a `concurrent_agents` property

    async def run(self, session: BenchSession) -> None: ...


WORKLOADS: dict[str, tuple[type, Any]] = {
    "generative-agents": (GenerativeAgents, GenerativeAgentsParams),
    "tool-agents": (ToolAgents, ToolAgentsParams),
    "map-reduce": (MapReduce, MapReduceParams),
    "langgraph": (LangGraphApps, LangGraphParams),  # real LangGraph apps, the `langgraph` extra
    # tool-agents' plan and declaration, played by a LangGraph app (the `langgraph` extra)
    "tool-agents-langgraph": (ToolAgentsLangGraph, ToolAgentsParams),
    "trace": (TraceReplay, TraceParams),  # --trace FILE
    # Presets from the papers (docs/benchmarks/presets.md): KVFlow, TokenCake, Continuum
    "workflows": (Workflows, WorkflowsParams),
    "dag-apps": (DagApps, DagAppsParams),
    "swe-agents": (SweAgents, SweAgentsParams),
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
    "langgraph": {"threads": 2, "turns": 1, "routes": 2, "system_words": 120,
                  "tool_median_s": 0.5, "tool_p95_s": 2.0, "human_median_s": 1.0,
                  "human_p95_s": 3.0, "min_output_tokens": 16, "max_output_tokens": 32},
    "trace": {},
    "workflows": {"workflows": 2, "templates": 2, "agents_per_workflow": 2,
                  "fixed_prompt_words": 60, "task_words": 12, "min_output_tokens": 16,
                  "max_output_tokens": 32},
    "dag-apps": {"apps": 2, "width": 1, "qps": 2.0, "output_tokens": "16,24,32",
                 "system_words": 60, "task_words": 12, "tool_output_words": 20,
                 "test_median_s": 0.3, "test_p95_s": 1.0, "search_median_s": 0.3,
                 "search_p95_s": 1.0},
    "swe-agents": {"agents": 2, "calls": 3, "qps": 2.0, "system_words": 60, "task_words": 20,
                   "tool_output_words": 20, "tool_median_s": 0.3, "tool_p95_s": 1.0,
                   "min_output_tokens": 16, "max_output_tokens": 32},
}
QUICK["tool-agents-langgraph"] = QUICK["tool-agents"]  # the same plan, for a like comparison


def workload_names() -> list[str]:
    return list(WORKLOADS)


def make_workload(name: str, quick: bool = False, settings: dict[str, str] | None = None,
                  **overrides: Any) -> Workload:
    """Overrides that are None, or that the workload has no parameter for, are ignored (the
    common flags name parameters of some workloads only); `settings` (`--param KEY=VALUE`, text)
    must each name a parameter of this workload, and win over everything else."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")
    cls, params_cls = WORKLOADS[name]
    known = {f.name for f in fields(params_cls)}
    chosen = {**(QUICK[name] if quick else {}),
              **{k: v for k, v in overrides.items() if v is not None and k in known},
              **_parse_settings(params_cls, settings or {})}
    return cls(replace(params_cls(), **chosen))


def _parse_settings(params_cls: type, settings: dict[str, str]) -> dict[str, Any]:
    types = {f.name: type(getattr(params_cls(), f.name)) for f in fields(params_cls)}
    parsed = {}
    for key, text in settings.items():
        if key not in types:
            raise ValueError(f"{params_cls.__name__} has no parameter {key!r}; "
                             f"it has: {', '.join(types)}")
        try:
            parsed[key] = types[key](text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected {types[key].__name__}") from None
    return parsed
