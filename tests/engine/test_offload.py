"""The host tier under a real engine (tiny model): offload then upload returns bit-identical KV,
a request never reads a block in flight, a failed copy loses nothing, and greedy output is the
same whether the KV came from the device, the host or nowhere."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.protocol import Attribution, GenerateRequest
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.server.metrics import ServerMetrics
from tests.engine.helpers import greedy, make_engine, run

OWNER = ("run-1", "coder")
HOST = 4 * 1024**2


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return tiny_checkpoint_dir()


def call(request_id: str, prompt: list[int], max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(request_id, prompt, greedy(max_tokens),
                           attribution=Attribution(*OWNER))


def block_bytes(tiny) -> int:
    return 16 * load_checkpoint(str(tiny)).config.kv_bytes_per_token * 4  # float32


def prompt(length: int = 70) -> list[int]:
    return torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(7)).tolist()


def test_offload_then_upload_returns_bit_identical_kv_and_the_same_output(tiny) -> None:
    engine = make_engine(tiny, host_cache_memory=HOST)
    tokens = prompt()
    first = run(engine, [call("a", tokens)])["a"]
    device = sorted(engine.kv.owners.blocks_of(OWNER))
    keyed = [b for b in device if engine.kv.pool.is_cached(b)]
    before = engine.executor.kv_pool[keyed].clone()
    assert engine.kv.offload(OWNER) == len(keyed) > 0
    assert engine.kv.host is not None and engine.kv.host.wait() == len(keyed)
    assert engine.kv.match_prefix(tokens, b"").block_ids == []  # gone from the device
    second = run(engine, [call("b", tokens)])["b"]  # admission uploads them first
    assert second.token_ids == first.token_ids
    assert second.final.cached_tokens == first.final.cached_tokens + len(keyed) * 16
    uploaded = engine.kv.match_prefix(tokens, b"").block_ids[: len(keyed)]
    assert torch.equal(engine.executor.kv_pool[uploaded], before)
    stats = engine.stats()
    assert (stats.kv_blocks_offloaded, stats.kv_blocks_uploaded) == (len(keyed), len(keyed))
    engine.check_integrity()
    engine.close()


def test_a_request_never_reads_blocks_in_flight(tiny) -> None:
    """A slow copy keeps the prefix in flight while a request with that prompt runs: it must
    compute the prefix itself (nothing findable), and produce the uncached output."""
    reference = run(make_engine(tiny, prefix_caching=False), [call("r", prompt())])["r"]
    engine = make_engine(tiny, host_cache_memory=HOST)
    run(engine, [call("a", prompt())])
    assert engine.kv.host is not None
    release = threading.Event()
    pack = engine.kv.host.mover._pack

    def slow_pack(*args):
        release.wait(5)
        pack(*args)

    engine.kv.host.mover._pack = slow_pack
    moving = engine.kv.offload(OWNER)
    assert moving > 0 and engine.kv.usage().in_flight == moving
    during = run(engine, [call("b", prompt())])["b"]  # finishes while the copy waits
    assert during.token_ids == reference.token_ids
    assert during.final.cached_tokens == 0
    assert engine.kv.host.in_flight()
    release.set()
    engine.kv.host.wait()
    engine.check_integrity()
    engine.close()


def test_a_failed_copy_leaves_the_kv_on_the_device(tiny, caplog) -> None:
    """...and is a visible fault: logged with its reason, counted in the stats and /metrics."""
    engine = make_engine(tiny, host_cache_memory=HOST)
    tokens = prompt()
    first = run(engine, [call("a", tokens)])["a"]
    assert engine.kv.host is not None

    def broken(*_):
        raise RuntimeError("copy failed")

    engine.kv.host.mover._pack = broken
    cached = len(engine.kv.match_prefix(tokens, b"").block_ids)
    assert engine.kv.offload(OWNER) > 0
    with caplog.at_level(logging.ERROR, logger="kvrt.runtime.kv.tiers.host_tier"):
        engine.kv.host.wait()
    assert engine.kv.host.failed == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"KV offload of {cached} blocks failed: copy failed"]
    assert len(engine.kv.match_prefix(tokens, b"").block_ids) == cached
    again = run(engine, [call("b", tokens)])["b"]
    assert again.token_ids == first.token_ids and again.final.cached_tokens == cached * 16
    stats = engine.stats()
    assert stats.kv_blocks_offloaded == 0
    assert stats.kv_move_failures == {"offload": 1, "upload": 0}
    text = ServerMetrics("tiny").render(stats, 0).decode()
    [family] = [f for f in text_string_to_metric_families(text)
                if f.name == "kvrt:kv_move_failures"]
    assert {s.labels["direction"]: s.value for s in family.samples
            if s.name == "kvrt:kv_move_failures_total"} == {"offload": 1, "upload": 0}
    engine.check_integrity()
    engine.close()


def test_without_a_host_tier_nothing_moves(tiny) -> None:
    engine = make_engine(tiny)
    run(engine, [call("a", prompt())])
    assert engine.kv.host is None and engine.kv.offload(OWNER) == 0
    assert engine.stats().kv_move_failures == {"offload": 0, "upload": 0}
    engine.close()


def test_moves_run_off_the_engine_thread(tiny) -> None:
    engine = make_engine(tiny, host_cache_memory=HOST)
    run(engine, [call("a", prompt())])
    assert engine.kv.host is not None
    seen: list[str] = []
    pack = engine.kv.host.mover._pack
    engine.kv.host.mover._pack = lambda *a: (seen.append(threading.current_thread().name),
                                           pack(*a))[1]
    engine.kv.offload(OWNER)
    deadline = time.monotonic() + 5
    while engine.kv.host.in_flight() and time.monotonic() < deadline:
        engine.tick()
    assert seen and seen[0].startswith("kvrt-kv-offload") and not engine.kv.host.in_flight()
    engine.close()


def test_the_engine_thread_sleeps_while_a_call_waits_for_its_upload(tiny) -> None:
    """A call whose prefix is on the host waits for the upload to land before it runs. The
    engine thread must sleep meanwhile (until the landing, or a command), not step in a loop:
    a spinning thread takes a core from the server for the whole copy."""
    engine = make_engine(tiny, host_cache_memory=HOST)
    tokens = prompt()
    first = run(engine, [call("a", tokens)])["a"]
    assert engine.kv.host is not None and engine.kv.offload(OWNER) > 0
    engine.kv.host.wait()
    release = threading.Event()
    unpack = engine.kv.host.mover._unpack  # an upload's device-side kernel
    engine.kv.host.mover._unpack = lambda *args: (release.wait(5), unpack(*args))[1]
    steps = 0
    step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted_step

    async def scenario() -> tuple[list[int], int]:
        served = AsyncEngine(engine, "tiny")
        await served.start()
        try:
            stream = served.generate(call("b", tokens))
            waiting = asyncio.create_task(anext(stream))
            await asyncio.sleep(0.5)  # the upload is held: the call waits
            waited = steps
            release.set()
            token_ids = (await waiting).token_ids + [t for o in [o async for o in stream]
                                                     for t in o.token_ids]
            return token_ids, waited
        finally:
            await served.stop()

    token_ids, waited = asyncio.run(scenario())
    assert token_ids == first.token_ids  # it ran on the uploaded KV once it landed
    # Steps while held: the first, then one per IDLE_WAIT_S (0.05 s) at most; a spin is
    # thousands.
    assert 1 <= waited <= 15, waited
    engine.check_integrity()


def test_a_critical_agents_kv_survives_a_burst_that_evicts_it_under_lru(tiny) -> None:
    """Priority inversion: the critical-path agent's cached prefix against a burst of
    low-priority calls that need most of the pool. `lru` evicts it; `tokencake` keeps it, by
    retention (its next call is due in a second, the helpers are done: the outlook) or by a
    reservation (pinned: the critical path's)."""
    critical = prompt(64)  # 4 full blocks

    def survives(policy: str, **options: str) -> int:
        engine = make_engine(tiny, policy=policy, policy_options=options,
                             kv_cache_memory=16 * block_bytes(tiny))
        engine.set_outlook("run-1", 10.0, {"critical": 1.0} | {f"helper{i}": None
                                                               for i in range(5)})
        first = GenerateRequest("c", critical, greedy(2),
                                attribution=Attribution("run-1", "critical", priority=1.0))
        run(engine, [first])
        burst = [GenerateRequest(f"b{i}", [300 + i] + prompt(47)[1:], greedy(2),
                                 attribution=Attribution("run-1", f"helper{i}", priority=0.2))
                 for i in range(5)]
        # One after another, each leaves 3 blocks cached: the fifth finds none free.
        for request in burst:
            run(engine, [request])
        kept = len(engine.kv.match_prefix(critical, b"").block_ids)
        engine.check_integrity()
        engine.close()
        return kept

    assert survives("lru") == 0  # the oldest cached blocks went first
    # every block the next call can reuse (64 - 1 tokens)
    assert survives("tokencake") == 3
    assert survives("tokencake", retention="pins") == 3
    assert survives("tokencake", retention="none") == 0


def test_write_through_brings_an_evicted_prefix_back_from_the_host(tiny) -> None:
    """`tokencake` and `lru-offload` copy each block to the host once it is computed. A burst
    then evicts a helper's prefix from the device (it holds no reservation): its next call
    uploads the prefix, bit-identical, instead of computing it again, as it must under `lru`."""
    helper = prompt(64)  # 3 usable full blocks (the last token is always computed)

    def again(policy: str) -> tuple[int, list[int], int]:
        engine = make_engine(tiny, policy=policy, kv_cache_memory=16 * block_bytes(tiny),
                             host_cache_memory=HOST)
        attribution = Attribution("run-1", "helper", priority=0.2)
        first = run(engine, [GenerateRequest("h", helper, greedy(2), attribution=attribution)])
        assert engine.kv.host is not None
        engine.kv.host.wait()
        blocks = engine.kv.match_prefix(helper, b"").block_ids
        before = engine.executor.kv_pool[blocks].clone()
        for i in range(5):  # each leaves 3 blocks cached: the helper's go first
            burst = GenerateRequest(f"b{i}", [300 + i] + prompt(47)[1:], greedy(2),
                                    attribution=Attribution("run-1", f"other{i}", priority=0.2))
            run(engine, [burst])
        engine.kv.host.wait()
        assert engine.kv.match_prefix(helper, b"").block_ids == []  # evicted from the device
        second = run(engine, [GenerateRequest("h2", helper, greedy(2), attribution=attribution)])
        assert second["h2"].token_ids == first["h"].token_ids
        blocks = engine.kv.match_prefix(helper, b"").block_ids
        same = int(torch.equal(engine.executor.kv_pool[blocks], before)) if blocks else 0
        backed_up = engine.stats().kv_blocks_backed_up
        engine.check_integrity()
        engine.close()
        return second["h2"].final.cached_tokens, same, backed_up

    cached, _, backed_up = again("lru")
    assert (cached, backed_up) == (0, 0)
    for policy in ("tokencake", "lru-offload"):
        cached, same, backed_up = again(policy)
        assert cached == 48 and same == 1 and backed_up >= 3 + 5 * 3, policy
