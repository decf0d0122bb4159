"""Retention by next use under `tokencake`: the outlook's predicted next calls become retention
levels of the owners' blocks, so the device evicts the KV needed last first (not the least
recently used), levels move with the clock, and agent.done sends an agent's KV to the front."""

from __future__ import annotations

import pytest

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.policy.config import TokencakeConfig
from kvrt.runtime.policy.decisions import Retain
from kvrt.runtime.policy.next_use import retention_level
from kvrt.runtime.policy.tokencake import TokencakePolicy
from tests.kv.helpers import host_spec

BLOCK = 4


@pytest.mark.parametrize(("seconds", "level"), [
    (None, 0), (0.0, 7), (1.0, 7), (3.0, 6), (5.0, 6), (10.0, 5), (30.0, 4), (100.0, 3),
    (300.0, 3), (1000.0, 1), (float("inf"), 1)])
def test_the_sooner_the_next_call_the_higher_the_level(seconds, level) -> None:
    assert retention_level(seconds) == level


def cache(kv: KVManager, owner: tuple[str, str], first_token: int, blocks: int) -> set[int]:
    """A finished call of `owner` left `blocks` full blocks cached; returns their ids."""
    table = BlockTable(BLOCK, owner=owner)
    tokens = list(range(first_token, first_token + blocks * BLOCK))
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    kv.free(table)
    return kv.owners.blocks_of(owner)


def survivors(kv: KVManager, blocks: set[int]) -> set[int]:
    return {b for b in blocks if kv.pool.is_cached(b)}


def test_the_kv_needed_soonest_outlives_the_kv_used_last() -> None:
    """soon's KV is the least recently used, later's and done's more recent: LRU would evict
    soon's first. By next use, done's goes first, then later's; soon's stays."""
    kv = KVManager(12, BLOCK)
    policy = TokencakePolicy()
    soon = cache(kv, ("R", "soon"), 1, 3)
    later = cache(kv, ("R", "later"), 100, 3)
    done = cache(kv, ("R", "done"), 200, 3)
    carry_out(kv, policy.on_outlook("R", 30.0, {"soon": 10.5, "later": 400.0, "done": None},
                                    kv, now=10.0))
    assert policy.next_use.levels == {("R", "soon"): 7, ("R", "later"): 1, ("R", "done"): 0}
    taken = BlockTable(BLOCK, owner=("S", "new"))
    kv.grow(taken, 6 * BLOCK)  # 3 free blocks, then 3 evictions
    assert survivors(kv, done) == set() and survivors(kv, soon) == soon
    assert survivors(kv, later) == later
    kv.grow(taken, 8 * BLOCK)  # 2 more
    assert len(survivors(kv, later)) == 1 and survivors(kv, soon) == soon
    kv.free(taken)
    kv.check_integrity()


def test_levels_follow_the_clock_and_agent_done() -> None:
    kv = KVManager(8, BLOCK)
    policy = TokencakePolicy()
    cache(kv, ("R", "coder"), 1, 2)
    carry_out(kv, policy.on_outlook("R", 120.0, {"coder": 100.0}, kv, now=0.0))  # a tool of 100 s
    assert policy.next_use.levels[("R", "coder")] == 3
    assert list(policy.on_step(kv, now=50.0)) == [Retain(("R", "coder"), 4)]
    decisions = list(policy.on_step(kv, now=99.5))
    assert Retain(("R", "coder"), 7) in decisions
    done = AgentEvent("agent.done", "R", "coder")
    assert Retain(("R", "coder"), 0) in list(policy.on_event(done, kv, now=99.6))
    policy.on_run_end("R")
    assert policy.next_use.levels == {} and policy.next_use.due == {}


def test_without_next_use_retention_no_level_is_set() -> None:
    kv = KVManager(8, BLOCK)
    policy = TokencakePolicy(TokencakeConfig(retention="none"))
    cache(kv, ("R", "coder"), 1, 2)
    decisions = list(policy.on_outlook("R", 10.0, {"coder": 0.5}, kv, now=0.0))
    assert decisions == [] and list(policy.on_step(kv, now=1.0)) == []


def test_an_agent_due_within_the_horizon_gets_its_kv_back_from_the_host() -> None:
    """The coder's 3 blocks went to the host during its tool. Due in 5 s: beyond the horizon
    (1 s), nothing moves; due in 0.5 s: a Prefetch brings them back before the call."""
    kv = KVManager(12, BLOCK, host=host_spec(12, 8))
    policy = TokencakePolicy()
    tokens = list(range(1, 14))
    cache(kv, ("R", "coder"), 1, 3)
    assert kv.offload(("R", "coder")) == 3
    kv.host.wait()
    kv.finish_moves()
    assert kv.match_prefix(tokens, b"").block_ids == []
    carry_out(kv, policy.on_outlook("R", 20.0, {"coder": 5.0}, kv, now=0.0))
    carry_out(kv, policy.on_step(kv, now=0.1))
    assert policy.next_use.prefetches == 0 and not kv.host.in_flight()
    carry_out(kv, policy.on_step(kv, now=4.5))
    assert policy.next_use.prefetches == 1
    kv.host.wait()
    kv.finish_moves()
    assert len(kv.match_prefix(tokens, b"").block_ids) == 3
    carry_out(kv, policy.on_step(kv, now=4.6))
    assert policy.next_use.prefetches == 1  # nothing left on the host to bring
    kv.release_run("R")
    kv.check_integrity()


def test_a_prefetch_leaves_room_for_running_calls_to_grow() -> None:
    """9 of 12 blocks in use: bringing 3 back would leave none free for the running call."""
    kv = KVManager(12, BLOCK, host=host_spec(12, 8))
    policy = TokencakePolicy()
    cache(kv, ("R", "coder"), 1, 3)
    kv.offload(("R", "coder"))
    kv.host.wait()
    kv.finish_moves()
    running = BlockTable(BLOCK, owner=("S", "busy"))
    kv.grow(running, 9 * BLOCK)
    carry_out(kv, policy.on_outlook("R", 20.0, {"coder": 0.5}, kv, now=0.0))
    carry_out(kv, policy.on_step(kv, now=0.1))
    assert policy.next_use.prefetches == 0 and not kv.host.in_flight()
    kv.free(running)
    kv.check_integrity()
