"""Control-plane handlers: agent graphs, runs and their events. Thin: decode, act, encode.

Every handler acts as the caller's tenant (auth.tenant_of): another tenant's graphs and runs
are 404 and left out of listings. A run's events are limited to `--max-events-per-second`
(a burst of as many), past which they get 429 with Retry-After.

Listings page as OpenAI's do: `limit` (1 to 100, default 20) items in creation order, those
after the id `after` (fewer graphs when their declarations are large: ControlPlane.graph_page).
Any id of the listing's kind is a place to start after, even one deleted
since (runtime/graph/listing.py), so `after` is never a 404.
"""

from __future__ import annotations

import math
import time

from aiohttp import web

from kvrt.runtime.server import app_keys
from kvrt.runtime.server.auth import tenant_of
from kvrt.runtime.server.control_views import graph_info, graph_list, run_info, run_list, run_state
from kvrt.runtime.server.errors import APIError, bad_request
from kvrt.runtime.server.http_io import json_response, read_json
from kvrt.runtime.server.priority_sync import PRIORITY_SYNC
from kvrt.sdk.protocol.control import (
    DEFAULT_PAGE_LIMIT,
    MAX_PAGE_LIMIT,
    Deleted,
    EventAck,
    RunClosed,
    event_decoder,
    graph_spec_decoder,
    run_spec_decoder,
)

routes = web.RouteTableDef()


@routes.post("/v1/graphs")
async def create_graph(request: web.Request) -> web.Response:
    spec = graph_spec_decoder.decode(await read_json(request))
    entry = request.app[app_keys.CONTROL].create_graph(spec, tenant_of(request))
    return json_response(graph_info(entry), status=201)


@routes.get("/v1/graphs")
async def list_graphs(request: web.Request) -> web.Response:
    limit, after = _page_query(request, "graph")
    page = request.app[app_keys.CONTROL].graph_page(tenant_of(request), limit, after)
    return json_response(graph_list(page))


@routes.get("/v1/graphs/{graph_id}")
async def get_graph(request: web.Request) -> web.Response:
    entry = request.app[app_keys.CONTROL].graph(request.match_info["graph_id"], tenant_of(request))
    return json_response(graph_info(entry))


@routes.delete("/v1/graphs/{graph_id}")
async def delete_graph(request: web.Request) -> web.Response:
    graph_id = request.match_info["graph_id"]
    request.app[app_keys.CONTROL].delete_graph(graph_id, tenant_of(request))
    return json_response(Deleted(id=graph_id, object="graph"))


@routes.post("/v1/runs")
async def start_run(request: web.Request) -> web.Response:
    spec = run_spec_decoder.decode(await read_json(request))
    control, tenant = request.app[app_keys.CONTROL], tenant_of(request)
    # No await between the lookup and the start: one key never gets two runs.
    existing = control.keyed_run(spec.graph_id, spec.key, tenant)
    run = existing or control.start_run(spec.graph_id, spec.key, tenant)
    request.app[PRIORITY_SYNC].track(run)
    return json_response(run_info(run), status=200 if existing else 201)


@routes.get("/v1/runs")
async def list_runs(request: web.Request) -> web.Response:
    limit, after = _page_query(request, "run")
    page = request.app[app_keys.CONTROL].run_page(tenant_of(request), limit, after,
                                                  request.query.get("graph_id"),
                                                  request.query.get("key"))
    return json_response(run_list(page))


@routes.get("/v1/runs/{run_id}")
async def get_run(request: web.Request) -> web.Response:
    run = request.app[app_keys.CONTROL].run(request.match_info["run_id"], tenant_of(request))
    engine = request.app[app_keys.ENGINE]
    return json_response(run_state(run, engine.kv_residency(run.id), engine.replica_of(run.id)))


@routes.post("/v1/runs/{run_id}/events")
async def post_event(request: web.Request) -> web.Response:
    started = time.perf_counter()
    body = await read_json(request)
    run = request.app[app_keys.CONTROL].live_run(request.match_info["run_id"], tenant_of(request))
    wait = run.admit_event()
    if wait > 0:
        raise APIError(429, f"run {run.id} sends events faster than this server's limit of "
                       f"{request.app[app_keys.CONFIG].limits.max_events_per_s:g} a second "
                       "(--max-events-per-second); retry after the Retry-After seconds",
                       code="rate_limit_exceeded", retry_after_s=math.ceil(wait))
    event = event_decoder.decode(body)
    applied = run.apply(event)
    if applied is not None:  # the policy hears of each event once, then of what it moved
        request.app[app_keys.ENGINE].notify(applied)
        request.app[PRIORITY_SYNC].soon(run)  # one critical path for a turn's events
    ack = EventAck(run=run.id, agent=event.agent, state=run.agent_state(event.agent),
                   event_count=run.event_count, duplicate=applied is None)
    response = json_response(ack)
    request.app[app_keys.METRICS].observe_event(event.__struct_config__.tag,
                                                time.perf_counter() - started)
    return response


@routes.delete("/v1/runs/{run_id}")
async def end_run(request: web.Request) -> web.Response:
    run = request.app[app_keys.CONTROL].end_run(request.match_info["run_id"], tenant_of(request))
    request.app[PRIORITY_SYNC].forget(run)  # the engine drops its entries as it releases it
    if run.status == "interrupted":  # a run of an earlier daemon: this engine holds none of it
        return json_response(RunClosed(id=run.id, released_blocks=0))
    # Ended first, so no new call joins the run while its KV is released.
    released = await request.app[app_keys.ENGINE].release_run(run.id)
    return json_response(RunClosed(id=run.id, released_blocks=released))



def _page_query(request: web.Request, kind: str) -> tuple[int, str | None]:
    """A listing's `limit` and `after` (400 naming the one that is wrong)."""
    limit, text = DEFAULT_PAGE_LIMIT, request.query.get("limit")
    if text is not None:
        limit = int(text) if text.isascii() and text.isdigit() else 0
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise bad_request(f"limit must be a whole number from 1 to {MAX_PAGE_LIMIT}, got "
                              f"{text!r}", param="limit", code="invalid_limit")
    after = request.query.get("after")
    if after is not None and not after.startswith(f"{kind}-"):
        raise bad_request(f"after must be a {kind} id ({kind}-...), got {after!r}",
                          param="after", code="invalid_after")
    return limit, after
