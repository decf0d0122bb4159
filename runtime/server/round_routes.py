"""`POST /v1/runs/{run_id}/rounds`: one All-Gather round of a run (sdk/protocol/rounds.py).

Every agent's call is checked (agent names, templates, context lengths) before any is queued,
so a bad round is a 400 or a 404 that starts nothing. The calls then run together as the
run's agents, each attributed like a chat call; if one fails, or the client goes away, the
others are cancelled and their KV freed. Each call carries the token spans of the shared
messages in its prompt (`GenerateRequest.segments`), which a policy that reuses segments
(`kvrt`) computes once for the round (runtime/kv/reuse/planner.py).

The run must be the caller's tenant's (404 otherwise) and live (409 if a restart interrupted
it); the calls are salted by the tenant, and the round's messages, counted over every list in
the body, are limited by `--max-messages`.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from kvrt.runtime.engine.protocol import EngineClient, GenerateRequest
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.admission import ADMISSION
from kvrt.runtime.server.auth import tenant_of
from kvrt.runtime.server.call_context import round_contexts
from kvrt.runtime.server.errors import bad_request
from kvrt.runtime.server.generation import CallObserver, collect, usage_of
from kvrt.runtime.server.http_io import json_response, read_json
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.runtime.server.model_calls import round_agent_call, submit_calls
from kvrt.runtime.server.openai_requests import (
    check_common,
    check_message_count,
    check_text_length,
    text_length,
)
from kvrt.runtime.server.priority_sync import PRIORITY_SYNC
from kvrt.runtime.server.prompt_workers import build_calls
from kvrt.sdk.protocol.openai_api import PromptTokensDetails, Usage
from kvrt.sdk.protocol.rounds import (
    RoundOutput,
    RoundRequest,
    RoundResult,
    round_request_decoder,
)

routes = web.RouteTableDef()

START_BATCH = 64


@routes.post("/v1/runs/{run_id}/rounds")
async def run_round(request: web.Request) -> web.Response:
    arrival = time.perf_counter()
    control, engine = request.app[app_keys.CONTROL], request.app[app_keys.ENGINE]
    tenant = tenant_of(request)
    run = control.live_run(request.match_info["run_id"], tenant)
    body = round_request_decoder.decode(await read_json(request))
    # A round the queue's count refuses costs nothing more: no critical path, no prompts.
    request.app[ADMISSION].check_room(request, engine, len(body.agents))
    _check_round(body, engine, request.app[app_keys.CONFIG].limits.max_messages)
    # 404 for an agent the run's graph lacks, before anything starts
    contexts = round_contexts(run, body.agents)
    _check_text_lengths(body, engine)
    calls = await build_calls(request, lambda model: [  # one job for the round, not one a call
        round_agent_call(body, name, context, model, tenant=tenant)
        for name, context in zip(body.agents, contexts)], run)
    admission = request.app[ADMISSION]
    gens = admission.admit(request, engine, calls, arrival)  # whole, or refused whole
    run.rounds += 1
    number = run.rounds
    observers = admission.follow(gens, submit_calls(calls, request.app[PRIORITY_SYNC]))
    results = await _generate_all(engine, gens, observers, request.app[app_keys.METRICS],
                                  arrival)
    outputs = dict(zip(body.agents, results))
    return json_response(RoundResult(
        run=run.id, round=number, agents=outputs,
        usage=_total([output.usage for output in outputs.values()])))


def _check_round(body: RoundRequest, engine: EngineClient, max_messages: int) -> None:
    check_common(body, engine)
    _check_messages(body, max_messages)
    if body.stream:
        raise bad_request("rounds are not streamed; send stream=false (or leave it out)",
                          param="stream")
    if body.kvrt is not None:
        raise bad_request("a round's run is in its path and its agents are the keys of "
                          "`agents`; leave `kvrt` out", param="kvrt")


def _check_text_lengths(body: RoundRequest, engine: EngineClient) -> None:
    """Each agent's text (its own, the shared, its after or the instruction) against what any
    prompt can hold: a 400 naming the agent before any prompt is built."""
    shared, instruction = text_length(body.shared), text_length(body.instruction or [])
    for name, spec in body.agents.items():
        after = instruction if spec.after is None else text_length(spec.after)
        check_text_length(text_length(spec.messages) + shared + after, engine, f"agents.{name}")


def _check_messages(body: RoundRequest, max_messages: int) -> None:
    """Every message of the body counts against the limit; the 400 names the list in which
    the count passes it."""
    lists = [("shared", body.shared), ("instruction", body.instruction or [])]
    for name, spec in body.agents.items():
        lists += [(f"agents.{name}.messages", spec.messages),
                  (f"agents.{name}.after", spec.after or [])]
    total = sum(len(messages) for _, messages in lists)
    count = 0
    for param, messages in lists:
        count += len(messages)
        if count > max_messages:
            check_message_count(total, max_messages, param,
                                "the round (shared, instruction, and every agent's lists)")


async def _generate_all(engine: EngineClient, gens: list[GenerateRequest],
                        observers: list[CallObserver | None], metrics: ServerMetrics,
                        arrival: float) -> list[RoundOutput]:
    """Runs the calls together; one failure cancels the others. They start START_BATCH at a
    time, the loop turning between batches: a start (a stream, a message to the engine thread)
    costs ~0.1 ms, and 2,000 at once would hold the loop for a quarter of a second."""
    tasks: list[asyncio.Task[RoundOutput]] = []
    try:
        async with asyncio.TaskGroup() as group:
            for gen, observer in zip(gens, observers):
                tasks.append(group.create_task(_generate(engine, gen, metrics, arrival, observer)))
                if len(tasks) % START_BATCH == 0:
                    await asyncio.sleep(0)
    except BaseException:
        # A call cancelled before it started, or never started, did not end itself; ended()
        # of one that did is a no-op (AgentCall.ended).
        for observer in observers:
            if observer is not None:
                observer.ended()
        raise
    return [task.result() for task in tasks]


async def _generate(engine: EngineClient, gen: GenerateRequest, metrics: ServerMetrics,
                    arrival: float, call: CallObserver | None) -> RoundOutput:
    text, last = await collect(engine, gen, metrics, arrival, call)
    return RoundOutput(content=text, finish_reason=last.finish_reason, usage=usage_of(last))


def _total(usages: list[Usage]) -> Usage:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
