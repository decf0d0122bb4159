"""A round's prefill under collective reuse, step by step: the real scheduler, KV manager and
reuse planner, no model (each step's chunks are taken as computed, as in a simulation).

Every agent's prompt: a private prefix of P tokens, then the speakers' messages (segments of L
tokens, block-aligned, adjacent: one run), then a tail of 2. A master computes all of it; a
reader computes its prefix, the first K = ceil(0.15 * L) tokens of the run (of its first
segment: inside the run, each message follows what it followed in the master) and its tail,
and reads the rest. Each call generates one token and is finished then, so steps hold prefill
only.
"""

from __future__ import annotations

import math

from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.engine.scheduler import BatchScheduler
from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.policy import make_policy

BLOCK, P, L, TAIL = 4, 8, 24, 2
K = math.ceil(0.15 * L)  # 4: 20 tokens read, above min_reused_tokens (16)


def segment(speaker: int) -> list[int]:
    return [2000 + 100 * speaker + t for t in range(L)]


def call(agent: int, speakers: list[int], tenant: str = "") -> Sequence:
    prompt = [1000 + 10 * agent + t for t in range(P)]
    spans = []
    for speaker in speakers:
        spans.append((len(prompt), len(prompt) + L))
        prompt += segment(speaker)
    prompt += [5, 6]
    request = GenerateRequest(f"{tenant}a{agent}", prompt, SamplingParams(max_tokens=1),
                              salt=tenant.encode(), tenant=tenant, segments=tuple(spans))
    return Sequence(request=request, table=BlockTable(BLOCK), arrival=0.0, order=agent,
                    token_ids=list(prompt))


def scheduler(policy: str, budget: int) -> BatchScheduler:
    kv = KVManager(256, BLOCK)
    chosen = make_policy(policy)
    return BatchScheduler(kv, chosen, ReusePlanner(kv, chosen.reuse), 32, budget)


def run_round(sched: BatchScheduler, seqs: list[Sequence],
              before_step=None) -> list[dict[str, int]]:
    """Each step's prefill tokens by request id, until every call has its token."""
    for seq in seqs:
        sched.add(seq)
    steps: list[dict[str, int]] = []
    while sched.has_work():
        if before_step is not None:
            before_step(len(steps))
        chunks = sched.schedule()
        assert chunks, "nothing scheduled while calls wait: a reader is starved"
        steps.append({c.seq.request_id: c.num_tokens for c in chunks})
        for seq in sched.update(chunks, [7] * sum(c.wants_logits for c in chunks)):
            sched.finish(seq)
    assert sched.kv.usage().in_use == 0
    sched.kv.check_integrity()
    return steps


def test_a_chunked_master_finishes_every_segment_before_any_reader_starts() -> None:
    """8 agents hear 3 speakers; a master's 82 tokens take two 64-token steps. Its first step
    ends inside the run: the readers wait for the rest (each would compute what is not indexed
    yet), then fill every step."""
    sched = scheduler("kvrt", budget=64)
    seqs = [call(agent, [0, 1, 2]) for agent in range(8)]
    steps = run_round(sched, seqs)
    master, reader = P + 3 * L + TAIL, P + K + TAIL  # 82 and 14
    assert steps[:2] == [{"a0": 64}, {"a0": master - 64}]
    for name in [s.request_id for s in seqs[1:]]:
        assert sum(step.get(name, 0) for step in steps) == reader
    # The readers' 7 * 14 = 98 tokens in ceil(98 / 64) = 2 steps, the first one full.
    assert [sum(step.values()) for step in steps[2:]] == [64, 7 * reader - 64]
    assert len(steps) == math.ceil(master / 64) + math.ceil(7 * reader / 64)
    assert sched.reuse.reused_tokens == 7 * (3 * L - K)


def test_masters_of_different_speakers_share_a_step_and_so_do_their_readers() -> None:
    """Two groups of four hear different speakers: one master per group, both in the first
    step; then the six readers together."""
    sched = scheduler("kvrt", budget=128)
    seqs = [call(agent, [0, 1] if agent < 4 else [2, 3]) for agent in range(8)]
    steps = run_round(sched, seqs)
    master, reader = P + 2 * L + TAIL, P + K + TAIL  # 58 and 14
    assert steps == [{"a0": master, "a4": master},
                     {f"a{i}": reader for i in (1, 2, 3, 5, 6, 7)}]


def test_per_request_reuse_computes_the_shared_text_again_in_the_same_round() -> None:
    """The baseline, unchanged: the same round per request. Calls admitted before a copy is
    indexed compute every segment, and every other reads each segment apart, recomputing the
    head of each; so it computes more than the collective round's 2 * 58 + 6 * 14 tokens and
    takes more steps."""
    collective = run_round(scheduler("kvrt", 128),
                           [call(a, [0, 1] if a < 4 else [2, 3]) for a in range(8)])
    per_request = run_round(scheduler("kvrt-per-request", 128),
                            [call(a, [0, 1] if a < 4 else [2, 3]) for a in range(8)])
    total = [sum(sum(step.values()) for step in steps) for steps in (collective, per_request)]
    assert total[0] == 2 * (P + 2 * L + TAIL) + 6 * (P + K + TAIL)
    assert total[1] > total[0] and len(per_request) > len(collective)
    # In its first step, per request, a0 and a1 both compute the first speakers' text.
    assert per_request[0]["a0"] == per_request[0]["a1"] == P + 2 * L + TAIL


