"""Pushed priorities and outlooks in the engine, on the tiny model under `tokencake`:
`set_priorities` reorders the calls that wait (within a run, through the agent's slack off the
critical path), `set_outlook` orders the runs by their remaining work, reservations of agents
that leave the critical path end, and the tables go with the run. Time is a fake clock that
stands still (no aging)."""

from __future__ import annotations

import pytest

from kvrt.runtime.engine.protocol import Attribution, GenerateRequest
from tests.engine.helpers import greedy, make_engine, run

BLOCK_BYTES = 16 * 192 * 4  # tiny model: 16 tokens x (2 x 3 layers x 2 heads x 16) x float32


def _tokens(count: int, start: int) -> list[int]:
    return [3 + (start + i) % 400 for i in range(count)]


def _call(request_id: str, prompt: list[int], agent: str, priority: float) -> GenerateRequest:
    return GenerateRequest(request_id, prompt, greedy(2),
                           attribution=Attribution("R", agent, priority))


@pytest.fixture
def engine(tiny_checkpoint_dir):
    def make(pool_blocks: int):
        built = make_engine(tiny_checkpoint_dir(), policy="tokencake",
                            policy_options={"retention": "pins"},  # the reservations
                            kv_cache_memory=pool_blocks * BLOCK_BYTES)
        assert built.kv.pool.num_blocks == pool_blocks
        built.clock = lambda: 1000.0
        return built

    return make


def _first_outputs(engine) -> list[str]:
    """Steps the engine to the end; the request ids in the order of their first output."""
    order: list[str] = []
    while engine.has_work():
        order += [rid for rid, _ in engine.step() if rid not in order]
    engine.check_integrity()
    return order


@pytest.mark.parametrize("raised", [False, True])
def test_a_raised_priority_admits_the_call_that_was_lower_first(engine, raised: bool) -> None:
    """Two calls of 80 + 2 tokens (5 blocks to start, 6 at the end) in a pool of 8: one at a
    time. x was made at 0.3, y at 0.6; the push raises x to 0.9 while both wait."""
    engine = engine(8)
    engine.set_outlook("R", 10.0, {})
    engine.add(_call("x", _tokens(80, 0), "x", 0.3))
    engine.add(_call("y", _tokens(80, 100), "y", 0.6))
    if raised:
        engine.set_priorities("R", {"x": 0.9})
    assert _first_outputs(engine) == (["x", "y"] if raised else ["y", "x"])
    assert engine.stats().preemptions == 0


def test_an_unattributed_call_and_another_run_keep_their_stamps(engine) -> None:
    engine = engine(8)
    engine.set_outlook("R", 10.0, {})
    engine.set_outlook("S", 10.0, {})
    other = GenerateRequest("other", _tokens(80, 0), greedy(2),
                            attribution=Attribution("S", "x", 0.3))
    engine.add(other)
    engine.add(_call("y", _tokens(80, 100), "y", 0.6))
    engine.set_priorities("R", {"x": 0.9})  # run R's x, not run S's
    assert _first_outputs(engine) == ["y", "other"]


def test_the_run_with_less_work_left_goes_first_whatever_came_first(engine) -> None:
    engine = engine(8)
    engine.set_outlook("R", 60.0, {"x": 0.0})
    engine.set_outlook("S", 5.0, {"x": 0.0})
    engine.add(_call("long", _tokens(80, 0), "x", 1.0))
    engine.add(GenerateRequest("short", _tokens(80, 100), greedy(2),
                               attribution=Attribution("S", "x", 1.0)))
    assert engine.priorities.remaining(("S", "x")) == 5.0
    assert _first_outputs(engine) == ["short", "long"]
    engine.release_run("S")
    assert engine.priorities.remaining(("S", "x")) is None
    assert engine.priorities.remaining(("R", "x")) == 60.0


def test_a_reservation_whose_priority_falls_off_the_critical_path_is_released(engine) -> None:
    """16 blocks: reservations may pin 4. c (1.0, on the critical path) keeps its 2 full
    blocks reserved after its call; pushed down to 0.5, it loses them. d (0.5) is not reserved;
    pushed up to 1.0, nothing is pinned until its next call finishes, which reads 1.0 from the
    table although that call was stamped 0.5."""
    engine = engine(16)
    run(engine, [_call("c-1", _tokens(32, 0), "c", 1.0), _call("d-1", _tokens(32, 100), "d", 0.5)])
    policy = engine.policy
    assert engine.stats().kv_blocks_pinned == 2 and engine.kv.is_pinned(("R", "c"))
    assert policy.reserved == {("R", "c"): 1.0}

    engine.set_priorities("R", {"c": 0.995})  # still on it: the reservation follows
    assert policy.reserved == {("R", "c"): 0.995} and engine.stats().kv_blocks_pinned == 2

    engine.set_priorities("R", {"c": 0.5, "d": 1.0})
    assert engine.stats().kv_blocks_pinned == 0 and not engine.kv.is_pinned(("R", "c"))
    assert policy.reserved == {} and policy.lent == {} and ("R", "c") not in policy.deadlines
    assert policy.kv_decisions() == {"release:priority": 1}
    assert policy.kv_decisions_of("R") == {"c": "release:priority"}
    assert not engine.kv.is_pinned(("R", "d"))  # risen, but not pinned now
    engine.check_integrity()

    run(engine, [_call("d-2", _tokens(32, 200), "d", 0.5)])
    assert engine.kv.is_pinned(("R", "d")) and policy.reserved == {("R", "d"): 1.0}
    engine.check_integrity()


def test_a_lent_reservation_follows_its_priority_too(engine) -> None:
    engine = engine(16)
    run(engine, [_call("c-1", _tokens(32, 0), "c", 1.0)])
    policy = engine.policy
    policy.lent[("R", "c")] = policy.reserved.pop(("R", "c"))  # as _fit_reservations lends it
    engine.kv.unpin(("R", "c"))
    engine.set_priorities("R", {"c": 0.2})
    assert policy.lent == {} and ("R", "c") not in policy.deadlines
    engine.tick()  # a lent one that is over is not reclaimed
    assert engine.stats().kv_blocks_pinned == 0 and policy.reserved == {}
    engine.check_integrity()


def test_the_runs_priorities_go_with_it(engine) -> None:
    engine = engine(8)
    engine.set_priorities("R", {"x": 0.9, "y": 0.1})
    engine.set_priorities("S", {"x": 0.4})
    engine.set_priorities("R", {"y": 0.2})
    assert engine.priorities.of_run("R") == {"x": 0.9, "y": 0.2}
    engine.add(_call("x", _tokens(80, 0), "x", 0.3))
    engine.release_run("R")
    assert engine.priorities.of_run("R") == {} and engine.priorities.of_run("S") == {"x": 0.4}
    assert not engine.has_work()
    engine.check_integrity()
