"""Blocks held for shared text, on block tables the engine builds (tiny model, `kvrt`'s
collective reuse): a master and three readers of one segment, each figure worked out by hand
from the layout below, and set against the token figure that partial blocks make differ.

Blocks of 16 rows. The segment (48 tokens) starts on a block in every prompt:

    master  private 0..15 | segment 16..63     | tail 64..67 (+ rows mapped ahead to 79)
    blocks  m0            | m1    m2     m3    | m4
    reader  private 0..31 | segment 32..79                      | tail 80..83 (+ ahead to 87)
            r0 r1         | head 32..39: own rows 0..7 of r2;   | r2 rows 8..15
                          | 40..79 read m1 rows 8..15, m2, m3   |

A reader recomputes the segment's first ceil(0.15 * 48) = 8 tokens (its head, in r2) and splices
the rest from the master (m1, m2, m3; the splice references m1 for the head's rows too). Once
its prompt is computed it keeps ceil(8 / 3) = 3 of the 8 head rows (the diff encode) and reads
the master's for the other 5; r2 is packed again: 3 head rows + 8 tail rows mapped, 5 spare.
"""

from __future__ import annotations

import math

import pytest

from kvrt.runtime.engine.protocol import Attribution, GenerateRequest
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.shared_blocks import SharedTextMeter, shared_text_blocks
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import greedy, make_engine, run

BLOCK = 16
SEGMENT = list(range(300, 348))  # 48 tokens: 3 whole blocks wherever it starts on a block
HEAD = math.ceil(0.15 * len(SEGMENT))  # 8 recomputed by each reader
KEPT = math.ceil(HEAD / 3)  # 3 of them kept as its diff
TAIL = [9, 8, 7, 6]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("shared") / "llama", arch="llama", seed=5)


def call(agent: str, private: list[int], max_tokens: int) -> GenerateRequest:
    start = len(private)
    return GenerateRequest(agent, private + SEGMENT + TAIL, greedy(max_tokens),
                           attribution=Attribution(run="town", agent=agent),
                           segments=((start, start + len(SEGMENT)),))


MASTER = call("master", list(range(10, 26)), max_tokens=40)
READERS = [call(f"reader{i}", list(range(30 + 40 * i, 62 + 40 * i)), max_tokens=6)
           for i in range(3)]


def step_until_readers_computed(engine) -> list:
    """Steps until every reader's prompt is computed (its diff encoded); returns the running."""
    for request in [MASTER, *READERS]:
        engine.add(request)
    for _ in range(20):
        running = {seq.request_id: seq for seq in engine.scheduler.running}
        if all(r.request_id in running
               and running[r.request_id].num_computed >= len(r.prompt_token_ids)
               for r in READERS):
            return engine.scheduler.running
        engine.step()
    raise AssertionError("the readers' prompts were not computed")


def finish(engine) -> None:
    while engine.has_work():
        engine.step()
    assert engine.kv.pool.usage().in_use == 0
    engine.check_integrity()


def test_a_live_master_is_amortized_over_its_readers_and_a_reader_pays_its_partial_block(folder):
    engine = make_engine(folder, policy="kvrt")
    running = step_until_readers_computed(engine)
    assert any(seq.request_id == "master" for seq in running)  # still decoding
    stats = engine.stats()
    assert stats.segment_reused_tokens == 3 * (len(SEGMENT) - HEAD)
    assert stats.segment_dropped_tokens == 3 * (HEAD - KEPT)

    per_agent = shared_text_blocks(running, BLOCK)
    # m1, m2, m3 are referenced by the master and the 3 readers: a quarter each, all segment
    # rows. m0 and m4 hold none. A reader's r2 maps 11 rows, 3 of them its kept head rows.
    master, reader = 3 / 4, 3 / 4 + 3 / 11
    assert per_agent == pytest.approx({("town", "master"): master,
                                       **{("town", r.request_id): reader for r in READERS}})
    engine.sample_shared_text()
    blocks = engine.stats().shared_text_blocks_per_agent
    assert blocks == pytest.approx((master + 3 * reader) / 4)  # 0.9545...
    # The token figure: the master's 48 rows and each reader's 3 kept, per call, in blocks.
    # It misses the 8 rows of r2 that are mapped, but not to the segment, and the 5 spare.
    tokens = stats.segment_held_tokens / stats.segment_requests / BLOCK
    assert tokens == pytest.approx((48 + 3 * KEPT) / 4 / BLOCK)  # 0.8906...
    assert blocks > tokens + 0.05
    finish(engine)


