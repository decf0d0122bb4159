"""Who a model call is for, resolved once per call: its run, its agent, the run's reuse mode and
the agent's priority.

A call names its run and agent in the body's `kvrt` object or the X-Kvrt-* headers, the body
winning field by field; a run needs an agent and an agent a run (400). The run must be the
caller's tenant's (404 otherwise, as for a run that does not exist) and live (409
`run_interrupted` for one a restart interrupted), and its graph must declare the agent (404).
A call that names no run may still belong to its session's implicit run (implicit_runs.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvrt.runtime.engine.protocol import Attribution
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.critical_path import Criticality
from kvrt.runtime.graph.runs import AgentCall, Run
from kvrt.runtime.server.errors import bad_request
from kvrt.sdk.protocol.openai_api import KvrtOptions

RUN_HEADER = "X-Kvrt-Run"
AGENT_HEADER = "X-Kvrt-Agent"


@dataclass(frozen=True, slots=True)
class CallContext:
    run: Run
    agent: str
    index: int  # the agent's, in the run's graph
    approximate_reuse: bool  # the graph declares `reuse: "approximate"`: every message a segment
    priority: float  # the agent's graph priority when the call came in (higher first)
    criticality: Criticality  # the run's, which `priority` was read from (pushed at submission)

    @property
    def attribution(self) -> Attribution:
        return Attribution(self.run.id, self.agent, self.priority)

    def submit(self, request_id: str) -> AgentCall:
        """Tells the run that the call is queued (once admitted); the AgentCall follows it."""
        return self.run.submit_call(self.index, request_id)


def call_context(control: ControlPlane, options: KvrtOptions | None, headers: Mapping[str, str],
                 tenant: str) -> CallContext | None:
    """The context of a call attributed by `options` or `headers`; None for one that is not."""
    found = control.agent_of(_attribution(options, headers), tenant)
    if found is None:
        return None
    run, index = found
    return _context(run, index, run.criticality())


def agent_context(run: Run, agent: str) -> CallContext:
    """The context of a call of the run's `agent` (404 if its graph lacks it)."""
    return _context(run, run.agent_index(agent), run.criticality())


def round_contexts(run: Run, agents: Iterable[str]) -> list[CallContext]:
    """The contexts of a round's calls, one per agent (404 for one the graph lacks). Every
    priority is read from the run as the round found it: one critical path for the round."""
    indexes = [run.agent_index(name) for name in agents]
    criticality = run.criticality()
    return [_context(run, index, criticality) for index in indexes]


def _context(run: Run, index: int, criticality: Criticality) -> CallContext:
    return CallContext(run, run.graph.agents[index].name, index,
                       run.graph.reuse == "approximate", run.priority(index, criticality),
                       criticality)


def _attribution(options: KvrtOptions | None, headers: Mapping[str, str]) -> Attribution:
    run = options.run if options is not None and options.run is not None else None
    agent = options.agent if options is not None and options.agent is not None else None
    run = run if run is not None else headers.get(RUN_HEADER)
    agent = agent if agent is not None else headers.get(AGENT_HEADER)
    if (run is None) != (agent is None):
        missing = "agent" if agent is None else "run"
        raise bad_request(
            f"a call attributed to a {'run' if agent is None else 'agent'} must name its "
            f"{missing} too (kvrt.{missing} or the X-Kvrt-{missing.capitalize()} header)",
            param=f"kvrt.{missing}")
    return Attribution(run=run, agent=agent)
