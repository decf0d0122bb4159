"""Calls arriving together with one prompt prefix: the first computes it, the others wait for
its blocks to be keyed and adopt them (engine/shared_prefill.py).

The scheduler's tests step sequences by hand (no model; `update` keys what a step computed);
the engine's run the tiny model and compare each output with the prompt served alone."""

from __future__ import annotations

import pytest
import torch

from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.engine.scheduler import BatchScheduler, Chunk
from kvrt.runtime.engine.sequence import Sequence, Status
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.model.tiny import init_tiny
from kvrt.runtime.policy import make_policy
from tests.engine.helpers import greedy, make_engine, request, run

BLOCK = 16
PREFIX = list(range(1000, 1400))  # 400 tokens: 25 blocks


def sequence(name: str, prompt: list[int], order: int, salt: bytes = b"",
             block: int = BLOCK) -> Sequence:
    req = GenerateRequest(name, prompt, SamplingParams(max_tokens=4), salt=salt)
    return Sequence(request=req, table=BlockTable(block), order=order, arrival=0.0,
                    token_ids=list(prompt))


def scheduler(budget: int) -> BatchScheduler:
    policy = make_policy("lru")
    kv = KVManager(1024, BLOCK)
    return BatchScheduler(kv, policy, ReusePlanner(kv, policy.reuse), 16, budget)


def step(sched: BatchScheduler) -> list[Chunk]:
    chunks = sched.schedule()
    sched.update(chunks, [7] * sum(chunk.wants_logits for chunk in chunks))
    return chunks


def computing(chunks: list[Chunk]) -> dict[str, tuple[int, int]]:
    """Each scheduled sequence's span of positions computed in the step."""
    return {c.seq.request_id: (c.end - c.num_tokens, c.end) for c in chunks}


def test_a_call_waits_for_the_prefix_another_is_computing_and_adopts_it() -> None:
    sched = scheduler(budget=4096)
    a = sequence("a", PREFIX + list(range(1, 41)), 0)
    b = sequence("b", PREFIX + list(range(2000, 2030)), 1)
    sched.add(a)
    sched.add(b)
    assert computing(step(sched)) == {"a": (0, 440)}  # b waits: a computes its prefix
    assert b.status is Status.WAITING
    # a keyed its 25 prefix blocks (and 2 more of its own): b starts at the end of the prefix.
    assert computing(step(sched)) == {"a": (440, 441), "b": (400, 430)}
    assert b.num_cached == 400


def test_a_chunked_prefill_holds_the_call_while_its_last_chunk_computes_the_shared_part() -> None:
    sched = scheduler(budget=512)
    long_prefix = list(range(3000, 3800))  # 800 tokens: a computes them in 2 steps
    a = sequence("a", long_prefix + [1], 0)
    b = sequence("b", long_prefix + [9] * 20, 1)
    for seq in (a, b):
        sched.add(seq)
    assert computing(step(sched)) == {"a": (0, 512)}
    # a's last chunk (289 tokens) leaves 223 of the budget, but computes the 288 shared tokens
    # after the 512 keyed: b waits rather than computing them beside it.
    assert computing(step(sched)) == {"a": (512, 801)}
    assert computing(step(sched)) == {"a": (801, 802), "b": (800, 820)}


def test_a_call_is_not_held_for_less_than_256_shared_tokens_left() -> None:
    sched = scheduler(budget=512)
    long_prefix = list(range(3000, 3800))
    a = sequence("a", long_prefix + [1], 0)
    b = sequence("b", long_prefix[:700] + [9] * 20, 1)  # 188 shared tokens past the 512 keyed
    for seq in (a, b):
        sched.add(seq)
    assert computing(step(sched)) == {"a": (0, 512)}
    assert computing(step(sched)) == {"a": (512, 801), "b": (512, 720)}


def test_a_short_shared_prefix_is_computed_by_both() -> None:
    """Holding a call costs it a step; below 256 shared tokens the step costs more."""
    sched = scheduler(budget=4096)
    short = PREFIX[:240]  # 15 blocks
    a = sequence("a", short + [1, 2, 3], 0)
    b = sequence("b", short + [4, 5, 6], 1)
    sched.add(a)
    sched.add(b)
    assert computing(step(sched)) == {"a": (0, 243), "b": (0, 243)}


