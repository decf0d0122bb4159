"""The dense reference forward against transformers, and approximate (blended) prefill against
its exact limits: recomputing every segment token is full prefill; a segment cached at the
same position after the same prefix needs no recompute; shifting RoPE is exact on K."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvrt.runtime.model.blend import blend_prefill
from kvrt.runtime.model.dense_forward import DenseKV, dense_forward, shift_keys
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import make_engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = init_tiny(tmp_path_factory.mktemp("blend") / "llama", arch="llama", seed=5)
    return folder, make_engine(folder).executor.model


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


PREFIX, SEGMENT, SUFFIX = ids(*range(5, 17)), ids(*range(40, 61)), ids(*range(90, 97))
DONOR_PREFIX = ids(*range(120, 127))  # another agent's history: 7 tokens, not 12


def test_dense_forward_equals_transformers_and_splits_anywhere(tiny) -> None:
    folder, model = tiny
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.cat([PREFIX, SEGMENT])
    logits, kv = dense_forward(model, prompt, torch.arange(len(prompt)))
    with torch.no_grad():
        theirs = hf(prompt[None]).logits[0]
    torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=1e-4)
    # The second half over the first half's KV: the same logits.
    half = DenseKV([k[:12] for k in kv.keys], [v[:12] for v in kv.values], kv.positions[:12])
    rest, _ = dense_forward(model, prompt[12:], torch.arange(12, len(prompt)), half)
    torch.testing.assert_close(rest, logits[12:], atol=1e-4, rtol=1e-4)


def test_shifting_keys_equals_computing_them_at_the_new_position(tiny) -> None:
    _, model = tiny
    _, at_zero = dense_forward(model, SEGMENT, torch.arange(len(SEGMENT)), num_layers=1)
    _, at_nine = dense_forward(model, SEGMENT, torch.arange(9, 9 + len(SEGMENT)), num_layers=1)
    shifted = shift_keys(at_zero, 9, model)
    torch.testing.assert_close(shifted.keys[0], at_nine.keys[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(shifted.positions, at_nine.positions)


def full_logits(model) -> torch.Tensor:
    prompt = torch.cat([PREFIX, SEGMENT, SUFFIX])
    logits, _ = dense_forward(model, prompt, torch.arange(len(prompt)))
    return logits[-len(SUFFIX):]


def donor_kv(model, donor_prefix: torch.Tensor) -> DenseKV:
    prompt = torch.cat([donor_prefix, SEGMENT])
    _, kv = dense_forward(model, prompt, torch.arange(len(prompt)))
    return kv.select(torch.arange(len(donor_prefix), len(prompt)))


def test_recomputing_every_segment_token_is_full_prefill(tiny) -> None:
    _, model = tiny
    blend = blend_prefill(model, PREFIX, SEGMENT, donor_kv(model, DONOR_PREFIX), SUFFIX,
                          ratio=1.0)
    assert len(blend.recomputed) == len(SEGMENT)
    torch.testing.assert_close(blend.logits, full_logits(model), atol=1e-4, rtol=1e-4)


def test_a_segment_cached_after_the_same_prefix_needs_no_recompute(tiny) -> None:
    _, model = tiny
    blend = blend_prefill(model, PREFIX, SEGMENT, donor_kv(model, PREFIX), SUFFIX, ratio=0.0)
    assert len(blend.recomputed) == 0
    torch.testing.assert_close(blend.logits, full_logits(model), atol=1e-4, rtol=1e-4)


def test_the_diff_encode_keeps_the_most_changed_recomputed_rows(tiny) -> None:
    _, model = tiny
    donor = donor_kv(model, DONOR_PREFIX)
    cached = shift_keys(donor, len(PREFIX) - len(DONOR_PREFIX), model)
    prompt = torch.cat([PREFIX, SEGMENT, SUFFIX])
    _, full = dense_forward(model, prompt, torch.arange(len(prompt)))
    every = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, ratio=1.0)
    # Every row recomputed and kept: the reader's KV is full prefill's.
    for layer in range(len(model.layers)):
        torch.testing.assert_close(every.kv.keys[layer], full.keys[layer], atol=1e-4, rtol=1e-4)
    assert torch.equal(every.kv.positions, full.positions)
    pieces = [10, 11]  # recomputes rows 0, 1 and 10, 11, 12; keeps 1 of the first, 2 of these
    some = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, ratio=0.2, pieces=pieces,
                         diff_keep=0.5)
    assert len(some.kept) == 3
    at = slice(len(PREFIX), len(PREFIX) + len(SEGMENT))
    for layer in range(len(model.layers)):
        rows = some.kv.keys[layer][at]
        recomputed = some.recomputed[some.kept]
        dropped = [i for i in range(len(SEGMENT)) if i not in recomputed.tolist()]
        torch.testing.assert_close(rows[dropped], cached.keys[layer][dropped])
        if layer:  # (layer 0's K depends on the token and its position only)
            assert (rows[recomputed] - cached.keys[layer][recomputed]).abs().max() > 1e-4
    # Of each piece, the kept rows are the ones that changed most, over all layers, K and V.
    fresh = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, ratio=0.2, pieces=pieces).kv
    change = {}
    for i in some.recomputed.tolist():
        change[i] = sum(float((mine[len(PREFIX) + i] - theirs[i]).norm() / theirs[i].norm())
                        for mine, theirs in [*zip(fresh.keys, cached.keys),
                                             *zip(fresh.values, cached.values)])
    kept = some.recomputed[some.kept].tolist()
    assert kept == [max([0, 1], key=change.get),
                    *sorted(sorted([10, 11, 12], key=change.get)[1:])]
    none = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, ratio=0.2, pieces=pieces,
                         diff_keep=0.0)
    assert len(none.kept) == 0
    # The pass itself saw every recomputed row: the suffix's logits do not depend on the keep.
    torch.testing.assert_close(none.logits, some.logits)


def test_approximation_error_falls_as_the_ratio_grows(tiny) -> None:
    """From another prompt, shift only is an approximation; recomputing the most deviant
    tokens brings the logits closer to full prefill. (Which selection is better on a real
    model is measured, not tested: `python -m kvrt.runtime.bench.reuse_quality`.)"""
    _, model = tiny
    donor, full = donor_kv(model, DONOR_PREFIX), full_logits(model)

    def error(**how) -> float:
        blend = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, **how)
        return float((blend.logits - full).abs().mean())

    shift_only, some, most = error(ratio=0.0), error(ratio=0.3), error(ratio=0.7)
    assert shift_only > some > most > 0
    first = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, first_k=7)
    assert first.recomputed.tolist() == list(range(7))
    per_piece = blend_prefill(model, PREFIX, SEGMENT, donor, SUFFIX, ratio=0.2, pieces=[10, 11])
    assert per_piece.recomputed.tolist() == [0, 1, 10, 11, 12]  # ceil(2.0), ceil(2.2)


def test_the_quality_measurement_scores_a_donor_reused_in_its_own_prompt_as_exact(
        tiny_checkpoint_dir) -> None:
    """The measurement's plumbing (pieces, teacher forcing, row alignment, KL): reusing a
    persona's shared block in that persona's own prompt is exact under every mode, so every
    mode must score 1.0 agreement and zero KL; another persona's block must not."""
    from kvrt.runtime.bench.reuse_quality import measure

    engine = make_engine(tiny_checkpoint_dir())
    model, tokenizer = engine.executor.model, engine.tokenizer
    same = measure(model, tokenizer, [(1, 1)])
    for mode, row in same["modes"].items():
        assert row["top1_agreement"] == 1.0, mode
        assert abs(row["first_token_kl"]) < 1e-5, mode
    other = measure(model, tokenizer, [(0, 1)])["modes"]["ratio 0.0"]
    assert other["first_token_kl"] > 1e-4
    per_message = measure(model, tokenizer, [(2, 2)], per_message=True)
    assert len(per_message["message_tokens"]) == 6
    assert all(row["top1_agreement"] == 1.0 for row in per_message["modes"].values())
