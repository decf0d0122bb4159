"""/metrics read back with prometheus_client's own text parser (an independent reader of the
format, not the code that wrote it): families typed, values and labels exact, histograms
consistent, and each app's figures its own."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from kvrt.runtime.engine.protocol import EngineStats, GenerateOutput
from kvrt.runtime.server.metrics import ServerMetrics
from tests.server.live_server import LiveServer, good_chat, start_run


def families(text: str) -> dict[str, tuple[str, dict[tuple[str, frozenset], float]]]:
    """family name -> (type, {(sample name, labels): value}); the parser raises on bad text."""
    out: dict[str, tuple[str, dict[tuple[str, frozenset], float]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in out, f"family {family.name} twice"
        samples = {(s.name, frozenset(s.labels.items())): s.value for s in family.samples}
        assert len(samples) == len(family.samples), f"duplicate sample in {family.name}"
        out[family.name] = (family.type, samples)
    return out


def scrape(server: LiveServer) -> dict[str, tuple[str, dict[tuple[str, frozenset], float]]]:
    reply = server.request("GET", "/metrics")
    assert reply.status == 200
    return families(reply.body.decode())


def sample(parsed, family: str, name: str | None = None, **labels: str) -> float:
    _, samples = parsed[family]
    return samples[(name or family, frozenset({"model_name": "tiny", **labels}.items()))]


def test_engine_figures_come_through_exactly() -> None:
    """Values the engine counted, and a model name that needs escaping, read back as sent."""
    name = 'odd "model"\\\nname'
    stats = EngineStats(running=3, waiting=5, kv_blocks_total=200, kv_blocks_in_use=60,
                        kv_blocks_cached=7, prefix_queries_tokens=1234, prefix_hits_tokens=99,
                        prompt_tokens=4321, generation_tokens=77, preemptions=2,
                        kv_blocks_pinned=10, kv_move_failures={"offload": 1, "upload": 0},
                        kv_decisions={"offload": 4, "keep: soon": 2},
                        segment_tokens=300, segment_reused_tokens=200)
    parsed = families(ServerMetrics(name).render(stats, 6).decode())
    want = {"model_name": name}

    def value(family: str, sample_name: str | None = None, **labels: str) -> float:
        return parsed[family][1][(sample_name or family, frozenset({**want, **labels}.items()))]

    assert parsed["kvrt:num_requests_running"][0] == "gauge"
    assert value("kvrt:num_requests_running") == 3
    assert value("kvrt:num_requests_waiting") == 5
    assert value("kvrt:kv_cache_usage_perc") == (60 - 10) / 200  # pinned blocks taken out
    assert value("kvrt:kv_cache_pinned_blocks") == 10
    assert value("kvrt:live_runs") == 6
    assert parsed["kvrt:prompt_tokens"][0] == "counter"
    assert value("kvrt:prompt_tokens", "kvrt:prompt_tokens_total") == 4321
    assert value("kvrt:prefix_cache_hits", "kvrt:prefix_cache_hits_total") == 99
    assert value("kvrt:kv_move_failures", "kvrt:kv_move_failures_total",
                 direction="offload") == 1
    assert value("kvrt:kv_tier_decisions", "kvrt:kv_tier_decisions_total",
                 decision="keep: soon") == 2
    assert value("kvrt:segment_kv_compression") == 300 / 100
    assert not [f for f in parsed if f.startswith("kvrt:tenant_")]  # not asked for


def test_observations_are_per_app_and_histograms_cumulative() -> None:
    """Two apps in one process (each its own registry) never share a sample; the buckets of
    what was observed are cumulative, counted at the right bounds."""
    first, second = ServerMetrics("tiny"), ServerMetrics("tiny")
    for seconds in (0.004, 0.3, 0.3, 9.0):
        first.observe_first_token(seconds)
    last = GenerateOutput(token_ids=[1], text="x", prompt_tokens=10, cached_tokens=4,
                          completion_tokens=3, finish_reason="length")
    with first.attributed_to("acme"):
        first.observe_finish(1.2, last)
    stats = EngineStats(0, 0, 10, 0, 0, 0, 0, 0, 0, 0)
    mine = families(first.render(stats, 0, {"acme": 1, "idle": 2}).decode())
    theirs = families(second.render(stats, 0).decode())

    ttft = "kvrt:time_to_first_token_seconds"
    assert mine[ttft][0] == "histogram"
    assert sample(mine, ttft, f"{ttft}_bucket", le="0.001") == 0
    assert sample(mine, ttft, f"{ttft}_bucket", le="0.005") == 1
    assert sample(mine, ttft, f"{ttft}_bucket", le="0.25") == 1
    assert sample(mine, ttft, f"{ttft}_bucket", le="0.5") == 3
    assert sample(mine, ttft, f"{ttft}_bucket", le="+Inf") == 4
    assert sample(mine, ttft, f"{ttft}_count") == 4
    assert math.isclose(sample(mine, ttft, f"{ttft}_sum"), 0.004 + 0.3 + 0.3 + 9.0)
    assert sample(theirs, ttft, f"{ttft}_count") == 0
    assert sample(mine, "kvrt:request_success", "kvrt:request_success_total",
                  finished_reason="length") == 1
    assert ("kvrt:request_success_total", frozenset({("model_name", "tiny"),
            ("finished_reason", "length")})) not in theirs["kvrt:request_success"][1]
    tokens = "kvrt:tenant_prompt_tokens"
    assert sample(mine, tokens, f"{tokens}_total", tenant="acme") == 10
    assert sample(mine, tokens, f"{tokens}_total", tenant="idle") == 0  # listed, with 0
    assert sample(mine, "kvrt:tenant_live_runs", tenant="idle") == 2
    # No `_created` series: each would be one more gauge family.
    assert not [f for f in mine if f.endswith("_created")]


def test_live_counters_move_by_what_the_calls_report(server: LiveServer) -> None:
    before = scrape(server)
    usages = [server.post("/v1/chat/completions", good_chat(max_tokens=3, ignore_eos=True))
              .json()["usage"] for _ in range(3)]
    run = start_run(server, "a")
    assert server.post(f"/v1/runs/{run}/events",
                       {"type": "tool_call.started", "agent": "a", "tool": "t"}).status == 200
    after = scrape(server)

    def delta(family: str, name: str | None = None, **labels: str) -> float:
        return sample(after, family, name, **labels) - sample(before, family, name, **labels)

    assert delta("kvrt:prompt_tokens", "kvrt:prompt_tokens_total") == sum(
        u["prompt_tokens"] for u in usages)
    assert delta("kvrt:generation_tokens", "kvrt:generation_tokens_total") == 9
    e2e = "kvrt:e2e_request_latency_seconds"
    assert delta(e2e, f"{e2e}_count") == 3
    assert sample(after, e2e, f"{e2e}_bucket", le="+Inf") == sample(after, e2e, f"{e2e}_count")
    assert sample(after, "kvrt:control_events", "kvrt:control_events_total",
                  type="tool_call.started") >= 1
    assert delta("kvrt:live_runs") == 1
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
