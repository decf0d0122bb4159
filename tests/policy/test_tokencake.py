"""The `tokencake` policy with a fake clock over a KV manager with a host tier and a real mover
(small CPU tensors): its offload decisions on constructed cases, the predictive upload, and
priority-ordered admission and victims."""

from __future__ import annotations

import pytest
import torch

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.priorities import Priorities
from kvrt.runtime.engine.protocol import AgentEvent, Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import HostSpec, KVManager
from kvrt.runtime.kv.tiers.host_tier import HostTier
from kvrt.runtime.kv.tiers.mover import BlockMover
from kvrt.runtime.policy.config import TokencakeConfig
from kvrt.runtime.policy.tokencake import TokencakePolicy

CODER, OTHER = ("run-a", "coder"), ("run-a", "other")
BLOCKS, BLOCK = 8, 4
CONFIG = TokencakeConfig(prior_bandwidth=1e6, copy_latency_s=0.01, upload_lead_s=0.05)


def setup(pressure: bool, running: bool = False
          ) -> tuple[TokencakePolicy, KVManager, HostTier, BlockTable]:
    """The coder holds 2 cached blocks. Under pressure the other 6 hold another agent's KV:
    cached (idle), or in use by its running call (`running`)."""
    shape = (1, 2, BLOCK, 1, 8)  # layers, K/V, rows, heads, dim: 256 bytes a block
    device = torch.randn((BLOCKS, *shape))
    mover = BlockMover(device, torch.zeros((BLOCKS, *shape)))
    kv = KVManager(BLOCKS, BLOCK, host=HostSpec(BLOCKS, mover))
    assert kv.host is not None
    moves = kv.host
    table = BlockTable(BLOCK, owner=CODER)
    tokens = list(range(1, 10))
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    kv.free(table)
    other = BlockTable(BLOCK, owner=OTHER)
    if pressure:
        kv.grow(other, 6 * BLOCK)
        if not running:
            kv.key_full_blocks(other, list(range(100, 100 + 6 * BLOCK)), 6 * BLOCK, b"")
            kv.free(other)
    return TokencakePolicy(CONFIG), kv, moves, other


def started(predicted_s: float | None) -> AgentEvent:
    return AgentEvent("tool_call.started", *CODER, predicted_s)


def test_a_long_tool_under_pressure_offloads_and_the_upload_lands_before_it_returns() -> None:
    policy, kv, moves, _ = setup(pressure=True)
    blocks = sorted(kv.owners.blocks_of(CODER))
    carry_out(kv, policy.on_event(started(10.0), kv, now=100.0))
    assert policy.decisions == {"offload": 1}
    # No copy observed yet when it decided: the prior bandwidth priced the upload.
    copy = CONFIG.copy_latency_s + 2 * moves.mover.block_bytes / CONFIG.prior_bandwidth
    upload_at = 100.0 + 10.0 - copy - CONFIG.upload_lead_s
    assert policy.away[CODER] == pytest.approx(upload_at)
    moves.wait()
    assert kv.owners.blocks_of(CODER) == set() and kv.host.tiers.host.usage().cached == 2
    carry_out(kv, policy.on_step(kv, now=upload_at - 0.01))
    assert not moves.in_flight()  # not yet
    carry_out(kv, policy.on_step(kv, now=upload_at))
    assert moves.in_flight()  # the others' KV is idle: room for the upload
    moves.wait()
    assert kv.host.tiers.uploaded_blocks == 2 and len(blocks) == 2
    assert upload_at + copy <= 110.0 - CONFIG.upload_lead_s + 1e-9  # resident before the return
    kv.check_integrity()


def test_the_upload_waits_while_running_calls_need_the_room() -> None:
    """The other agent's call is running: uploading the coder's KV back into the two blocks
    the offload freed would leave its growth nothing. The upload waits until there is room."""
    policy, kv, moves, other = setup(pressure=True, running=True)
    carry_out(kv, policy.on_event(started(10.0), kv, now=0.0))
    assert policy.decisions == {"offload": 1}
    moves.wait()
    carry_out(kv, policy.on_step(kv, now=10.0))
    assert not moves.in_flight() and CODER in policy.away
    kv.free(other)  # the other call finished
    carry_out(kv, policy.on_step(kv, now=10.1))
    moves.wait()
    assert kv.host.tiers is not None and kv.host.tiers.uploaded_blocks == 2 and policy.away == {}
    kv.check_integrity()


def test_a_short_tool_keeps_its_kv() -> None:
    policy, kv, moves, _ = setup(pressure=True)
    # Round trip: 2 x (10 ms + 512 B / 1 MB/s) = 21 ms; the margin wants 2x that.
    carry_out(kv, policy.on_event(started(0.03), kv, now=0.0))
    assert policy.decisions == {"keep:short_tool": 1} and not moves.in_flight()
    assert len(kv.owners.blocks_of(CODER)) == 2


