"""The batch scheduler under a pool that runs dry: who yields.

No model: sequences are stepped by hand (their chunks computed, a token appended)."""

from __future__ import annotations

from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.engine.scheduler import BatchScheduler, Chunk
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.policy import make_policy
from tests.kv.helpers import host_spec

BLOCK = 4


def sequence(name: str, prompt_len: int, order: int, arrival: float = 0.0) -> Sequence:
    request = GenerateRequest(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=50))
    return Sequence(request=request, table=BlockTable(BLOCK), arrival=arrival, order=order,
                    token_ids=list(request.prompt_token_ids))


def computed(chunks: list[Chunk]) -> None:
    """What the engine does after a step: the chunks' KV exists, sampling ones grow a token."""
    for chunk in chunks:
        samples = chunk.wants_logits  # read before the sequence moves on
        chunk.seq.num_computed += chunk.num_tokens
        if samples:
            chunk.seq.token_ids.append(7)


def lru_scheduler(kv: KVManager) -> BatchScheduler:
    policy = make_policy("lru")
    return BatchScheduler(kv, policy, ReusePlanner(kv, policy.reuse), 8, 64)


def full_pool_of_three() -> tuple[BatchScheduler, list[Sequence]]:
    """Six blocks; three sequences arriving at one clock reading, in order a, b, c, each with
    a prompt of two whole blocks: all admitted, and the pool is full."""
    scheduler = lru_scheduler(KVManager(6, BLOCK))
    seqs = [sequence(name, 2 * BLOCK, order) for order, name in enumerate("abc")]
    for seq in seqs:
        scheduler.add(seq)
    computed(scheduler.schedule())
    assert [s.status for s in seqs] == [Status.RUNNING] * 3
    assert scheduler.kv.usage().free == 0
    return scheduler, seqs


def test_among_equal_arrival_times_the_last_to_arrive_yields() -> None:
    scheduler, (a, b, c) = full_pool_of_three()
    chunks = scheduler.schedule()  # each decode needs a third block: someone must yield
    assert c.status is Status.WAITING and scheduler.preemptions >= 1
    assert a.status is Status.RUNNING and a in [chunk.seq for chunk in chunks]


def test_a_prefix_on_the_host_is_uploaded_only_when_the_call_could_then_be_admitted() -> None:
    """Uploaded blocks sit cached until their call is admitted; brought up into a pool the
    running sequences are about to fill, they would be evicted again, and uploaded again."""
    kv = KVManager(6, BLOCK, host=host_spec(6, 8))
    scheduler = lru_scheduler(kv)
    host_prefix = list(range(1, 3 * BLOCK + 1))
    assert kv.host is not None
    tiers = kv.host.tiers
    table = BlockTable(BLOCK)  # its 3 full blocks computed, then sent to the host
    kv.grow(table, len(host_prefix))
    kv.key_full_blocks(table, host_prefix, len(host_prefix), b"")
    kv.free(table)
    move = tiers.prepare_offload(kv.match_prefix(host_prefix + [0], b"").block_ids).move
    assert move is not None and tiers.complete(move, ok=True) == 3

    def asked() -> list[int]:
        """The host blocks an upload is bringing up now (in flight until it completes)."""
        return [b for b in range(8) if tiers.host.is_in_flight(b)]

    runner = sequence("runner", 3 * BLOCK, order=0)
    runner.token_ids = list(range(100, 100 + 3 * BLOCK))  # unrelated to the host prefix
    scheduler.add(runner)
    computed(scheduler.schedule())  # 3 of the 6 device blocks in use
    waiting = sequence("next", 3 * BLOCK + 2, order=1)  # 3 blocks on the host + 1 to compute
    scheduler.add(waiting)
    scheduler.schedule()
    assert asked() == [] and waiting.status is Status.WAITING  # 4 needed, 3 allocatable
    scheduler.finish(runner)
    scheduler.schedule()
    assert asked() == move.target and waiting.status is Status.WAITING  # admitted once landed
    kv.host.wait()
    kv.check_integrity()
