"""Two tenants on one daemon: each one's KV, graphs and runs are its own. The other tenant hits
none of its cache, and gets 404 for its graphs and runs (as for ids that do not exist)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.sdk import Client, Graph, KvrtError
from tests.server.live_server import LiveServer, Reply, assert_error_shape, live_server
from tests.server.test_server_metrics import parse_metrics

KEY_A, KEY_B, KEY_OP = "key-of-tenant-a", "key-of-tenant-b", "key-of-the-operator"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
OP = {"Authorization": f"Bearer {KEY_OP}"}


def system(topic: str) -> str:
    """A system prompt of several full KV blocks (block size 16), so that a repeated prompt
    has cached tokens to find; one topic per test, so no test finds another's."""
    return f"You answer questions about {topic}. " * 8


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, api_keys=((KEY_A, "a"), (KEY_B, "b")),
                           admin_keys=(KEY_OP,))


@pytest.fixture(scope="module")
def public_metrics(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, api_keys=((KEY_A, "a"),), admin_keys=(KEY_OP,),
                           metrics_public=True)


def chat(server: LiveServer, headers: dict[str, str], question: str, topic: str = "tenants",
         **extra: Any) -> Reply:
    body = {"messages": [{"role": "system", "content": system(topic)},
                         {"role": "user", "content": question}],
            "max_tokens": 2, "temperature": 0, **extra}
    return server.post("/v1/chat/completions", body, headers=headers)


def cached(reply: Reply) -> int:
    assert reply.status == 200, reply.body
    return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def graph_and_run(server: LiveServer, headers: dict[str, str]) -> tuple[str, str]:
    graph = server.post("/v1/graphs", {"name": "g", "agents": [{"name": "x"}, {"name": "y"}]},
                        headers=headers)
    assert graph.status == 201, graph.body
    run = server.post("/v1/runs", {"graph_id": graph.json()["id"], "key": "k"}, headers=headers)
    assert run.status == 201, run.body
    return graph.json()["id"], run.json()["id"]


def metric(server: LiveServer, name: str, tenant: str | None = None) -> float:
    """A sample of /metrics as the operator reads it (`tenant`: the one with that label)."""
    reply = server.request("GET", "/metrics", headers=OP)
    assert reply.status == 200, reply.body
    for line in reply.body.decode().splitlines():
        sample, _, value = line.rpartition(" ")
        labelled = ',tenant="' in sample
        if sample.startswith(name + "{") and (
                sample.endswith(f',tenant="{tenant}"}}') if tenant else not labelled):
            return float(value)
    raise AssertionError(f"{name} (tenant {tenant}) is not in /metrics")


def assert_kv_idle(server: LiveServer) -> None:
    async def settle() -> None:
        await server.engine.wait_idle()
        server.engine.engine.check_integrity()

    server.call(settle)
    assert metric(server, "kvrt:kv_cache_usage_perc") == 0.0


def test_a_tenant_never_hits_another_tenants_cache(server: LiveServer) -> None:
    question = "Who may read my KV blocks?"
    assert cached(chat(server, A, question)) == 0
    assert cached(chat(server, B, question)) == 0  # the same prompt, but A's KV
    assert cached(chat(server, A, question)) > 0  # the prompt is cacheable: A finds its own
    assert cached(chat(server, B, question)) > 0  # and B now finds its own copy
    tokens = {"prompt": list(range(40, 90)), "max_tokens": 1}
    first = server.post("/v1/completions", tokens, headers=A)
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    other = server.post("/v1/completions", tokens, headers=B)
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = server.post("/v1/completions", tokens, headers=A)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert_kv_idle(server)


def test_a_cache_salt_narrows_sharing_within_a_tenant(server: LiveServer) -> None:
    question, topic = "Does a cache salt split my cache?", "cache salts"
    assert cached(chat(server, A, question, topic)) == 0
    assert cached(chat(server, A, question, topic, cache_salt="alice")) == 0
    assert cached(chat(server, A, question, topic, cache_salt="alice")) > 0
    assert cached(chat(server, A, question, topic, cache_salt="bob")) == 0
    assert cached(chat(server, B, question, topic, cache_salt="alice")) == 0  # not across tenants
    assert cached(chat(server, A, question, topic)) > 0  # the unsalted copy is still there
    error = assert_error_shape(chat(server, A, question, topic, cache_salt=""), 400)
    assert error["param"] == "cache_salt"
    assert_kv_idle(server)