def test_no_pressure_keeps_even_for_a_long_tool() -> None:
    policy, kv, moves, _ = setup(pressure=False)
    carry_out(kv, policy.on_event(started(60.0), kv, now=0.0))
    assert policy.decisions == {"keep:no_pressure": 1} and not moves.in_flight()


def test_an_agent_with_nothing_cached_or_no_host_tier_keeps() -> None:
    policy, kv, _, _ = setup(pressure=True)
    nobody = AgentEvent("tool_call.started", "run-a", "nobody", 60.0)
    carry_out(kv, policy.on_event(nobody, kv, now=0.0))
    no_host = KVManager(BLOCKS, BLOCK)
    carry_out(no_host, policy.on_event(started(60.0), no_host, now=0.0))
    assert policy.decisions == {"keep:nothing_cached": 1, "keep:no_host_tier": 1}


def test_a_tool_that_returns_early_brings_the_kv_back_at_once() -> None:
    policy, kv, moves, _ = setup(pressure=True)
    carry_out(kv, policy.on_event(started(30.0), kv, now=0.0))
    moves.wait()
    carry_out(kv, policy.on_event(AgentEvent("tool_call.finished", *CODER), kv, now=2.0))
    moves.wait()
    assert kv.host.tiers.uploaded_blocks == 2 and policy.away == {}
    kv.check_integrity()


def test_an_early_return_while_the_offload_is_still_copying_uploads_once_it_lands() -> None:
    policy, kv, moves, _ = setup(pressure=True)
    carry_out(kv, policy.on_event(started(30.0), kv, now=0.0))
    carry_out(kv, policy.on_event(AgentEvent("tool_call.finished", *CODER), kv, now=0.001))
    if moves.in_flight():  # the copy had not landed: the upload waits for the next step
        moves.wait()
        carry_out(kv, policy.on_step(kv, now=0.002))
    moves.wait()
    assert kv.host.tiers.uploaded_blocks == 2 and policy.away == {}


def call(priority: float, arrival: float, order: int, run: str = "run",
         remaining_s: float | None = None) -> Sequence:
    request = GenerateRequest(f"r{order}", [1, 2, 3], SamplingParams(),
                              attribution=Attribution(run, f"a{order}", priority))
    priorities = Priorities()
    if remaining_s is not None:
        priorities.set_remaining(run, remaining_s)
    return Sequence(request, BlockTable(BLOCK, owner=(run, f"a{order}")), arrival=arrival,
                    order=order, priorities=priorities)


WITHIN_RUNS = TokencakeConfig(cross_run=False)


def test_admission_and_victims_follow_priority_then_arrival() -> None:
    policy = TokencakePolicy(WITHIN_RUNS)
    low_early, high_late, high_later = call(0.2, 1.0, 0), call(1.0, 2.0, 1), call(1.0, 3.0, 2)
    ordered = sorted([low_early, high_later, high_late], key=policy.admission_key)
    assert ordered == [high_late, high_later, low_early]
    assert policy.victim([high_late, low_early, high_later]) is low_early
    assert policy.victim([high_late, high_later]) is high_later


def test_a_waiting_call_ages_past_more_important_newcomers() -> None:
    policy = TokencakePolicy(TokencakeConfig(cross_run=False, aging_per_s=0.01))
    old_low = call(0.2, 0.0, 0)
    kv = KVManager(4, BLOCK)
    carry_out(kv, policy.on_step(kv, now=50.0))  # waited 50 s: 0.2 + 0.5
    assert sorted([call(1.0, 49.0, 1), old_low], key=policy.admission_key)[0] is not old_low
    carry_out(kv, policy.on_step(kv, now=90.0))  # waited 90 s: 0.2 + 0.9 > 1.0 + 0.001
    newcomer = call(1.0, 89.9, 2)
    assert sorted([newcomer, old_low], key=policy.admission_key) == [old_low, newcomer]


def test_across_runs_the_run_closest_to_done_goes_first_and_yields_last() -> None:
    policy = TokencakePolicy(TokencakeConfig(aging=0.0))
    long_early = call(1.0, 0.0, 0, "long", remaining_s=100.0)
    short_late = call(1.0, 5.0, 1, "short", remaining_s=10.0)
    # Off the critical path of the short run: its slack (10 x (1 - 0.5) = 5 s) counts, and it
    # still goes before the long run's critical call.
    short_slack = call(0.5, 6.0, 2, "short", remaining_s=10.0)
    one_off = call(0.0, 7.0, 3, "plain")  # unattributed-like: no outlook, a run of one call
    ordered = sorted([long_early, short_slack, short_late, one_off], key=policy.admission_key)
    assert ordered == [one_off, short_late, short_slack, long_early]
    assert policy.victim([short_late, long_early, short_slack]) is long_early
    assert policy.victim([short_late, short_slack]) is short_slack


