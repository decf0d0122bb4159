"""When predictive uploads land against the tool's actual return: the recorder on hand-made
times, and the engine (tiny model, `tokencake`, a host tier, a fake clock) timing a real one."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvrt.runtime.engine.landing import LANDING_BUCKETS, LandingSample, UploadLandings
from kvrt.runtime.engine.protocol import AgentEvent, Attribution, EngineStats, GenerateRequest
from kvrt.runtime.kv.owners import AgentResidency
from kvrt.runtime.server.metrics import ServerMetrics
from tests.engine.helpers import greedy, make_engine, run

A, B = ("R", "a"), ("R", "b")
BLOCK_BYTES = 16 * 192 * 4  # tiny model: 16 tokens x (2 x 3 layers x 2 heads x 16) x float32
POOL_BLOCKS = 10
TICK_S = 0.05


def test_a_sample_needs_both_the_landing_and_the_return_in_either_order() -> None:
    landings = UploadLandings(keep=2)
    landings.planned(A, due=10.0)
    landings.landed(A, 9.75)
    assert landings.stats().recent == ()  # the tool has not returned yet
    landings.returned(A, 10.25)  # late tool: the upload was in time by 0.5 s
    landings.planned(B, due=20.0)
    landings.returned(B, 19.0)  # early: one second before its prediction
    landings.landed(B, 19.5)
    landings.returned(("R", "unwatched"), 5.0)  # no upload planned for it: nothing kept
    landings.planned(("S", "gone"), due=1.0)
    landings.forget_run("S")
    landings.landed(("S", "gone"), 0.5)
    stats = landings.stats()
    assert stats.recent == (LandingSample(-0.5, False, -0.25), LandingSample(0.5, True, -0.5))
    assert (stats.count, stats.sum_s, stats.early_returns) == (1, -0.5, 1)
    # -0.5 falls in the bucket (-1.0, -0.5]: the third of LANDING_BUCKETS.
    assert LANDING_BUCKETS[2] == -0.5 and stats.bucket_counts[2] == 1
    assert sum(stats.bucket_counts) == 1
    landings.planned(A, due=30.0)
    landings.returned(A, 31.0)
    landings.landed(A, 30.5)  # keeps two: the first one goes
    assert landings.stats().recent == (LandingSample(0.5, True, -0.5),
                                       LandingSample(-0.5, False, 0.5))


def test_metrics_expose_the_landing_histogram() -> None:
    landings = UploadLandings()
    for landed, returned in ((9.98, 10.0), (10.02, 10.0), (10.0, 10.0)):
        landings.planned(A, due=10.0)
        landings.landed(A, landed)
        landings.returned(A, returned)
    stats = EngineStats(0, 0, 10, 0, 0, 0, 0, 0, 0, 0, upload_landing=landings.stats())
    text = ServerMetrics("m").render(stats, 0).decode()
    samples = {(s.name, s.labels.get("le")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("model_name") == "m"}
    name = "kvrt:kv_upload_landing_seconds"
    assert samples[f"{name}_bucket", "-0.025"] == 0
    assert samples[f"{name}_bucket", "-0.01"] == 1  # 20 ms early
    assert samples[f"{name}_bucket", "0.0"] == 2  # and the exact landing
    assert samples[f"{name}_bucket", "0.025"] == 3
    assert samples[f"{name}_count", None] == 3
    assert samples["kvrt:kv_upload_early_returns_total", None] == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tokens(count: int, start: int) -> list[int]:
    return [3 + (start + i) % 400 for i in range(count)]


def _call(request_id: str, prompt: list[int], agent: str) -> GenerateRequest:
    return GenerateRequest(request_id, prompt, greedy(2), attribution=Attribution("R", agent))


@pytest.fixture
def engine(tiny_checkpoint_dir):
    """B's call leaves 5 cached blocks, then A's leaves 4 (both written through to the host):
    one block of ten is free, so A's tool start is under pressure."""
    built = make_engine(tiny_checkpoint_dir(), policy="tokencake",
                        kv_cache_memory=POOL_BLOCKS * BLOCK_BYTES,
                        host_cache_memory=4 * POOL_BLOCKS * BLOCK_BYTES)
    built.clock = Clock()
    run(built, [_call("b-1", _tokens(80, 100), "b")])
    run(built, [_call("a-1", _tokens(64, 0), "a")])
    assert built.kv.host is not None
    built.kv.host.wait()  # the write-through copies have landed
    assert built.kv.residency("R") == {"a": AgentResidency(4, 0, 4), "b": AgentResidency(5, 0, 5)}
    yield built
    built.close()


def _tick_until_uploading(engine) -> float:
    """Ticks every TICK_S until the policy starts A's upload; returns that tick's clock."""
    while not engine.kv.moves_in_flight():
        engine.clock.now += TICK_S
        engine.tick()
        assert engine.clock.now < 1011.0, "the upload never started"
    return engine.clock.now


def test_the_engine_times_a_predictive_upload_against_the_tools_finish(engine) -> None:
    engine.tick()
    engine.notify(AgentEvent("tool_call.started", "R", "a", 10.0))  # back at 1010.0
    assert engine.policy.decisions == {"offload": 1}
    started = _tick_until_uploading(engine)
    # The lead covers two ticks besides the copy and the 50 ms margin: it starts by 1009.85.
    assert 1009.7 < started <= 1009.85 + 1e-9
    engine.kv.host.wait()  # the copy is done: the next tick completes the move
    engine.clock.now += TICK_S
    engine.tick()
    landed = engine.clock.now
    assert engine.stats().upload_landing.recent == ()  # the tool has not returned
    engine.clock.now = 1010.25  # the tool returns 250 ms late
    engine.notify(AgentEvent("tool_call.finished", "R", "a"))
    stats = engine.stats().upload_landing
    assert stats.recent == (LandingSample(pytest.approx(landed - 1010.25), False,
                                          pytest.approx(landed - 1010.0)),)
    assert stats.recent[0].landed_after_s < 0 and stats.count == 1
    engine.check_integrity()


def test_a_tool_that_returns_before_the_planned_upload_leaves_no_sample(engine) -> None:
    """Its finish uploads the KV at once: not a predictive upload, nothing to time."""
    engine.tick()
    engine.notify(AgentEvent("tool_call.started", "R", "a", 10.0))
    engine.clock.now += 2.0
    engine.notify(AgentEvent("tool_call.finished", "R", "a"))
    assert engine.kv.moves_in_flight()
    engine.kv.host.wait()
    engine.clock.now += TICK_S
    engine.tick()
    stats = engine.stats()
    assert stats.kv_blocks_uploaded == 4 and stats.upload_landing.recent == ()


def test_an_early_return_after_the_upload_started_is_counted_apart(engine) -> None:
    engine.tick()
    engine.notify(AgentEvent("tool_call.started", "R", "a", 10.0))
    _tick_until_uploading(engine)
    engine.clock.now = 1009.95  # before the predicted 1010.0, the upload still copying
    engine.notify(AgentEvent("tool_call.finished", "R", "a"))
    engine.kv.host.wait()
    engine.clock.now = 1010.0
    engine.tick()
    stats = engine.stats().upload_landing
    assert stats.recent == (LandingSample(pytest.approx(0.05), True, pytest.approx(0.0)),)
    assert (stats.early_returns, stats.count) == (1, 0)