def test_a_finished_masters_blocks_are_held_by_its_readers_alone(folder):
    engine = make_engine(folder, policy="kvrt")
    run(engine, [MASTER])  # its blocks are cached now: the index keeps its segment copy
    for request in READERS:
        engine.add(request)
    engine.step()  # one step admits and computes the three readers' own rows
    running = engine.scheduler.running
    assert [seq.request_id for seq in running] == [r.request_id for r in READERS]
    assert all(seq.num_computed >= seq.prompt_len for seq in running)
    # m1, m2, m3 in use for the readers alone: a third each, whatever the master's rows were.
    assert shared_text_blocks(running, BLOCK) == pytest.approx(
        {("town", r.request_id): 1 + 3 / 11 for r in READERS})
    finish(engine)


def test_without_reuse_each_agent_holds_its_whole_copy(folder):
    engine = make_engine(folder)  # lru: segments are counted, never shared
    running = step_until_readers_computed(engine)
    # Each holds the segment's 3 blocks of its own; the master's tail block m4 and a reader's
    # r5 (tail, then rows mapped ahead) hold no segment row.
    assert shared_text_blocks(running, BLOCK) == pytest.approx(
        {("town", r.request_id): 3.0 for r in [MASTER, *READERS]})
    finish(engine)


def test_unattributed_calls_are_agents_of_their_own_and_the_meter_waits_for_a_sample(folder):
    engine = make_engine(folder)
    meter = SharedTextMeter()
    assert meter.per_agent() is None
    engine.sample_shared_text()  # nothing running: no agent holds shared text
    assert engine.stats().shared_text_blocks_per_agent is None
    plain = GenerateRequest("plain", list(range(10, 26)) + SEGMENT + TAIL, greedy(4),
                            segments=((16, 64),))
    engine.add(plain)
    engine.step()
    (seq,) = engine.scheduler.running
    meter.sample([seq], BLOCK)
    assert meter.per_agent() == pytest.approx(3.0)
    assert list(shared_text_blocks([seq], BLOCK)) == [seq]
    finish(engine)


def test_the_meter_reports_the_moment_the_most_agents_shared(monkeypatch):
    """A master alone (its 3 blocks), then it and 3 readers (a round resident: 1.2 each), then
    the readers that outlive it (the master's blocks over fewer and fewer): the figure is the
    round's, not an average that the order the calls end in would set."""
    import kvrt.runtime.kv.shared_blocks as shared_blocks

    moments = iter([{"m": 3.0}, {"m": 1.5, "a": 1.0, "b": 1.1, "c": 1.2},
                    {"m": 1.5, "a": 1.0, "b": 1.1, "c": 1.4}, {"a": 2.0, "b": 2.1}, {"c": 4.0}])
    monkeypatch.setattr(shared_blocks, "shared_text_blocks", lambda holders, size: next(moments))
    meter = SharedTextMeter()

    class Holder:  # a call that computed one more position at every sample
        def __init__(self, step):
            self.num_computed, self.table = step, BlockTable(BLOCK)

    for step in range(5):
        meter.sample([Holder(step)], BLOCK)
    assert meter.agents == 4
    assert meter.per_agent() == pytest.approx((4.8 / 4 + 5.0 / 4) / 2)
