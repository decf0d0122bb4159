"""What the live view (GET /ui) shows, as one JSON snapshot (GET /ui/state): the declared
graphs with their critical paths, each live run's agents (state, priority, KV residency), the
policy's recent decisions and the KV pool over time.

Who sees what (auth.py puts the caller's tenant and whether it is the operator on the request):

    caller                     graphs, runs          decisions            KV pool
    -------------------------  --------------------  -------------------  ---------------
    operator (admin key; or    every tenant's, each  all of them          over time
      no keys at all)          run with its tenant
    a tenant's key             its own               about its live runs  not shown: the
                                                                          pool is every
                                                                          tenant's

The graphs and runs are the same Structs as GET /v1/graphs/{id} and GET /v1/runs/{id}; a
snapshot holds the newest MAX_GRAPHS graphs and MAX_RUNS live runs (and says how many more),
so the page's once-a-second poll stays cheap however many there are.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from kvrt.runtime.engine.protocol import EngineClient
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.server.control_views import graph_info, run_state
from kvrt.runtime.server.ui_pool import PoolHistory, PoolSample
from kvrt.sdk.protocol.control import GraphInfo, RunState

MAX_GRAPHS = 20
MAX_RUNS = 20
MAX_DECISIONS = 60


class DecisionView(Struct, kw_only=True):
    age_s: float  # how long ago the engine carried it out
    kind: str  # pin, unpin, offload, upload, backup, retain, prefetch
    cause: str  # what the policy answered: an event's type, "step", "admit", "finish", ...
    run: str | None
    agent: str | None
    detail: str


class PoolView(Struct, kw_only=True):
    total_blocks: int  # the device pool
    host_blocks: int  # the host tier (0: none)
    now: float  # the loop's clock: a sample's age is now - t
    samples: list[PoolSample]  # oldest first, one a second


class UIState(Struct, kw_only=True):
    model: str
    view: Literal["operator", "tenant"]
    tenant: str | None  # the caller's, in a tenant's view
    graphs: list[GraphInfo]  # the newest, oldest first
    more_graphs: int  # older ones left out
    runs: list[RunState]  # the newest live runs, oldest first
    more_runs: int
    run_tenants: dict[str, str]  # run id -> its tenant (the operator's view only)
    decisions: list[DecisionView]  # newest first
    pool: PoolView | None  # the operator's view only


def ui_state(control: ControlPlane, engine: EngineClient, history: PoolHistory, now: float,
             tenant: str, operator: bool) -> UIState:
    """The snapshot for one caller (`now`: the loop's clock)."""
    scope = None if operator else tenant
    entries = control.graphs(scope)
    live = [run for run in control.runs(tenant=scope) if run.status == "live"]
    shown = live[-MAX_RUNS:]
    return UIState(
        model=engine.model_name, view="operator" if operator else "tenant",
        tenant=None if operator else tenant,
        graphs=[graph_info(entry) for entry in entries[-MAX_GRAPHS:]],
        more_graphs=max(len(entries) - MAX_GRAPHS, 0),
        runs=[run_state(run, engine.kv_residency(run.id), engine.replica_of(run.id))
              for run in shown],
        more_runs=max(len(live) - MAX_RUNS, 0),
        run_tenants={run.id: run.tenant for run in shown} if operator else {},
        decisions=_decisions(engine, None if operator else {run.id for run in live}),
        pool=PoolView(total_blocks=history.total_blocks, host_blocks=history.host_blocks,
                      now=now, samples=list(history.samples)) if operator else None,
    )


def _decisions(engine: EngineClient, runs: set[str] | None) -> list[DecisionView]:
    """The newest first; only those about `runs` unless None (a backup names no run: the
    operator's only)."""
    recent = engine.recent_decisions()
    out: list[DecisionView] = []
    for record in reversed(recent.records):
        if runs is not None and record.run not in runs:
            continue
        out.append(DecisionView(age_s=recent.now - record.at, kind=record.kind,
                                cause=record.cause, run=record.run, agent=record.agent,
                                detail=record.detail))
        if len(out) == MAX_DECISIONS:
            break
    return out
