"""Ties a model call to its run's agent, for the chat, completion and round handlers.

A call names its run and agent in the body's `kvrt` object or the X-Kvrt-* headers
(openai_requests.attribution). The run must be the caller's tenant's (404 otherwise, as for a
run that does not exist) and live (409 `run_interrupted` for one a restart interrupted).
"""

from __future__ import annotations

from dataclasses import replace

from kvrt.runtime.engine.protocol import Attribution, GenerateRequest
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.runs import AgentCall


def approximate_reuse(control: ControlPlane, call: Attribution, tenant: str) -> bool:
    """Whether the call's run declared `reuse: "approximate"` (every message a segment)."""
    found = control.agent_of(call, tenant)
    return found is not None and found[0].graph.reuse == "approximate"


def attribute(
    control: ControlPlane, gen: GenerateRequest, tenant: str
) -> tuple[GenerateRequest, AgentCall | None]:
    """Ties an attributed call to its run's agent (404 for an unknown run or agent) and stamps
    the agent's current priority on the request."""
    found = control.agent_of(gen.attribution, tenant)
    if found is None:
        return gen, None
    run, index = found
    priority = run.priority(index, run.criticality())
    gen = replace(gen, attribution=replace(gen.attribution, priority=priority))
    return gen, run.submit_call(index, gen.request_id)
