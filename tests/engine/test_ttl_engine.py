"""The `ttl` policy in the engine, on the tiny model under memory pressure: agent A waits on a
tool while agent B's calls need the pool. Under `lru` B evicts A's cached KV; under `ttl` A's
KV stays pinned until the tool's time-to-live expires, then is evictable again. Time is a fake
clock the tests advance by hand."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.protocol import AgentEvent, Attribution, GenerateRequest
from kvrt.runtime.kv.owners import AgentResidency
from tests.engine.helpers import greedy, make_engine, run

BLOCK_BYTES = 16 * 192 * 4  # tiny model: 16 tokens x (2 x 3 layers x 2 heads x 16) x float32
POOL_BLOCKS = 10


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tokens(count: int, start: int) -> list[int]:
    return [3 + (start + i) % 400 for i in range(count)]


A_PROMPT = _tokens(64, 0)  # four full blocks
A_NEXT = A_PROMPT + _tokens(20, 300)  # A's next call: its first prompt, then the tool's result


def _call(request_id: str, prompt: list[int], agent: str, run_id: str = "R") -> GenerateRequest:
    return GenerateRequest(request_id, prompt, greedy(2), attribution=Attribution(run_id, agent))


def _started(agent: str, predicted_s: float | None) -> AgentEvent:
    return AgentEvent("tool_call.started", "R", agent, predicted_s)


@pytest.fixture(params=["lru", "ttl"])
def engine(request, tiny_checkpoint_dir):
    built = make_engine(tiny_checkpoint_dir(), policy=request.param,
                        kv_cache_memory=POOL_BLOCKS * BLOCK_BYTES)
    assert built.kv.pool.num_blocks == POOL_BLOCKS
    built.clock = Clock()
    return built


def _a_calls_then_waits_on_a_tool(engine, predicted_s: float | None = 2.0) -> None:
    """A's 64 + 2 tokens fill blocks 0-4; 0-3 stay cached (4 held no full block: freed)."""
    run(engine, [_call("a-1", A_PROMPT, "a")])
    assert engine.kv.residency("R") == {"a": AgentResidency(4, 0)}
    engine.notify(_started("a", predicted_s))
    engine.check_integrity()


def _b_traffic(engine) -> None:
    """Two calls of B, 80 + 2 tokens each (6 blocks); each leaves 5 cached. The second one
    needs more than the free blocks, so it evicts the oldest cached ones it may take."""
    engine.clock.now += 0.5
    run(engine, [_call("b-1", _tokens(80, 100), "b")])
    engine.clock.now += 0.5
    run(engine, [_call("b-2", _tokens(80, 200), "b")])


def test_a_waiting_agent_keeps_its_kv_under_ttl_and_loses_it_under_lru(engine):
    _a_calls_then_waits_on_a_tool(engine, predicted_s=2.0)  # ttl: 3 s
    pinned = 4 if engine.policy.name == "ttl" else 0
    assert engine.stats().kv_blocks_pinned == pinned
    assert [engine.kv.pool.blocks[b].ref_count for b in range(4)] == [pinned // 4] * 4
    _b_traffic(engine)
    engine.check_integrity()
    if pinned:  # b-2 took free block 4 and evicted b-1's blocks 5-9 instead of A's
        assert engine.kv.residency("R") == {"a": AgentResidency(4, 0), "b": AgentResidency(5, 0)}
        assert engine.stats().kv_blocks_in_use == 4
    else:  # b-2 took free block 4, evicted A's blocks 0-3, then b-1's block 5
        assert engine.kv.residency("R") == {"b": AgentResidency(9, 0)}
    engine.clock.now += 1.0  # 2 s after the start: the tool returns within its TTL
    engine.notify(AgentEvent("tool_call.finished", "R", "a"))
    results = run(engine, [_call("a-2", A_NEXT, "a")])
    assert results["a-2"].final.cached_tokens == (64 if pinned else 0)
    # Admitting A's next call ended the pin: nothing is pinned or in use now.
    stats = engine.stats()
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use, stats.preemptions) == (0, 0, 0)
    engine.check_integrity()


