"""Batch slots shared among tenants: a tenant's queued burst does not hold another tenant's
call back. No model: sequences are stepped by hand (tests/engine/test_scheduler.py)."""

from __future__ import annotations

from kvrt.runtime.engine.fair_share import fair_order
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.engine.scheduler import BatchScheduler
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.policy import make_policy

BLOCK = 4


def sequence(name: str, tenant: str, order: int) -> Sequence:
    request = GenerateRequest(name, [1, 2, 3], SamplingParams(max_tokens=50), tenant=tenant)
    return Sequence(request=request, table=BlockTable(BLOCK), arrival=float(order), order=order,
                    token_ids=list(request.prompt_token_ids))


def scheduler(max_num_seqs: int, policy: str = "lru") -> BatchScheduler:
    chosen = make_policy(policy)
    kv = KVManager(64, BLOCK)
    return BatchScheduler(kv, chosen, ReusePlanner(kv, chosen.reuse), max_num_seqs, 256)


def admitted(batch: BatchScheduler) -> list[str]:
    """The waiting sequences this step admits, in order (running ones continue too)."""
    waiting = {id(seq) for seq in batch.waiting}
    return [chunk.seq.request.request_id for chunk in batch.schedule()
            if id(chunk.seq) in waiting]


def test_a_tenants_call_takes_the_next_free_slot_ahead_of_anothers_earlier_burst() -> None:
    batch = scheduler(max_num_seqs=2)
    burst = [sequence(f"a{i}", "a", i) for i in range(6)]
    for seq in burst:
        batch.add(seq)
    assert admitted(batch) == ["a0", "a1"]
    batch.add(sequence("b0", "b", 6))  # arrives after the whole burst
    batch.finish(burst[0])
    assert admitted(batch) == ["b0"]  # not a2, which arrived first
    batch.finish(burst[1])
    assert admitted(batch) == ["a2"]


def test_waiting_tenants_alternate_from_the_one_holding_fewer_slots() -> None:
    batch = scheduler(max_num_seqs=8)
    first = sequence("a0", "a", 0)
    batch.add(first)
    assert admitted(batch) == ["a0"]  # a holds one slot
    for i in range(1, 4):
        batch.add(sequence(f"a{i}", "a", i))
    for i in range(3):
        batch.add(sequence(f"b{i}", "b", 10 + i))
    assert admitted(batch) == ["b0", "a1", "b1", "a2", "b2", "a3"]
    assert first.status is Status.RUNNING


def test_one_tenant_keeps_the_policys_order() -> None:
    seqs = [sequence(f"a{i}", "a", i) for i in (3, 1, 2)]
    running = [sequence("r", "a", 0)]
    assert fair_order(seqs, running) == seqs
    mixed = [sequence("x", "a", 0), sequence("y", "a", 1), sequence("z", "b", 2)]
    # b holds two slots, a none: a's two calls come first, in the order given
    assert [s.request.request_id for s in fair_order(
        mixed, [sequence("r1", "b", 0), sequence("r2", "b", 1)])] == ["x", "y", "z"]