def test_another_tenants_graphs_and_runs_are_not_found(server: LiveServer) -> None:
    graph, run = graph_and_run(server, A)
    event = {"type": "tool_call.started", "agent": "x", "tool": "search"}
    round_body = {"shared": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                  "agents": {"x": {}}}
    as_b = [
        ("GET", f"/v1/graphs/{graph}", None, {}),
        ("DELETE", f"/v1/graphs/{graph}", None, {}),
        ("POST", "/v1/runs", {"graph_id": graph}, {}),
        ("POST", "/v1/runs", {"graph_id": graph, "key": "k"}, {}),
        ("GET", f"/v1/runs/{run}", None, {}),
        ("POST", f"/v1/runs/{run}/events", event, {}),
        ("POST", f"/v1/runs/{run}/rounds", round_body, {}),
        ("DELETE", f"/v1/runs/{run}", None, {}),
        ("POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
          "kvrt": {"run": run, "agent": "x"}}, {}),
        ("POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
         {"X-Kvrt-Run": run, "X-Kvrt-Agent": "x"}),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1,
                                     "kvrt": {"run": run, "agent": "x"}}, {}),
    ]
    for method, path, body, extra in as_b:
        reply = server.request(method, path, json_body=body, headers={**B, **extra})
        error = assert_error_shape(reply, 404)
        assert error["code"] in ("graph_not_found", "run_not_found"), (method, path, error)
        # Word for word what an id that does not exist gets: nothing tells B that it exists.
        missing = server.request(method, path.replace(graph, "graph-0").replace(run, "run-0"),
                                 json_body=_swap(body, graph, run), headers={**B, **_swap(
                                     extra, graph, run)})
        assert missing.json()["error"]["message"] == error["message"].replace(
            graph, "graph-0").replace(run, "run-0"), (method, path)
    assert graph not in ids(server.request("GET", "/v1/graphs", headers=B))
    assert run not in ids(server.request("GET", "/v1/runs", headers=B))
    assert run not in ids(server.request("GET", f"/v1/runs?graph_id={graph}", headers=B))
    # A's graph and run are untouched, and still A's.
    assert graph in ids(server.request("GET", "/v1/graphs", headers=A))
    assert run in ids(server.request("GET", "/v1/runs", headers=A))
    state = server.request("GET", f"/v1/runs/{run}", headers=A).json()
    assert state["event_count"] == 0 and all(a["calls"] == 0 for a in state["agents"])
    assert server.post(f"/v1/runs/{run}/events", event, headers=A).status == 200
    reply = chat(server, A, "hi", "runs", kvrt={"run": run, "agent": "x"})
    assert reply.status == 200, reply.body
    assert server.request("DELETE", f"/v1/runs/{run}", headers=A).status == 200
    assert server.request("DELETE", f"/v1/graphs/{graph}", headers=A).status == 200
    assert_kv_idle(server)


def test_each_tenant_lists_only_its_own(server: LiveServer) -> None:
    graph_a, run_a = graph_and_run(server, A)
    graph_b, run_b = graph_and_run(server, B)  # the same key "k", in B's own graph
    for headers, mine, theirs in ((A, (graph_a, run_a), (graph_b, run_b)),
                                  (B, (graph_b, run_b), (graph_a, run_a))):
        graphs = ids(server.request("GET", "/v1/graphs", headers=headers))
        runs = ids(server.request("GET", "/v1/runs?key=k", headers=headers))
        assert mine[0] in graphs and theirs[0] not in graphs
        assert mine[1] in runs and theirs[1] not in runs
    for headers, graph, run in ((A, graph_a, run_a), (B, graph_b, run_b)):
        assert server.request("DELETE", f"/v1/runs/{run}", headers=headers).status == 200
        assert server.request("DELETE", f"/v1/graphs/{graph}", headers=headers).status == 200


