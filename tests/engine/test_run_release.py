"""Per-agent KV accounting and ending a run, on the tiny model: which blocks hold whose KV,
what ending a run aborts and releases, and what it leaves to other runs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.protocol import (
    AgentResidency,
    Attribution,
    GenerateRequest,
    RunEnded,
    SamplingParams,
)
from tests.engine.helpers import greedy, make_engine, run

# Block size 16: the shared prefix fills blocks 0-2 of a fresh pool.
PREFIX = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(3)).tolist()


def _tokens(count: int, start: int) -> list[int]:
    return [3 + (start + i) % 400 for i in range(count)]


def _request(
    request_id: str, prompt: list[int], params: SamplingParams, run: str | None, agent: str | None
) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        params=params,
        attribution=Attribution(run=run, agent=agent),
    )


@pytest.fixture
def engine(tiny_checkpoint_dir):
    return make_engine(tiny_checkpoint_dir())


def _two_runs_share_a_prefix(engine) -> None:
    """A's planner leaves blocks 0-4 cached (0-2 the shared prefix); B's planner reuses 0-2."""
    planner = _request("a-planner", PREFIX + _tokens(32, 0), greedy(4), "A", "planner")
    run(engine, [planner])
    assert engine.kv.residency("A") == {"planner": AgentResidency(5, 0)}
    run(engine, [_request("b-planner", PREFIX + _tokens(5, 100), greedy(4), "B", "planner")])
    assert engine.kv.owners.block_ids() == {0, 1, 2, 3, 4}


def test_agents_sharing_a_prefix_are_counted_per_agent(engine):
    _two_runs_share_a_prefix(engine)
    coder = _request("a-coder", PREFIX + _tokens(20, 200), greedy(50), "A", "coder")
    engine.add(coder)
    engine.step()  # the coder's prefill: 48 tokens hit, 20 computed into two new blocks
    assert engine.kv.residency("A") == {
        "planner": AgentResidency(device_blocks=5, shared_blocks=3),
        "coder": AgentResidency(device_blocks=5, shared_blocks=3),
    }
    assert engine.kv_residency("B") == {"planner": AgentResidency(3, 3)}
    assert engine.live_attributions() == {"a-coder": Attribution("A", "coder")}
    engine.check_integrity()


def test_release_run_aborts_its_requests_and_releases_only_its_own_cached_blocks(engine):
    _two_runs_share_a_prefix(engine)
    live = [
        _request("a-coder", PREFIX + _tokens(20, 200), greedy(50), "A", "coder"),
        _request("a-anonymous", _tokens(10, 300), greedy(50), "A", None),
        _request("b-critic", PREFIX + _tokens(3, 400), greedy(50), "B", "critic"),
        _request("unattributed", _tokens(7, 500), greedy(50), None, None),
    ]
    for request in live:
        engine.add(request)
    engine.step()  # admitted in arrival order: the coder gets 7, 8; 9; the critic 10; 11
    engine.step()
    assert engine.kv.owners.block_ids() == {0, 1, 2, 3, 4, 7, 8, 10}
    release = engine.release_run("A")
    assert release.aborted == ["a-coder", "a-anonymous"]
    # Planner's blocks 3, 4 and the coder's full block; the coder's partial block was freed
    # (unkeyed) by the abort itself. 0-2 stay: B's planner owns them, B's critic reads them.
    assert release.released_blocks == 3
    assert engine.kv_residency("A") == {}
    assert engine.kv_residency("B") == {
        "planner": AgentResidency(device_blocks=3, shared_blocks=3),  # with the critic now
        "critic": AgentResidency(device_blocks=4, shared_blocks=3),
    }
    assert set(engine.live_attributions()) == {"b-critic", "unattributed"}
    assert engine.kv.owners.block_ids() == {0, 1, 2, 10}
    engine.check_integrity()
    _drain(engine)
    # A's planner asks again: what the release left cached is read again, all but the block
    # of the prompt's last token (always computed).
    again = _request("a-planner-2", PREFIX + _tokens(32, 0), greedy(2), "A", "planner")
    results = run(engine, [again])
    assert results["a-planner-2"].final.cached_tokens == 64
    # Block 3, adopted again (past B's prefix); block 4, of the last token, it recomputed and
    # left unkeyed (the cached block 4 was nobody's already).
    assert engine.release_run("A").released_blocks == 1
    assert engine.release_run("B").aborted == []
    assert engine.kv.owners.is_empty()
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()


def _drain(engine, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine did not finish in time")


def test_release_of_an_unknown_run_changes_nothing(engine):
    _two_runs_share_a_prefix(engine)
    before = engine.kv.usage()
    release = engine.release_run("nobody")
    assert (release.aborted, release.released_blocks) == ([], 0)
    assert engine.kv.usage() == before
    engine.check_integrity()


def test_async_release_run_ends_an_in_flight_stream_with_run_ended(tiny_checkpoint_dir):
    built = make_engine(tiny_checkpoint_dir())
    long = _request("a-long", PREFIX, greedy(400), "A", "planner")
    other = _request("b-short", PREFIX, greedy(4), "B", "planner")

    async def scenario() -> tuple[int, int, list[str | None]]:
        engine = AsyncEngine(built, "tiny")
        await engine.start()
        received = 0
        try:
            stream = engine.generate(long)
            async for _ in stream:
                received += 1
                if received == 3:
                    # The engine thread runs ahead of this loop: at least 48 + 2 positions.
                    [(agent, residency)] = engine.kv_residency("A").items()
                    assert (agent, residency.shared_blocks) == ("planner", 0)
                    assert residency.device_blocks >= 4
                    freed = await engine.release_run("A")
            raise AssertionError("the stream ended without RunEnded")
        except RunEnded as error:
            message = str(error)
        finally:
            # The engine is still up: other runs are served after the release.
            outputs = [o async for o in engine.generate(other)]
            await engine.wait_idle()
            # B read the prefix's first two blocks from what A's release left cached; the
            # third, holding its last token, it computed, and A's copy of it was cached already.
            assert engine.kv_residency("B") == {"planner": AgentResidency(2, 0)}
            await engine.stop()
        # With the engine thread gone, a release runs right here on the loop.
        assert await engine.release_run("B") == 2
        return freed, received, [message, outputs[-1].finish_reason]

    freed, received, [message, other_reason] = asyncio.run(scenario())
    assert message == "run A was ended"
    # Outputs emitted before the release still arrive, then RunEnded; the KV of the prompt and
    # of all but the last token emitted was computed, and every full block of it was released.
    assert received >= 3
    assert freed == (len(PREFIX) + received - 1) // 16
    assert other_reason == "length"
    assert built.kv_residency("A") == {}
    assert built.kv.owners.is_empty()
    assert built.live_attributions() == {}
    built.check_integrity()
