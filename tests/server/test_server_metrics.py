"""/metrics (Prometheus text, counters that move), /openapi.json, /health."""

from __future__ import annotations

import math
import re

from tests.server.live_server import LiveServer, good_chat, start_run

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\})?'
                     r" (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """Prometheus text format 0.0.4 -> ({family: type}, {(name, labels): value}); fails on any
    line that is neither a comment nor a well-formed sample."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            name, labels, value = match.groups()
            key = (name, frozenset(_LABEL.findall(labels or "")))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(value)
    return types, samples


def scrape(server: LiveServer):
    reply = server.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(reply.body.decode())


def value(samples, name: str, **labels: str) -> float:
    want = frozenset({("model_name", "tiny"), *labels.items()})
    return samples.get((name, want), 0.0)


def test_metrics_expose_the_kvrt_families(server: LiveServer) -> None:
    types, samples = scrape(server)
    expected = {
        "kvrt:num_requests_running": "gauge",
        "kvrt:num_requests_waiting": "gauge",
        "kvrt:kv_cache_usage_perc": "gauge",
        "kvrt:kv_cache_pinned_blocks": "gauge",
        "kvrt:prefix_cache_queries_total": "counter",
        "kvrt:prefix_cache_hits_total": "counter",
        "kvrt:prompt_tokens_total": "counter",
        "kvrt:generation_tokens_total": "counter",
        "kvrt:request_success_total": "counter",
        "kvrt:time_to_first_token_seconds": "histogram",
        "kvrt:e2e_request_latency_seconds": "histogram",
    }
    assert expected.items() <= types.items()
    assert 0.0 <= value(samples, "kvrt:kv_cache_usage_perc") <= 1.0
    assert value(samples, "kvrt:time_to_first_token_seconds_bucket", le="+Inf") == value(
        samples, "kvrt:time_to_first_token_seconds_count")


def test_counters_move_with_requests(server: LiveServer) -> None:
    _, before = scrape(server)
    body = good_chat(max_tokens=5, ignore_eos=True,
                     messages=[{"role": "system", "content": "You are a helpful assistant. " * 4},
                               {"role": "user", "content": "What is two plus two?"}])
    usages = [server.post("/v1/chat/completions", body).json()["usage"] for _ in range(2)]
    _, after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kvrt:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("kvrt:generation_tokens_total") == 10
    assert delta("kvrt:prefix_cache_queries_total") >= usages[0]["prompt_tokens"]
    assert delta("kvrt:prefix_cache_hits_total") >= usages[1]["prompt_tokens_details"][
        "cached_tokens"] > 0
    assert delta("kvrt:request_success_total", finished_reason="length") == 2
    for histogram in ("kvrt:time_to_first_token_seconds", "kvrt:e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count") == 2
        assert delta(f"{histogram}_bucket", le="+Inf") == 2
        assert delta(f"{histogram}_sum") > 0
    assert value(after, "kvrt:num_requests_running") == 0
    assert value(after, "kvrt:kv_cache_usage_perc") == 0.0


def test_without_keys_there_is_one_tenant_and_no_tenant_label(server: LiveServer) -> None:
    """Per-tenant figures are for an operator telling tenants apart; with no keys there is one
    tenant, and /metrics is as it always was."""
    types, samples = scrape(server)
    assert not [name for name in types if name.startswith("kvrt:tenant_")]
    assert not [name for name, labels in samples if "tenant" in dict(labels)]


def test_histogram_buckets_are_cumulative(server: LiveServer) -> None:
    server.post("/v1/completions", {"prompt": "Once", "max_tokens": 2})
    _, samples = scrape(server)
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
        if name == "kvrt:e2e_request_latency_seconds_bucket"
    )
    assert buckets[-1][0] == math.inf
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] >= 1


def test_openapi_names_both_endpoints(server: LiveServer) -> None:
    reply = server.request("GET", "/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/chat/completions", "/v1/completions"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        name = ref["$ref"].rsplit("/", 1)[1]
        assert name in doc["components"]["schemas"]
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "max_tokens", "stream", "kvrt"} <= set(chat["properties"])
    assert "messages" in chat["required"]
    assert {"/v1/models", "/health", "/metrics"} <= set(doc["paths"])


def test_health(server: LiveServer) -> None:
    reply = server.request("GET", "/health")
    engine = server.config.engine  # the policy and host tier it serves with
    assert reply.status == 200 and reply.json() == {
        "status": "ok", "policy": engine.policy, "host_cache_bytes": engine.host_cache_memory,
        "replicas": None}  # one engine: no replicas to list


def test_control_plane_metrics_move_with_runs_and_events(server: LiveServer) -> None:
    _, before = scrape(server)
    run = start_run(server, "a")
    for kind in ("tool_call.started", "tool_call.finished"):
        reply = server.post(f"/v1/runs/{run}/events", {"type": kind, "agent": "a", "tool": "t"})
        assert reply.status == 200
    _, during = scrape(server)
    assert value(during, "kvrt:live_runs") == value(before, "kvrt:live_runs") + 1
    for kind in ("tool_call.started", "tool_call.finished"):
        assert value(during, "kvrt:control_events_total", type=kind) == value(
            before, "kvrt:control_events_total", type=kind) + 1
    count = "kvrt:control_event_seconds_count"
    assert value(during, count) == value(before, count) + 2
    assert value(during, "kvrt:control_event_seconds_sum") > 0
    server.request("DELETE", f"/v1/runs/{run}")
    assert value(scrape(server)[1], "kvrt:live_runs") == value(before, "kvrt:live_runs")


def test_openapi_documents_the_control_plane(server: LiveServer) -> None:
    doc = server.request("GET", "/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/v1/graphs"]) == {"get", "post"}
    assert set(paths["/v1/runs/{run_id}"]) == {"get", "delete"}
    events = paths["/v1/runs/{run_id}/events"]["post"]["requestBody"]["content"]
    kinds = {ref["$ref"].rsplit("/", 1)[1] for ref in events["application/json"]["schema"]["anyOf"]}
    assert kinds == {"ToolCallStarted", "ToolCallFinished", "AgentDone", "AgentWaiting",
                     "AgentResumed"}
    spec = doc["components"]["schemas"]["GraphSpec"]
    assert spec["properties"]["agents"]["maxItems"] == 4096
    rounds = paths["/v1/runs/{run_id}/rounds"]["post"]
    assert rounds["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RoundRequest")
    request = doc["components"]["schemas"]["RoundRequest"]
    assert {"shared", "agents"} <= set(request["required"])
    assert request["properties"]["agents"]["maxProperties"] == 4096
