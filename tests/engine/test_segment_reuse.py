"""Position-independent reuse of segments in the engine (tiny model): a reader's approximate
prefill equals the reference algorithm (runtime/model/blend.py, dense and unpaged); the
collective step makes concurrent readers wait for one master copy, per-request reuse does not;
`lru` ignores segments; every block and index entry is accounted for afterwards."""

from __future__ import annotations

import math

import pytest
import torch

from kvrt.kernels import paged_attention
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.model.blend import blend_prefill
from kvrt.runtime.model.dense_forward import dense_forward
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import greedy, make_engine, run

SEGMENT = list(range(40, 80))  # 40 tokens: its first 6 are recomputed at ratio 0.15
DONOR = list(range(120, 127)) + SEGMENT + list(range(200, 205))  # segment at 7
READER = list(range(5, 17)) + SEGMENT + list(range(90, 97))  # the same segment at 12
FIRST_K = math.ceil(0.15 * len(SEGMENT))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("reuse") / "llama", arch="llama", seed=3)


def call(request_id: str, prompt: list[int], start: int, max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(request_id, prompt, greedy(max_tokens),
                           segments=((start, start + len(SEGMENT)),))


def recording_logits(engine) -> dict[str, list[torch.Tensor]]:
    """Records each request's sampled logits rows as the real executor returns them."""
    seen: dict[str, list[torch.Tensor]] = {}
    real = engine.executor.run

    def run_and_record(chunks):
        logits = real(chunks)
        for chunk, row in zip([c for c in chunks if c.wants_logits], logits):
            seen.setdefault(chunk.seq.request_id, []).append(row.clone())
        return logits

    engine.executor.run = run_and_record
    return seen


def test_reader_prefill_equals_the_reference_blend(folder):
    engine = make_engine(folder, policy="kvrt")
    logits = recording_logits(engine)
    run(engine, [call("donor", DONOR, 7)])
    assert len(engine.kv.segments) == 1
    out = run(engine, [call("reader", READER, 12)])["reader"]
    reused = len(SEGMENT) - FIRST_K
    assert out.final.cached_tokens == reused

    model = engine.executor.model
    t = torch.tensor
    _, donor_kv = dense_forward(model, t(DONOR), torch.arange(len(DONOR)))
    segment_kv = donor_kv.select(torch.arange(7, 7 + len(SEGMENT)))
    blend = blend_prefill(model, t(READER[:12]), t(SEGMENT), segment_kv, t(READER[52:]),
                          first_k=FIRST_K)
    full, _ = dense_forward(model, t(READER), torch.arange(len(READER)))
    first = logits["reader"][0]
    torch.testing.assert_close(first, blend.logits[-1], atol=1e-4, rtol=1e-4)
    # ... and that is not full prefill (the reuse really happened): the segment never saw the
    # reader's own first 12 tokens.
    assert (first - full[-1]).abs().max() > 1e-2
    assert engine.stats().segment_reused_tokens == reused


def test_after_its_prompt_a_reader_keeps_only_the_most_changed_rows(folder):
    """Diff encode: once the reader's prompt is computed, it keeps a third of the rows it
    recomputed (those that changed most from the donor's) and reads the donor's rows for the
    rest; every later step equals the reference that does the same on dense KV."""
    reader = list(range(5, 21)) + SEGMENT + list(range(90, 97))  # the segment at a block start
    donor_kv = None
    seen, stats = {}, {}
    for keep in (1.0, 1 / 3):
        engine = make_engine(folder, policy="kvrt", policy_options={"diff_keep": repr(keep)})
        logits = recording_logits(engine)
        run(engine, [call("donor", DONOR, 7)])
        out = run(engine, [call("reader", reader, 16, max_tokens=8)])["reader"]
        seen[keep], stats[keep] = (logits["reader"], out.token_ids), engine.stats()
        assert engine.kv.pool.usage().in_use == 0
        engine.check_integrity()
        model = engine.executor.model
        if donor_kv is None:
            _, kv = dense_forward(model, torch.tensor(DONOR), torch.arange(len(DONOR)))
            donor_kv = kv.select(torch.arange(7, 7 + len(SEGMENT)))
        t = torch.tensor
        blend = blend_prefill(model, t(reader[:16]), t(SEGMENT), donor_kv, t(reader[56:]),
                              pieces=[len(SEGMENT)], diff_keep=keep)
        assert len(blend.kept) == math.ceil(keep * FIRST_K)
        # The reference decodes the engine's tokens over its own (diff encoded) KV.
        tokens = seen[keep][1]
        expected, _ = dense_forward(model, t(tokens[:-1]),
                                    torch.arange(len(reader), len(reader) + len(tokens) - 1),
                                    blend.kv)
        got = seen[keep][0]
        torch.testing.assert_close(got[0], blend.logits[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.stack(got[1:]), expected, atol=1e-4, rtol=1e-4)
    assert stats[1.0].segment_dropped_tokens == 0
    assert stats[1 / 3].segment_dropped_tokens == FIRST_K - math.ceil(FIRST_K / 3)
    # What the two calls store of the segment: the donor's master, and the reader's kept rows.
    assert stats[1 / 3].segment_held_tokens == len(SEGMENT) + math.ceil(FIRST_K / 3)
    # Keeping fewer rows changed what decoding saw (the test tells the two apart).
    later = [(a - b).abs().max() for a, b in zip(seen[1.0][0][1:], seen[1 / 3][0][1:])]
    assert max(later) > 1e-3


def test_a_long_segment_after_a_private_prompt_gives_back_its_head(folder):
    """A segment of 400 tokens after 10 private ones: the reader recomputes its first 60
    (positions 10..69, blocks 0..4 of 16 rows). None of them lies in a keyed block (the prefix
    index stops where the segment starts), so the diff encode keeps 20 and gives back 40. (When
    keying stopped at the first spliced position, 70, blocks 0..3 were keyed: only 64..69 could
    go.)"""
    long_segment = [100 + i for i in range(400)]
    engine = make_engine(folder, policy="kvrt", max_model_len=1024)
    # The segment ends within the donor's last prompt block (400..403): its copy covers the
    # keyed blocks while the donor runs, then the whole segment once it is done.
    run(engine, [GenerateRequest("donor", [7, 8, 9] + long_segment + [3], greedy(2),
                                 segments=((3, 403),))])
    reader = list(range(10, 20)) + long_segment + [5, 6]
    out = run(engine, [GenerateRequest("reader", reader, greedy(2), segments=((10, 410),))])
    assert out["reader"].final.cached_tokens == 400 - 60
    assert engine.kv.block_size == 16
    assert engine.stats().segment_dropped_tokens == 40
    assert engine.kv.pool.usage().in_use == 0


def test_collective_readers_wait_for_one_master(folder):
    engine = make_engine(folder, policy="kvrt")
    readers = [call(f"r{i}", list(range(5 + i, 12 + 2 * i)) + SEGMENT + [99, 98], 7 + i)
               for i in range(3)]
    outs = run(engine, readers)
    assert [outs[r.request_id].final.cached_tokens for r in readers] == [
        0, len(SEGMENT) - FIRST_K, len(SEGMENT) - FIRST_K]
    stats = engine.stats()
    assert stats.segment_tokens == 3 * len(SEGMENT)
    assert stats.segment_reused_tokens == 2 * (len(SEGMENT) - FIRST_K)


def test_per_request_readers_arriving_together_all_compute(folder):
    engine = make_engine(folder, policy="kvrt-per-request")
    readers = [call(f"r{i}", list(range(5 + i, 12 + 2 * i)) + SEGMENT + [99, 98], 7 + i)
               for i in range(3)]
    outs = run(engine, readers)
    assert all(outs[r.request_id].final.cached_tokens == 0 for r in readers)
    # A later call finds the copy they left.
    later = run(engine, [call("later", [3, 4] + SEGMENT + [9], 2)])["later"]
    assert later.final.cached_tokens == len(SEGMENT) - FIRST_K


def test_lru_ignores_segments(folder):
    marked, plain = make_engine(folder), make_engine(folder)
    run(marked, [call("donor", DONOR, 7)])
    out = run(marked, [call("reader", READER, 12)])["reader"]
    reference = run(plain, [GenerateRequest("reader", READER, greedy(4))])["reader"]
    assert out.final.cached_tokens == 0 and len(marked.kv.segments) == 0
    assert out.token_ids == reference.token_ids


def test_shift_only_and_the_index_forgets_evicted_copies(folder):
    engine = make_engine(folder, policy="kvrt", policy_options={"recompute_ratio": "0"})
    run(engine, [call("donor", DONOR, 7)])
    out = run(engine, [call("reader", READER, 12)])["reader"]
    assert out.final.cached_tokens == len(SEGMENT)
    pool = engine.kv.pool
    for block_id in range(pool.num_blocks):
        if pool.is_cached(block_id):
            pool.drop_cached(block_id)
    assert len(engine.kv.segments) == 0
    assert pool.usage().free == pool.num_blocks
    engine.check_integrity()


def test_a_later_prompt_quoting_an_output_reads_its_decode_kv(folder):
    engine = make_engine(folder, policy="kvrt")
    said = run(engine, [GenerateRequest("speaker", DONOR, greedy(40))])["speaker"].token_ids
    # The output's KV lies in a spliced or partial block too: kept cached after the call.
    assert engine.kv.pool.usage().in_use == 0 and len(engine.kv.segments) == 1
    quoting = [7, 8, 9] + [300, 301] + said + [302] + [11, 12]  # a message quoting it
    segment = (3, 3 + 2 + len(said) + 1)
    out = run(engine, [GenerateRequest("reader", quoting, greedy(2), segments=(segment,))])
    recomputed = max(3, math.ceil(0.15 * (segment[1] - segment[0])))
    # Its header and first tokens are computed; the rest of the output (from its second token,
    # but the last: sampled, never fed back) is read at its new position.
    assert out["reader"].final.cached_tokens == 2 + len(said) - 1 - recomputed


@pytest.mark.parametrize("policy", ["kvrt", "kvrt-per-request"])
def test_readers_preempted_in_a_small_pool_still_finish_and_account(folder, policy):
    # 24 blocks of 16 tokens: six readers of ~80 tokens each growing by 40 cannot all fit.
    engine = make_engine(folder, policy=policy, kv_cache_memory=24 * 16 * engine_bytes(folder))
    readers = [call(f"r{i}", list(range(5, 9 + 3 * i)) + SEGMENT + [99, 98], 4 + 3 * i, 40)
               for i in range(6)]
    outs = run(engine, readers)
    assert engine.stats().preemptions > 0
    assert all(len(outs[r.request_id].token_ids) == 40 for r in readers)
    assert engine.kv.pool.usage().in_use == 0


def engine_bytes(folder) -> int:
    """KV bytes per token of the tiny model (float32)."""
    config = make_engine(folder).executor.model.config
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4


def test_rows_at_two_shifts_are_read_in_place(folder, monkeypatch):
    """Two segments from two donors sit at two shifts in the reader. The torch decode reads
    both in place, rotating the query back once per shift (kernels/paged_attention.py,
    `_decode_shared`): the same logits as rotating every K at every step (its fallback), and
    the diff encode gives back rows of both segments."""
    other = list(range(130, 170))
    donors = [call("a", DONOR, 7),
              GenerateRequest("b", [3] * 20 + other + [4, 4], greedy(4), segments=((20, 60),))]
    reader = GenerateRequest("reader", READER[:12] + SEGMENT + other + READER[52:], greedy(6),
                             segments=((12, 52), (52, 92)))
    seen, stats = {}, {}
    for mode in ("query rotated", "K rotated"):
        if mode == "K rotated":
            monkeypatch.setattr(paged_attention, "_FLASH_CPU", None)
        engine = make_engine(folder, policy="kvrt")
        logits = recording_logits(engine)
        run(engine, donors)
        out = run(engine, [reader])["reader"]
        seen[mode], stats[mode] = (logits["reader"], out.token_ids), engine.stats()
        assert out.final.cached_tokens == 2 * (len(SEGMENT) - FIRST_K)
        assert len(seen[mode][0]) == 6  # the prompt's logits, then five decode steps
    assert seen["query rotated"][1] == seen["K rotated"][1]
    for a, b in zip(seen["query rotated"][0], seen["K rotated"][0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Each segment's recomputed head (its first 6 positions) is encoded against its own master:
    # the diff encode keeps 2 of each (a third, rounded up) and gives back the others (the
    # first head's 12..15 lie in block 0, not keyed: the prefix index stops at the first reused
    # segment's start).
    assert stats["query rotated"].segment_dropped_tokens == 2 * 4