def test_across_runs_aging_lets_a_long_run_overtake_newcomers() -> None:
    policy = TokencakePolicy()  # aging 1: by arrival + remaining x (2 - priority)
    long_early = call(1.0, 0.0, 0, "long", remaining_s=100.0)  # due at 100
    kv = KVManager(4, BLOCK)
    carry_out(kv, policy.on_step(kv, now=50.0))
    newcomer = call(1.0, 45.0, 1, "short", remaining_s=10.0)  # due at 55
    assert sorted([long_early, newcomer], key=policy.admission_key) == [newcomer, long_early]
    carry_out(kv, policy.on_step(kv, now=95.0))
    later = call(1.0, 94.0, 2, "short2", remaining_s=10.0)  # due at 104
    assert sorted([later, long_early], key=policy.admission_key) == [long_early, later]


def test_the_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        TokencakeConfig(offload_margin=0.5)


def finished(owner, tokens: list[int], priority: float, kv: KVManager) -> Sequence:
    """A call of `owner` that computed `tokens` and finished: its full blocks sit cached."""
    request = GenerateRequest("f", tokens, SamplingParams(),
                              attribution=Attribution(*owner, priority))
    seq = Sequence(request, BlockTable(BLOCK, owner=owner), arrival=0.0)
    kv.grow(seq.table, len(tokens))
    kv.key_full_blocks(seq.table, tokens, len(tokens), b"")
    kv.free(seq.table)
    return seq


PINS = TokencakeConfig(retention="pins")  # reservations: the critical path's KV pinned


def test_critical_agents_keep_their_kv_reserved_within_the_budget() -> None:
    kv = KVManager(16, BLOCK)  # reserve_fraction 0.25: 4 blocks
    policy = TokencakePolicy(PINS)
    a, b, low = ("run", "a"), ("run", "b"), ("run", "low")
    carry_out(kv, policy.on_finish(finished(a, list(range(1, 10)), 1.0, kv), kv))  # 2 keyed blocks
    carry_out(kv, policy.on_finish(finished(low, list(range(50, 59)), 0.5, kv), kv))  # not critical
    # 3 more: over budget
    carry_out(kv, policy.on_finish(finished(b, list(range(20, 33)), 1.0, kv), kv))
    assert kv.is_pinned(a) and not kv.is_pinned(low) and not kv.is_pinned(b)
    assert kv.num_pinned() == 2 and policy.reserved == {a: 1.0}
    kv.check_integrity()


def test_a_reservation_ends_at_admission_and_is_lent_under_a_stall() -> None:
    kv = KVManager(32, BLOCK)
    policy = TokencakePolicy(TokencakeConfig(retention="pins", reserve_fraction=0.5))
    a, b = ("run", "a"), ("run", "b")
    carry_out(kv, policy.on_finish(finished(a, list(range(1, 10)), 1.0, kv), kv))
    carry_out(kv, policy.on_finish(finished(b, list(range(20, 30)), 2.0, kv), kv))  # more important
    assert kv.is_pinned(a) and kv.is_pinned(b)
    carry_out(kv, policy.on_stall(kv, now=0.0))  # the pool is needed: the least important goes
    assert not kv.is_pinned(a) and kv.is_pinned(b) and policy.reserved == {b: 2.0}
    carry_out(kv, policy.on_admit(Sequence(GenerateRequest("n", [1], SamplingParams(),
                                             attribution=Attribution(*b, 2.0)),
                             BlockTable(BLOCK, owner=b), arrival=1.0), kv))
    assert not kv.is_pinned(b) and policy.reserved == {}
    kv.check_integrity()


def test_reservations_are_lent_to_running_calls_and_reclaimed_when_they_end() -> None:
    """16 blocks, reserve_fraction 0.25: 4 blocks of reservations while nothing runs. A
    running call taking 8 blocks halves the budget to 2; the less important reservation
    is lent to it, and reclaimed, pinned again, once the call ends."""
    kv = KVManager(16, BLOCK)
    policy = TokencakePolicy(PINS)
    a, b = ("run", "a"), ("run", "b")
    # 2 keyed blocks each
    carry_out(kv, policy.on_finish(finished(a, list(range(1, 10)), 1.0, kv), kv))
    carry_out(kv, policy.on_finish(finished(b, list(range(20, 29)), 2.0, kv), kv))
    assert policy.reserved == {a: 1.0, b: 2.0} and policy.reserve_budget(kv) == 4
    running = BlockTable(BLOCK, owner=("run", "worker"))
    kv.grow(running, 8 * BLOCK)
    carry_out(kv, policy.on_step(kv, now=1.0))
    assert policy.reserve_budget(kv) == 2 and policy.reserved == {b: 2.0}
    assert policy.lent == {a: 1.0} and not kv.is_pinned(a)
    kv.check_integrity()
    kv.free(running)
    carry_out(kv, policy.on_step(kv, now=2.0))
    assert policy.reserved == {a: 1.0, b: 2.0} and policy.lent == {} and kv.is_pinned(a)
    kv.check_integrity()
