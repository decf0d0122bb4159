"""The batch scheduler under a pool that runs dry: who yields.

No model: sequences are stepped by hand (their chunks computed, a token appended)."""

from __future__ import annotations

from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.engine.scheduler import BatchScheduler, Chunk
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.kv.manager import BlockTable, KVManager
from kvrt.runtime.policy import make_policy

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


def full_pool_of_three() -> tuple[BatchScheduler, list[Sequence]]:
    """Six blocks; three sequences arriving at one clock reading, in order a, b, c, each with
    a prompt of two whole blocks: all admitted, and the pool is full."""
    scheduler = BatchScheduler(KVManager(6, BLOCK), make_policy("lru"), 8, 64)
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