def test_each_tenant_masters_its_own_round_in_the_first_step() -> None:
    """The same text from two tenants is two sets of segments (salted): neither waits on the
    other's master, and tenants stay interleaved (fair_share.py) although all of tenant a's
    calls came first."""
    sched = scheduler("kvrt", budget=128)
    seqs = [call(agent, [0, 1], "a") for agent in range(4)]
    seqs += [call(agent, [0, 1], "b") for agent in range(4, 8)]
    steps = run_round(sched, seqs)
    master, reader = P + 2 * L + TAIL, P + K + TAIL
    assert steps[0] == {"aa0": master, "ba4": master}
    assert steps[1] == {f"{t}a{i}": reader for t, i in
                        [("a", 1), ("a", 2), ("a", 3), ("b", 5), ("b", 6), ("b", 7)]}
    assert sched.reuse.reused_tokens == 6 * (2 * L - K)


def test_a_preempted_master_leaves_no_reader_waiting_for_it() -> None:
    """The master is preempted after its first step: it no longer holds the readers. Admitted
    again first (the policy's order), it finds its first 64 tokens in the prefix cache and
    claims the run again, which it is inside of: the readers wait for it to complete the
    round's copy, then read all of it."""
    sched = scheduler("kvrt", budget=64)
    seqs = [call(agent, [0, 1, 2]) for agent in range(8)]

    def preempt_master(step: int) -> None:
        if step == 1:
            sched.preempt(seqs[0])
            assert not sched.reuse.hold(seqs[1])

    steps = run_round(sched, seqs, preempt_master)
    assert sched.preemptions == 1
    assert steps[:2] == [{"a0": 64}, {"a0": P + 3 * L + TAIL - 64}]
    assert all(sum(step.get(f"a{i}", 0) for step in steps) == P + K + TAIL
               for i in range(1, 8))


def test_a_run_is_computed_whole_only_where_the_readers_heads_would_cost_more() -> None:
    """Each speaker's message has a copy already (computed alone, as a speaker's output is).
    Read segment by segment, a reader computes K of each of the 3 messages (12 tokens); the run
    computed whole costs 3 * L = 72 once, then K = 4 for each other reader. 8 readers:
    8 * 12 = 96 < 72 + 7 * 4 = 100, segment by segment; 12 readers: 12 * 12 = 144 > 72 +
    11 * 4 = 116, the run."""
    for readers, whole in ((8, False), (12, True)):
        sched = scheduler("kvrt", budget=512)
        run_round(sched, [call(50 + s, [s]) for s in range(3)])  # the speakers' copies
        steps = run_round(sched, [call(a, [0, 1, 2]) for a in range(readers)])
        computed = [sum(step.get(f"a{a}", 0) for step in steps) for a in range(readers)]
        if whole:
            assert computed == [P + 3 * L + TAIL] + [P + K + TAIL] * (readers - 1)
        else:
            assert computed == [P + 3 * K + TAIL] * readers


def test_readers_in_another_order_share_no_run() -> None:
    """Two groups hear the same speakers in two orders: two runs, each mastered once; a call
    alone with its order reads segment by segment from the copies the masters left."""
    sched = scheduler("kvrt", budget=512)
    seqs = [call(a, [0, 1, 2] if a < 4 else [2, 1, 0]) for a in range(8)]
    steps = run_round(sched, seqs)
    computed = [sum(step.get(f"a{a}", 0) for step in steps) for a in range(8)]
    master, reader = P + 3 * L + TAIL, P + K + TAIL
    assert computed == [master, reader, reader, reader, master, reader, reader, reader]
    late = run_round(sched, [call(9, [1, 0, 2])])
    assert sum(late[0].values()) == P + 3 * K + TAIL


def test_a_copy_of_only_the_start_of_a_run_leaves_its_readers_reading_each_message() -> None:
    """The round's first call arrives alone: no run pays for one reader, so it reads speakers
    1 and 2 from their copies and computes speaker 0's message itself. Its rows up to its
    first splice are a prefix's, so the index holds a copy of the run's start: speaker 0's
    message alone (L rows, to where the next message starts). The readers arriving
    after it read the run message by message from the copies there are, or the run computed
    whole by one of them: never that start alone, computing the rest of the run each."""
    for readers, whole in ((3, False), (12, True)):
        sched = scheduler("kvrt", budget=512)
        run_round(sched, [call(50 + s, [s]) for s in (1, 2)])  # speakers 1 and 2's copies
        first = run_round(sched, [call(0, [0, 1, 2])])
        assert sum(first[0].values()) == P + L + 2 * K + TAIL
        late = [call(a, [0, 1, 2]) for a in range(1, readers + 1)]
        steps = run_round(sched, late)
        computed = [sum(step.get(s.request_id, 0) for step in steps) for s in late]
        # 3 readers: 3 * 3K = 36 < 3L + 2K = 80, message by message; 12: 144 > 3L + 11K = 116.
        if whole:
            assert computed == [P + 3 * L + TAIL] + [P + K + TAIL] * (readers - 1)
        else:
            assert computed == [P + 3 * K + TAIL] * readers