def test_another_tenants_prefix_holds_nobody() -> None:
    """The tenant salt is in every block key: the same tokens are not the same KV."""
    sched = scheduler(budget=4096)
    a = sequence("a", PREFIX + [1], 0, salt=b"tenant-a")
    b = sequence("b", PREFIX + [2], 1, salt=b"tenant-b")
    sched.add(a)
    sched.add(b)
    assert computing(step(sched)) == {"a": (0, 401), "b": (0, 401)}


def producer_and_held() -> tuple[BatchScheduler, Sequence]:
    """a admitted, computing the 400-token prefix it shares with b, who waits; a's step has
    not run."""
    sched = scheduler(budget=4096)
    a = sequence("a", PREFIX + [1], 0)
    sched.add(a)
    sched.add(sequence("b", PREFIX + [2], 1))
    assert computing(sched.schedule()) == {"a": (0, 401)}
    return sched, a


def test_a_producer_that_leaves_releases_the_calls_it_held() -> None:
    sched, a = producer_and_held()
    sched.finish(a)  # aborted before its step ran: nothing of it was keyed
    assert computing(sched.schedule()) == {"b": (0, 401)}


def test_a_preempted_producer_computes_the_prefix_again_and_still_holds_the_rest() -> None:
    sched, a = producer_and_held()
    sched.preempt(a)  # back to waiting, first again by its arrival
    assert computing(step(sched)) == {"a": (0, 401)}
    assert computing(step(sched)) == {"a": (401, 402), "b": (400, 401)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=3)


def test_calls_sharing_a_system_prompt_compute_it_once_and_answer_as_alone(tiny) -> None:
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(3, 500, (300,), generator=gen).tolist()
    prompts = [system + torch.randint(3, 500, (n,), generator=gen).tolist()
               for n in (5, 17, 40, 9)]
    alone = []
    for i, prompt in enumerate(prompts):
        engine = make_engine(tiny, prefix_caching=False)
        alone.append(run(engine, [request(f"r{i}", prompt, greedy(6))])[f"r{i}"].token_ids)
    engine = make_engine(tiny)
    together = run(engine, [request(f"r{i}", p, greedy(6)) for i, p in enumerate(prompts)])
    assert [together[f"r{i}"].token_ids for i in range(4)] == alone
    # The first computes the 18 full blocks of the system prompt; the others adopt them.
    assert [together[f"r{i}"].final.cached_tokens for i in range(4)] == [0, 288, 288, 288]
    assert engine.kv.usage().in_use == 0


def test_a_reader_that_splices_holds_nobody_for_the_text_it_reads_from_a_master(
        monkeypatch) -> None:
    """A reader of a round keys no block from its first spliced segment on (the rows are not
    one run of its prompt): a call sharing its prompt past there is held only for what it
    keys. Held for the rest, the call would wait until the reader finished."""
    from kvrt.runtime.engine import shared_prefill
    from tests.engine import test_round_prefill as rounds

    monkeypatch.setattr(shared_prefill, "HOLD_MIN_TOKENS", rounds.BLOCK)
    sched = rounds.scheduler("kvrt", budget=256)
    master, reader = rounds.call(0, [0]), rounds.call(1, [0])  # (never finished here)
    sched.add(master)
    sched.add(reader)
    step(sched)  # the master computes the round's text; the reader waits for it
    plain = sequence("plain", reader.token_ids[: rounds.P + rounds.L] + [9] * 8, 9,
                     salt=reader.salt, block=rounds.BLOCK)
    sched.add(plain)
    chunks = computing(step(sched))  # the reader computes its own 8 tokens, splices the rest
    assert reader.table.key_limit == rounds.P and "plain" not in chunks
    # The reader keyed its private prefix; the segment after it the plain call computes.
    assert computing(step(sched))["plain"] == (rounds.P, rounds.P + rounds.L + 8)
