"""The `ttl` policy over a KV manager alone: what it pins on each event, for how long, and
everything that ends a pin early. `lru` pins nothing."""

from __future__ import annotations

import pytest

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.protocol import AgentEvent, Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.policy import make_policy, policy_names
from kvrt.runtime.policy.config import TTLConfig
from kvrt.runtime.policy.lru import LRUPolicy
from kvrt.runtime.policy.ttl import TTLPolicy, ttl_seconds

TTL = TTLConfig()

PLANNER, CODER = ("run-a", "planner"), ("run-a", "coder")


def _kv() -> KVManager:
    """Planner's KV is blocks 0, 1 (cached), the coder's block 2 (cached)."""
    kv = KVManager(num_blocks=8, block_size=4)
    for owner, tokens in ((PLANNER, list(range(8))), (CODER, list(range(100, 104)))):
        table = BlockTable(4, owner=owner)
        kv.grow(table, len(tokens))
        kv.key_full_blocks(table, tokens, len(tokens), b"")
        kv.free(table)
    return kv


def _started(owner, predicted_s: float | None = None) -> AgentEvent:
    return AgentEvent("tool_call.started", owner[0], owner[1], predicted_s)


def _call_of(owner) -> Sequence:
    request = GenerateRequest("r", [1, 2, 3], SamplingParams(), attribution=Attribution(*owner))
    return Sequence(request, BlockTable(4, owner=owner), arrival=0.0)


def _unattributed() -> Sequence:
    request = GenerateRequest("u", [1, 2, 3], SamplingParams())
    return Sequence(request, BlockTable(4), arrival=0.0)


def test_ttl_is_registered_and_orders_like_lru():
    assert policy_names() == ["kvrt", "kvrt-per-request", "lru", "lru-offload", "tokencake", "ttl"]
    policy = make_policy("ttl")
    assert isinstance(policy, TTLPolicy) and policy.name == "ttl"
    assert make_policy("lru").name == "lru"
    first, later = _call_of(PLANNER), _call_of(CODER)
    later.arrival = 1.0
    assert policy.admission_key(first) < policy.admission_key(later)
    assert policy.victim([first, later]) is later


@pytest.mark.parametrize(("predicted", "ttl"), [
    (2.0, 3.0), (40.0, TTL.max_s), (None, TTL.default_s), (0.0, TTL.default_s)])
def test_ttl_follows_the_prediction_with_a_margin_and_a_cap(predicted, ttl):
    assert TTL.margin == 1.5
    assert ttl_seconds(predicted) == ttl


def test_a_started_tool_pins_the_agents_kv_until_the_ttl_expires():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(PLANNER, 2.0), kv, now=100.0))
    assert kv.is_pinned(PLANNER) and not kv.is_pinned(CODER)
    assert [kv.pool.blocks[b].ref_count for b in (0, 1, 2)] == [1, 1, 0]
    assert policy.expiries == {PLANNER: 103.0}
    kv.check_integrity()
    carry_out(kv, policy.on_event(AgentEvent("tool_call.finished", *PLANNER), kv, now=101.0))
    carry_out(kv, policy.on_step(kv, now=102.9))
    assert kv.num_pinned() == 2  # a finished tool keeps the pin: the next call is near
    carry_out(kv, policy.on_step(kv, now=103.0))
    assert kv.num_pinned() == 0 and policy.expiries == {}
    assert kv.usage().cached == 3
    kv.check_integrity()


def test_a_second_start_keeps_the_later_expiry():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(PLANNER, 10.0), kv, now=0.0))  # until 15
    again = AgentEvent("tool_call.started", *PLANNER, 1.0)
    carry_out(kv, policy.on_event(again, kv, now=1.0))  # 2.5 < 15
    assert policy.expiries == {PLANNER: 15.0}
    carry_out(kv, policy.on_event(_started(PLANNER, 20.0), kv, now=2.0))  # 32 > 15
    assert policy.expiries == {PLANNER: 32.0}
    assert [kv.pool.blocks[b].ref_count for b in (0, 1)] == [1, 1]  # pinned once
    kv.check_integrity()


def test_the_agents_next_admitted_call_ends_its_pin_and_only_its_own():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(PLANNER), kv, now=0.0))
    carry_out(kv, policy.on_event(_started(CODER), kv, now=0.0))
    carry_out(kv, policy.on_admit(_call_of(("run-b", "planner")), kv))
    carry_out(kv, policy.on_admit(_unattributed(), kv))
    assert kv.num_pinned() == 3
    carry_out(kv, policy.on_admit(_call_of(PLANNER), kv))
    assert not kv.is_pinned(PLANNER) and kv.is_pinned(CODER)
    assert set(policy.expiries) == {CODER}
    kv.check_integrity()


def test_agent_done_ends_the_pin():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(CODER, 30.0), kv, now=0.0))
    carry_out(kv, policy.on_event(AgentEvent("agent.done", *CODER), kv, now=1.0))
    assert kv.num_pinned() == 0 and policy.expiries == {}
    kv.check_integrity()


def test_an_agent_without_kv_is_not_tracked():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(("run-a", "writer"), 1.0), kv, now=0.0))
    assert policy.expiries == {} and kv.num_pinned() == 0


def test_a_stall_releases_the_pin_that_expires_first():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(PLANNER, 10.0), kv, now=0.0))  # until 15
    carry_out(kv, policy.on_event(_started(CODER, 2.0), kv, now=0.0))  # until 3
    carry_out(kv, policy.on_stall(kv, now=1.0))
    assert kv.is_pinned(PLANNER) and not kv.is_pinned(CODER)
    carry_out(kv, policy.on_stall(kv, now=1.0))
    assert kv.num_pinned() == 0
    carry_out(kv, policy.on_stall(kv, now=1.0))  # nothing left: a no-op
    kv.check_integrity()


def test_a_run_ended_in_the_kv_manager_is_forgotten_on_the_next_tick():
    kv, policy = _kv(), TTLPolicy()
    carry_out(kv, policy.on_event(_started(PLANNER, 10.0), kv, now=0.0))
    kv.release_run("run-a")
    assert kv.num_pinned() == 0 and kv.usage().in_use == 0
    carry_out(kv, policy.on_step(kv, now=1.0))
    assert policy.expiries == {}
    kv.check_integrity()


def test_lru_pins_nothing():
    kv, policy = _kv(), LRUPolicy()
    carry_out(kv, policy.on_event(_started(PLANNER, 10.0), kv, now=0.0))
    carry_out(kv, policy.on_step(kv, now=0.0))
    carry_out(kv, policy.on_stall(kv, now=0.0))
    carry_out(kv, policy.on_admit(_call_of(PLANNER), kv))
    assert kv.num_pinned() == 0 and kv.usage().cached == 3