@pytest.mark.parametrize("engine", ["ttl"], indirect=True)
def test_after_the_ttl_expires_the_kv_is_evictable_again(engine):
    _a_calls_then_waits_on_a_tool(engine, predicted_s=2.0)
    engine.clock.now += 2.9
    engine.tick()
    assert engine.stats().kv_blocks_pinned == 4
    engine.clock.now += 0.1  # 3 s: the TTL is over
    engine.tick()
    stats = engine.stats()
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use, stats.kv_blocks_cached) == (0, 0, 4)
    assert all(engine.kv.pool.is_cached(b) for b in range(4))
    engine.check_integrity()
    _b_traffic(engine)
    assert engine.kv.residency("R") == {"b": AgentResidency(9, 0)}
    assert run(engine, [_call("a-2", A_NEXT, "a")])["a-2"].final.cached_tokens == 0


@pytest.mark.parametrize("engine", ["ttl"], indirect=True)
def test_a_tool_without_prediction_pins_for_the_default_ttl(engine):
    _a_calls_then_waits_on_a_tool(engine, predicted_s=None)
    assert engine.policy.expiries == {("R", "a"): engine.clock.now + 5.0}


@pytest.mark.parametrize("engine", ["ttl"], indirect=True)
def test_a_call_that_cannot_fit_beside_the_pins_releases_them(engine):
    _a_calls_then_waits_on_a_tool(engine, predicted_s=30.0)
    engine.add(_call("b-big", _tokens(120, 100), "b"))  # 122 tokens: 8 blocks; 6 allocatable
    assert engine.step() == []  # stalled: the stall released A's pin (30 s before its expiry)
    assert engine.stats().kv_blocks_pinned == 0 and engine.policy.expiries == {}
    [(request_id, output)] = engine.step()  # admitted now: free blocks 4-9, then A's 0 and 1
    assert (request_id, output.cached_tokens) == ("b-big", 0)
    assert engine.kv.residency("R")["a"] == AgentResidency(2, 0)
    [(_, last)] = engine.step()
    assert last.finish_reason == "length" and not engine.has_work()
    assert engine.stats().preemptions == 0
    engine.check_integrity()


@pytest.mark.parametrize("engine", ["ttl"], indirect=True)
def test_ending_the_run_drops_its_pins(engine):
    _a_calls_then_waits_on_a_tool(engine, predicted_s=30.0)
    assert engine.stats().kv_blocks_pinned == 4
    release = engine.release_run("R")
    assert (release.aborted, release.released_blocks) == ([], 4)
    stats = engine.stats()
    # Unpinned, the blocks stay cached (evictable) for a later prompt.
    assert (stats.kv_blocks_pinned, stats.kv_blocks_in_use, stats.kv_blocks_cached) == (0, 0, 4)
    assert engine.kv.owners.is_empty()
    engine.tick()  # the policy forgets the dropped pin
    assert engine.policy.expiries == {}
    engine.check_integrity()


@pytest.mark.parametrize("engine", ["ttl"], indirect=True)
def test_pins_expire_while_the_async_engine_is_idle(engine):
    clock = engine.clock

    async def scenario() -> None:
        async_engine = AsyncEngine(engine, "tiny")
        await async_engine.start()
        try:
            outputs = [o async for o in async_engine.generate(_call("a-1", A_PROMPT, "a"))]
            assert outputs[-1].finish_reason == "length"
            async_engine.notify(_started("a", 2.0))
            await async_engine.wait_idle()
            assert async_engine.stats().kv_blocks_pinned == 4
            await asyncio.sleep(0.2)  # idle ticks, still within the TTL
            assert async_engine.stats().kv_blocks_pinned == 4
            clock.now += 3.0  # no request comes: only the idle tick can expire the pin
            deadline = time.monotonic() + 5.0
            while async_engine.stats().kv_blocks_pinned and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert async_engine.stats().kv_blocks_pinned == 0
            await async_engine.wait_idle()
            engine.check_integrity()
        finally:
            await async_engine.stop()

    asyncio.run(scenario())
    assert engine.kv.usage().cached == 4
