"""HTTP handlers: decode, hand over, encode. Errors are mapped by `errors.error_middleware`."""

from __future__ import annotations

import time

from aiohttp import web

from kvrt.runtime.engine.protocol import NO_REPLICA_RETRY_S
from kvrt.runtime.graph.runs import Run
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.admission import ADMISSION
from kvrt.runtime.server.auth import is_operator, tenant_of
from kvrt.runtime.server.call_context import CallContext, call_context
from kvrt.runtime.server.engine_metrics import kv_cache_usage
from kvrt.runtime.server.errors import APIError
from kvrt.runtime.server.grammars import GRAMMARS, chat_grammar
from kvrt.runtime.server.http_io import json_response, read_json
from kvrt.runtime.server.implicit_runs import chat_formatter, implicit_context
from kvrt.runtime.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kvrt.runtime.server.model_calls import (
    PreparedCall,
    chat_call,
    check_chat,
    check_completion,
    completion_call,
    submit_calls,
)
from kvrt.runtime.server.openai_requests import chat_tools
from kvrt.runtime.server.openai_serving import (
    CompletionFormatter,
    Formatter,
    respond_json,
    respond_stream,
)
from kvrt.runtime.server.priority_sync import PRIORITY_SYNC
from kvrt.runtime.server.prompt_workers import build_calls
from kvrt.sdk.protocol.openai_api import (
    Health,
    ModelCard,
    ModelList,
    ReplicaHealth,
    SamplingRequest,
    chat_request_decoder,
    completion_request_decoder,
)

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    arrival = time.perf_counter()
    body = chat_request_decoder.decode(await read_json(request))
    engine, tenant = request.app[app_keys.ENGINE], tenant_of(request)
    context = call_context(request.app[app_keys.CONTROL], body.kvrt, request.headers, tenant)
    tools = chat_tools(body)
    check_chat(body, engine, request.app[app_keys.CONFIG].limits.max_messages)
    context = context or implicit_context(request.app, body, request.headers, tenant)
    parser, grammars = request.app[app_keys.TOOL_PARSER], request.app[GRAMMARS]
    call = await build_calls(request, lambda model: chat_call(
        body, tools, context, model, tenant=tenant,
        grammar=lambda: chat_grammar(body, parser, grammars)), _run_of(context))
    formatter = chat_formatter(request.app, context, body)(
        call.request_id, engine.model_name, _include_usage(body),
        tool_parser=parser if tools is not None else None,
        parallel_tool_calls=body.parallel_tool_calls is not False,
    )
    return await _respond(request, body, call, formatter, arrival)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    arrival = time.perf_counter()
    body = completion_request_decoder.decode(await read_json(request))
    engine, tenant = request.app[app_keys.ENGINE], tenant_of(request)
    context = call_context(request.app[app_keys.CONTROL], body.kvrt, request.headers, tenant)
    check_completion(body, engine)
    context = context or implicit_context(request.app, body, request.headers, tenant)
    call = await build_calls(
        request, lambda model: completion_call(body, context, model, tenant=tenant),
        _run_of(context))
    formatter = CompletionFormatter(call.request_id, engine.model_name, _include_usage(body))
    return await _respond(request, body, call, formatter, arrival)


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    engine = request.app[app_keys.ENGINE]
    card = ModelCard(
        id=engine.model_name, created=request.app[app_keys.STARTED_AT],
        max_model_len=engine.max_model_len,
    )
    return json_response(ModelList(data=[card]))


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 when ready; 503 while starting or draining (the error's code says which). Behind
    replicas: 200 while one of them serves, with each one's state."""
    refusal = request.app[ADMISSION].unavailable()
    if refusal is not None:
        raise refusal
    engine = request.app[app_keys.ENGINE]
    if not engine.is_alive():
        raise APIError(503, "the engine is not running", code="engine_dead")
    replicas = [ReplicaHealth(
        name=r.name, state=r.state, restarts=r.restarts, runs=r.runs, agents=r.agents,
        requests_in_flight=r.load.in_flight,
        kv_cache_usage=None if r.stats is None else round(kv_cache_usage(r.stats), 4))
        for r in engine.replicas()]
    if replicas and not any(r.state == "ready" for r in replicas):
        raise APIError(503, "no engine replica is ready: " + ", ".join(
            f"{r.name} {r.state}" for r in replicas), code="no_replica_ready",
            retry_after_s=NO_REPLICA_RETRY_S)
    config = request.app[app_keys.CONFIG].engine
    return json_response(Health(policy=config.policy, host_cache_bytes=config.host_cache_memory,
                                replicas=replicas or None))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The server's figures; each tenant's too for the operator (auth.py: who may read)."""
    engine, control = request.app[app_keys.ENGINE], request.app[app_keys.CONTROL]
    tenants = {tenant for _, tenant in request.app[app_keys.CONFIG].api_keys}
    per_tenant = ({tenant: control.live_run_count(tenant) for tenant in tenants}
                  if is_operator(request) and tenants else None)
    text = request.app[app_keys.METRICS].render(engine.stats(), control.live_run_count(),
                                                per_tenant, engine.replicas() or None)
    return web.Response(body=text, headers={"Content-Type": METRICS_CONTENT_TYPE})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[app_keys.OPENAPI_JSON], content_type="application/json")


def _run_of(context: CallContext | None) -> Run | None:
    return None if context is None else context.run


def _include_usage(body: SamplingRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _respond(request: web.Request, body: SamplingRequest, call: PreparedCall,
                   formatter: Formatter, arrival: float) -> web.StreamResponse:
    engine, metrics = request.app[app_keys.ENGINE], request.app[app_keys.METRICS]
    admission = request.app[ADMISSION]
    [gen] = admission.admit(request, engine, [call], arrival)
    [observer] = admission.follow([gen], submit_calls([call], request.app[PRIORITY_SYNC]))
    if body.stream:
        return await respond_stream(request, engine, gen, metrics, arrival, formatter, observer)
    return await respond_json(engine, gen, metrics, arrival, formatter, observer)