def test_the_sdk_client_calls_as_the_tenant_of_its_api_key(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url, api_key=KEY_B) as b, \
                Client(server.url, api_key=KEY_A) as a, Client(server.url) as nobody:
            graph = await b.create_graph(Graph("sdk").agent("x"))
            assert graph.id in [g.id for g in await b.list_graphs()]
            assert graph.id not in [g.id for g in await a.list_graphs()]
            with pytest.raises(KvrtError) as refused:
                await nobody.list_graphs()
            assert refused.value.status == 401
            await b.delete_graph(graph)

    asyncio.run(go())


def test_no_key_or_a_wrong_key_is_401_everywhere_but_health(server: LiveServer) -> None:
    routes = {(r.method, r.resource.canonical) for r in server._runner.app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert ("POST", "/v1/runs/{run_id}/rounds") in routes and ("GET", "/metrics") in routes
    for method, path in sorted(routes):
        concrete = path.replace("{graph_id}", "graph-0").replace("{run_id}", "run-0")
        for headers in ({}, {"Authorization": "Bearer not-a-key-at-all"},
                        {"Authorization": KEY_A}, {"Authorization": "Basic " + KEY_A}):
            reply = server.request(method, concrete, json_body={}, headers=headers)
            if path in ("/health", "/ui", "/ui/ui.js"):  # the view's page and script: no data
                assert reply.status == 200, reply.body
            else:
                error = assert_error_shape(reply, 401)
                assert error["type"] == "authentication_error", (method, path)
    assert server.request("GET", "/v1/models", headers=A).status == 200
    assert server.request("GET", "/v1/models").status == 401  # still refusing, still serving


def test_metrics_are_the_operators(server: LiveServer) -> None:
    """Every tenant's figures (cache hits, tokens, runs) say what the others do: a tenant's key
    does not open /metrics, an admin key does, and opens nothing else."""
    assert assert_error_shape(server.request("GET", "/metrics"), 401)["code"] == \
        "missing_api_key"
    for tenant in (A, B):
        error = assert_error_shape(server.request("GET", "/metrics", headers=tenant), 403)
        assert error["code"] == "admin_key_required" and "--admin-key" in error["message"]
    operator = server.request("GET", "/metrics", headers=OP)
    assert operator.status == 200, operator.body
    types, samples = parse_metrics(operator.body.decode())  # well-formed, no duplicate
    assert {name: kind for name, kind in types.items() if name.startswith("kvrt:tenant_")} == {
        "kvrt:tenant_live_runs": "gauge", "kvrt:tenant_request_success_total": "counter",
        "kvrt:tenant_prompt_tokens_total": "counter",
        "kvrt:tenant_prefix_cache_hits_total": "counter",
        "kvrt:tenant_generation_tokens_total": "counter"}
    assert {dict(labels).get("tenant") for name, labels in samples
            if name == "kvrt:tenant_live_runs"} == {"a", "b"}
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/graphs"), ("GET", "/v1/runs")):
        error = assert_error_shape(server.request(method, path, headers=OP), 403)
        assert error["code"] == "admin_key_not_a_tenant_key"
    assert server.request("GET", "/v1/models", headers=A).status == 200


def test_public_metrics_show_no_tenant_unless_the_operator_asks(
        public_metrics: LiveServer) -> None:
    for headers in ({}, A, {"Authorization": "Bearer not-a-key-at-all"}):
        reply = public_metrics.request("GET", "/metrics", headers=headers)
        assert reply.status == 200, reply.body
        assert b"kvrt:live_runs{" in reply.body and b"tenant=" not in reply.body
    operator = public_metrics.request("GET", "/metrics", headers=OP)
    assert b'kvrt:tenant_live_runs{model_name="tiny",tenant="a"} 0' in operator.body
    assert_error_shape(public_metrics.request("GET", "/v1/models"), 401)  # only /metrics


@pytest.fixture(scope="module")
def operator_only(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, admin_keys=(KEY_OP,))


def test_an_admin_key_alone_closes_metrics_and_leaves_the_api_open(
        operator_only: LiveServer) -> None:
    """No tenant keys: one tenant, an open API; the operator's key still guards /metrics."""
    assert_error_shape(operator_only.request("GET", "/metrics"), 401)
    reply = operator_only.request("GET", "/metrics", headers=OP)
    assert reply.status == 200 and b"tenant=" not in reply.body
    assert operator_only.request("GET", "/v1/models").status == 200


def test_per_tenant_figures_count_each_tenants_own_calls_and_runs(server: LiveServer) -> None:
    names = ("kvrt:tenant_request_success_total", "kvrt:tenant_prompt_tokens_total",
             "kvrt:tenant_prefix_cache_hits_total", "kvrt:tenant_generation_tokens_total",
             "kvrt:tenant_live_runs")
    before = {(name, t): metric(server, name, t) for name in names for t in "ab"}
    first = chat(server, A, "What do I count?", topic="per-tenant figures")
    second = chat(server, A, "What do I count?", topic="per-tenant figures")
    usages = [first.json()["usage"], second.json()["usage"]]
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0  # a hit to count
    _, run = graph_and_run(server, B)
    moved = {key: metric(server, *key) - value for key, value in before.items()}
    assert server.request("DELETE", f"/v1/runs/{run}", headers=B).status == 200
    assert moved == {
        ("kvrt:tenant_request_success_total", "a"): 2,
        ("kvrt:tenant_prompt_tokens_total", "a"): sum(u["prompt_tokens"] for u in usages),
        ("kvrt:tenant_prefix_cache_hits_total", "a"):
            sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages),
        ("kvrt:tenant_generation_tokens_total", "a"):
            sum(u["completion_tokens"] for u in usages),
        ("kvrt:tenant_live_runs", "a"): 0,
        ("kvrt:tenant_request_success_total", "b"): 0,
        ("kvrt:tenant_prompt_tokens_total", "b"): 0,
        ("kvrt:tenant_prefix_cache_hits_total", "b"): 0,
        ("kvrt:tenant_generation_tokens_total", "b"): 0,
        ("kvrt:tenant_live_runs", "b"): 1,
    }


