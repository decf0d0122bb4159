"""One tenant must not stop the others: its share of the request queue, runs it abandoned, and
the agents of its runs.

Two tenants on one daemon that runs one sequence at a time, so that a few long requests fill
the queue; runs idle for a second expire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from kvrt.runtime.config import DEFAULT_TENANT, ControlConfig, EngineConfig, ServerLimits
from kvrt.runtime.engine.protocol import EngineLoad
from kvrt.runtime.server.admission import ADMISSION, Admission, admission_middleware
from kvrt.runtime.server.errors import APIError
from kvrt.runtime.server.model_calls import completion_call
from kvrt.runtime.server.tenant_queue import TenantLoad
from kvrt.sdk.protocol.openai_api import CompletionRequest
from tests.server.live_server import (
    LiveServer,
    assert_error_shape,
    live_server,
    sse_events,
    wait_released,
)

KEY_A, KEY_B = "key-of-tenant-a", "key-of-tenant-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
LONG = 2000  # tokens a long request would generate: seconds of work, always closed early
IDLE_S = 1.5
ENGINE = EngineConfig(kv_cache_memory=4 * 1024**2, max_model_len=2048, max_num_seqs=1)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    # A share of 0.5 of 4 queued requests: 2 per tenant.
    limits = ServerLimits(max_queued_requests=4, max_queue_share_per_tenant=0.5)
    # One run per tenant, of at most 3 agents.
    control = ControlConfig(run_idle_timeout_s=IDLE_S, max_runs_per_tenant=1,
                            max_run_agents_per_tenant=3)
    yield from live_server(tiny_model, ENGINE, limits=limits, control=control,
                           api_keys=((KEY_A, "a"), (KEY_B, "b")))


def completion(max_tokens: int = LONG, **extra):
    return {"prompt": [5 + i % 50 for i in range(8)], "max_tokens": max_tokens,
            "ignore_eos": True, **extra}


def on_loop(server: LiveServer, fn):
    async def run():
        return fn()

    return server.call(run)


def queued(server: LiveServer) -> tuple[EngineLoad, TenantLoad, TenantLoad]:
    """The engine's queue, and the server's count of each tenant's part of it."""
    def read():
        admission = server_admission(server)
        admission.tenants.check_integrity()
        return server.engine.load(), admission.tenants.load("a"), admission.tenants.load("b")

    return on_loop(server, read)


def server_admission(server: LiveServer) -> Admission:
    return server.app[ADMISSION]


async def wait_until(server: LiveServer, requests: int) -> None:
    deadline = time.monotonic() + 10
    while queued(server)[0].queued_requests != requests:
        assert time.monotonic() < deadline, f"the queue never held {requests}: {queued(server)}"
        await asyncio.sleep(0.02)


def assert_no_tenant_queued(server: LiveServer) -> None:
    wait_released(server)
    load, a, b = queued(server)
    assert (load.queued_requests, load.in_flight) == (0, 0)
    assert a == b == TenantLoad()


def test_one_tenants_burst_leaves_the_rest_of_the_queue_to_another(server) -> None:
    async def scenario():
        async with aiohttp.ClientSession() as session:
            post = session.post
            running = await post(server.url + "/v1/completions", json=completion(stream=True),
                                 headers=A)
            await anext(sse_events(running))  # it produced output: out of the queue
            waiting = [asyncio.create_task(post(server.url + "/v1/completions",
                                                json=completion(), headers=A))
                       for _ in range(2)]
            await wait_until(server, 2)
            try:
                started = time.monotonic()
                async with post(server.url + "/v1/chat/completions", headers=A, json={
                        "messages": [{"role": "user", "content": "me too"}],
                        "max_tokens": 1}) as refused:
                    assert time.monotonic() - started < 1.0  # refused at once, not queued
                    status, headers, body = refused.status, refused.headers, await refused.json()
                # The queue (4) has room, and the other tenant gets it.
                other = asyncio.create_task(post(server.url + "/v1/completions",
                                                 json=completion(), headers=B))
                await wait_until(server, 3)
                _, a, b = queued(server)
                assert (a.requests, b.requests) == (2, 1)
                other.cancel()
                await asyncio.gather(other, return_exceptions=True)
                return status, headers, body
            finally:
                running.close()
                for task in waiting:
                    task.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)

    status, headers, body = asyncio.run(scenario())
    assert status == 429, body
    error = body["error"]
    assert error["code"] == "tenant_queue_full"
    assert error["param"] == "max_queue_share_per_tenant"
    assert "2 requests" in error["message"]
    assert int(headers["Retry-After"]) >= 1
    # Every count went back to zero: calls that left the queue by their first output, and
    # calls whose clients went away while queued.
    assert_no_tenant_queued(server)