def test_after_all_that_no_kv_is_held_and_the_pool_is_sound(server: LiveServer) -> None:
    assert_kv_idle(server)
    assert metric(server, "kvrt:live_runs") == 0


def ids(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.body
    return [item["id"] for item in reply.json()["data"]]


def _swap(value: Any, graph: str, run: str) -> Any:
    """`value` with A's ids replaced by ids that do not exist."""
    if isinstance(value, dict):
        return {k: _swap(v, graph, run) for k, v in value.items()}
    if value == graph:
        return "graph-0"
    return "run-0" if value == run else value


def test_an_authorization_header_that_is_not_utf8_is_a_401(server: LiveServer) -> None:
    """Raw bytes on the wire (no HTTP client sends them): a key that is not UTF-8 is no key."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as conn:
        conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: kvrt\r\n"
                     b"Authorization: Bearer \xff\xfe\xc3\x28key\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), response[:300]
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/v1/models", headers=A).status == 200  # still serving


@pytest.fixture(scope="module")
def quotas(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, api_keys=((KEY_A, "a"), (KEY_B, "b")),
                           control=ControlConfig(max_runs_per_tenant=1, max_graphs_per_tenant=1))


def test_past_its_quota_a_tenant_gets_429s_and_the_other_tenant_is_served(quotas) -> None:
    spec = {"name": "g", "agents": [{"name": "a"}]}
    graph = quotas.post("/v1/graphs", spec, headers=A)
    assert graph.status == 201, graph.body
    error = assert_error_shape(quotas.post("/v1/graphs", spec, headers=A), 429)
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_graphs_per_tenant")
    run = quotas.post("/v1/runs", {"graph_id": graph.json()["id"]}, headers=A)
    assert run.status == 201, run.body
    error = assert_error_shape(quotas.post("/v1/runs", {"graph_id": graph.json()["id"]},
                                           headers=A), 429)
    assert (error["code"], error["param"]) == ("quota_exceeded", "max_runs_per_tenant")
    assert "--max-runs-per-tenant" in error["message"]
    other = quotas.post("/v1/graphs", spec, headers=B)
    assert other.status == 201
    assert quotas.post("/v1/runs", {"graph_id": other.json()["id"]}, headers=B).status == 201