def chat(headers: dict[str, str], max_tokens: int = 2, **extra):
    return {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def test_the_count_returns_to_zero_however_a_call_ends(server) -> None:
    assert server.post("/v1/chat/completions", chat(A), headers=A).status == 200
    assert server.stream("/v1/chat/completions", chat(A, stream=True), headers=A)[-1] == "[DONE]"
    never = server.post("/v1/completions", completion(max_tokens=5000), headers=A)
    assert_error_shape(never, 400)  # refused before it was counted

    async def gone_while_generating():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(server.url + "/v1/completions",
                                      json=completion(stream=True), headers=B)
            await anext(sse_events(resp))
            resp.close()

    asyncio.run(gone_while_generating())
    graph = server.post("/v1/graphs", {"name": "pair", "agents": [{"name": "x"}, {"name": "y"}]},
                        headers=B).json()["id"]
    run = server.post("/v1/runs", {"graph_id": graph}, headers=B).json()["id"]
    rounded = server.post(f"/v1/runs/{run}/rounds", {
        "agents": {"x": {"messages": [{"role": "user", "content": "one"}]},
                   "y": {"messages": [{"role": "user", "content": "two"}]}},
        "shared": [{"role": "user", "content": "both"}], "max_tokens": 2}, headers=B)
    assert rounded.status == 200, rounded.body
    assert server.request("DELETE", f"/v1/runs/{run}", headers=B).status == 200
    assert server.request("DELETE", f"/v1/graphs/{graph}", headers=B).status == 200
    assert_no_tenant_queued(server)


def test_a_call_whose_generation_never_started_leaves_with_its_http_request(server) -> None:
    """A round's call cancelled before its task ran never reaches the observer that would
    count it out: the admission middleware does, at the end of the HTTP request."""
    engine, admission = server.engine, server_admission(server)

    async def handler(request: web.Request) -> web.StreamResponse:
        body = CompletionRequest(model="tiny", prompt=[5, 6, 7], max_tokens=1)
        call = completion_call(body, None, engine, tenant=DEFAULT_TENANT)
        admission.admit(request, engine, [call], time.perf_counter())  # no key: the default
        assert admission.tenants.load(DEFAULT_TENANT) == TenantLoad(requests=1, tokens=3)
        raise asyncio.CancelledError  # as a TaskGroup cancels a task that never ran

    async def serve_one() -> None:
        request = make_mocked_request("POST", "/v1/completions", app=server.app)
        with pytest.raises(asyncio.CancelledError):
            await admission_middleware(request, handler)

    server.call(serve_one)
    assert on_loop(server, lambda: admission.tenants.load(DEFAULT_TENANT)) == TenantLoad()
    assert_no_tenant_queued(server)


def test_the_share_applies_with_several_tenants_only() -> None:
    limits = ServerLimits(max_queued_requests=10, max_queued_tokens=1000,
                          max_queue_share_per_tenant=0.3)
    load = EngineLoad(queued_requests=4, queued_tokens=400, in_flight=5, drain_per_s=2.0)
    alone, shared = Admission(limits), Admission(limits, shared=True)
    alone.check_share(load, TenantLoad(requests=4, tokens=400), 10)  # the whole queue is its
    shared.check_share(load, TenantLoad(requests=2, tokens=200), 10)  # under 3 and 300
    shared.check_share(load, TenantLoad(), 999)  # nothing queued: admitted whatever its size
    with pytest.raises(APIError) as requests:
        shared.check_share(load, TenantLoad(requests=3, tokens=30), 10)
    # One of its 3 must leave; they are 3 of the 4 queued, so they drain at 3/4 of 2 a second.
    assert (requests.value.status, requests.value.code) == (429, "tenant_queue_full")
    assert requests.value.retry_after_s == 1
    with pytest.raises(APIError) as tokens:
        shared.check_share(load, TenantLoad(requests=1, tokens=290), 100)
    # 90 tokens over, at 290 a call: one call must leave, at 1/4 of 2 a second.
    assert tokens.value.retry_after_s == 2


def test_a_rounds_calls_count_as_many_against_both_bounds() -> None:
    limits = ServerLimits(max_queued_requests=10, max_queued_tokens=1000,
                          max_queue_share_per_tenant=0.5)
    admission = Admission(limits, shared=True)
    load = EngineLoad(queued_requests=7, queued_tokens=70, in_flight=8, drain_per_s=None)
    admission.check_queue(load, 30, count=3)  # 10 of 10: fits
    with pytest.raises(APIError) as queue:
        admission.check_queue(load, 40, count=4)  # 11 of 10
    assert queue.value.code == "queue_full"
    admission.check_share(load, TenantLoad(requests=2, tokens=20), 30, count=3)  # 5 of 5
    with pytest.raises(APIError) as share:
        admission.check_share(load, TenantLoad(requests=2, tokens=20), 40, count=4)  # 6 of 5
    assert share.value.code == "tenant_queue_full"


def test_what_a_tenant_holds_past_its_share_does_not_close_the_queue_to_others() -> None:
    """Tenant a, with nothing queued, was let in with a round of 40 calls (past its share of 5
    and the queue's 10): b, holding 1, is still admitted, as if a held its share alone."""
    limits = ServerLimits(max_queued_requests=10, max_queued_tokens=10_000,
                          max_queue_share_per_tenant=0.5)
    admission = Admission(limits, shared=True)
    admission.tenants.enter("b", "b-call", 10)
    for i in range(40):
        admission.tenants.enter("a", f"a-call-{i}", 10)
    load = EngineLoad(queued_requests=41, queued_tokens=410, in_flight=41, drain_per_s=None)
    excess = admission.tenants.excess(admission.share(), beside="b")
    assert excess == TenantLoad(requests=35, tokens=0)  # 400 tokens: within its 5,000
    admission.check_queue(load, 10, excess=excess)  # 41 - 35 + 1 = 7 of 10
    admission.check_share(load, admission.tenants.load("b"), 10)  # b: 2 of 5
    with pytest.raises(APIError) as alone:  # counted whole, the queue would be full
        admission.check_queue(load, 10)
    assert alone.value.code == "queue_full"
    # a itself is held to its share: its next call waits
    assert admission.tenants.excess(admission.share(), beside="a") == TenantLoad()
    with pytest.raises(APIError) as over:
        admission.check_share(load, admission.tenants.load("a"), 10)
    assert over.value.code == "tenant_queue_full"


def run_state(server: LiveServer, run: str) -> dict:
    reply = server.request("GET", f"/v1/runs/{run}", headers=A)
    assert reply.status == 200, reply.body
    return reply.json()


def test_an_abandoned_run_expires_frees_its_kv_its_quota_and_its_key(server) -> None:
    graph = server.post("/v1/graphs", {"name": "solo", "agents": [{"name": "x"}]},
                        headers=A).json()["id"]
    started = server.post("/v1/runs", {"graph_id": graph, "key": "thread"}, headers=A)
    assert started.status == 201, started.body
    run = started.json()["id"]
    attributed = chat(A, kvrt={"run": run, "agent": "x"})
    assert server.post("/v1/chat/completions", attributed, headers=A).status == 200
    assert run_state(server, run)["agents"][0]["kv"]["device_blocks"] > 0
    # The tenant's one run slot is taken.
    refused = server.post("/v1/runs", {"graph_id": graph}, headers=A)
    assert assert_error_shape(refused, 429)["param"] == "max_runs_per_tenant"

    deadline = time.monotonic() + IDLE_S + 5
    while (state := run_state(server, run))["status"] == "live":
        assert time.monotonic() < deadline, "the idle run never expired"
        time.sleep(0.1)
    assert state["status"] == "expired"
    assert state["agents"][0]["kv"]["device_blocks"] == 0  # released, as a DELETE does
    assert [r["status"] for r in server.request("GET", "/v1/runs", headers=A).json()["data"]
            ] == ["expired"]
    for reply in (server.post("/v1/chat/completions", attributed, headers=A),
                  server.post(f"/v1/runs/{run}/events", {"type": "agent.done", "agent": "x"},
                              headers=A)):
        assert assert_error_shape(reply, 409)["code"] == "run_expired"
    # Its key starts a fresh run, in the slot it freed.
    fresh = server.post("/v1/runs", {"graph_id": graph, "key": "thread"}, headers=A)
    assert fresh.status == 201 and fresh.json()["id"] != run, fresh.body
    closed = server.request("DELETE", f"/v1/runs/{run}", headers=A)
    assert closed.status == 200 and closed.json()["released_blocks"] == 0
    assert server.request("GET", f"/v1/runs/{run}", headers=A).status == 404
    assert server.request("DELETE", f"/v1/runs/{fresh.json()['id']}", headers=A).status == 200
    assert server.request("DELETE", f"/v1/graphs/{graph}", headers=A).status == 200
    wait_released(server)


def test_a_run_with_a_call_in_flight_does_not_expire(server) -> None:
    graph = server.post("/v1/graphs", {"name": "busy", "agents": [{"name": "x"}]},
                        headers=B).json()["id"]
    run = server.post("/v1/runs", {"graph_id": graph}, headers=B).json()["id"]

    async def long_call():
        async with aiohttp.ClientSession() as session:
            resp = await session.post(server.url + "/v1/completions", headers=B,
                                      json=completion(stream=True, kvrt={"run": run,
                                                                         "agent": "x"}))
            await anext(sse_events(resp))
            await asyncio.sleep(IDLE_S + 0.5)  # past the timeout, generating all along
            async with session.get(server.url + f"/v1/runs/{run}", headers=B) as state:
                body = await state.json()
            resp.close()
            return body

    state = asyncio.run(long_call())
    assert (state["status"], state["agents"][0]["state"]) == ("live", "generating")
    assert server.request("DELETE", f"/v1/runs/{run}", headers=B).status == 200
    assert server.request("DELETE", f"/v1/graphs/{graph}", headers=B).status == 200
    wait_released(server)


def test_a_run_of_more_agents_than_the_tenants_quota_is_too_large(server) -> None:
    def graph(headers: dict, count: int) -> str:
        spec = {"name": f"wide-{count}", "agents": [{"name": f"a{i}"} for i in range(count)]}
        return server.post("/v1/graphs", spec, headers=headers).json()["id"]

    wide, fits = graph(A, 4), graph(A, 3)
    refused = server.post("/v1/runs", {"graph_id": wide}, headers=A)
    error = assert_error_shape(refused, 413)
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_run_agents_per_tenant")
    assert "4 agents" in error["message"] and refused.headers.get("Retry-After") is None
    run = server.post("/v1/runs", {"graph_id": fits}, headers=A)
    assert run.status == 201, run.body
    # The other tenant's room is its own.
    theirs = server.post("/v1/runs", {"graph_id": graph(B, 3)}, headers=B)
    assert theirs.status == 201, theirs.body
    for headers, started in ((A, run), (B, theirs)):
        assert server.request("DELETE", f"/v1/runs/{started.json()['id']}",
                              headers=headers).status == 200
    for headers, graph_id in ((A, wide), (A, fits), (B, theirs.json()["graph_id"])):
        assert server.request("DELETE", f"/v1/graphs/{graph_id}", headers=headers).status == 200
