"""The answer-quality measurement's plumbing on a tiny model: its rounds plant what they ask
about and are seeded; recomputing every shared token with every row kept is full prefill, so
the answers must be identical; its full-prefill answers are plain greedy decoding. (The default
model's figures are measured, not tested: README, "How good is approximate KV?")"""

from __future__ import annotations

import json

import pytest
import torch

from kvrt.runtime.bench.answer_quality import main, make_rounds, measure
from kvrt.runtime.bench.reuse_quality import greedy, pieces
from tests.engine.helpers import make_engine


def test_rounds_plant_what_they_ask_and_are_seeded() -> None:
    rounds = make_rounds(seed=3, count=6, agents=4)
    assert rounds == make_rounds(seed=3, count=6, agents=4)
    assert rounds != make_rounds(seed=4, count=6, agents=4)
    assert len({tuple(r.messages) for r in rounds}) == 6  # no two rounds alike
    for round_ in rounds:
        assert len(round_.personas) == len(round_.questions) == 4
        assert len(round_.messages) == 5  # a header, then one fact per speaker
        meeting = "\n".join(round_.messages[1:])
        about = [q.about for q in round_.questions]
        assert about.count("persona") == 1 and about.count("fact") == 3
        for persona, question in zip(round_.personas, round_.questions):
            where = persona if question.about == "persona" else meeting
            assert question.key in where, (question, where)
            # The key is in the meeting or the reader's persona, never in the question.
            assert question.key not in question.text


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint_dir):
    return make_engine(tiny_checkpoint_dir())


def test_full_recompute_answers_exactly_as_full_prefill(tiny_engine) -> None:
    model, tokenizer = tiny_engine.executor.model, tiny_engine.tokenizer
    rounds = make_rounds(seed=1, count=1, agents=3)
    results = measure(model, tokenizer, rounds, ratios=(0.0, 1.0), diff_keep=1.0)
    full_recompute, shift_only = results["answers"]["1.0"], results["answers"]["0.0"]
    assert len(full_recompute) == len(shift_only) == 6  # every ordered pair of 3
    for row in full_recompute:
        assert row["exact"] and row["reused"] == row["full"]
        assert row["agreement"] == 1.0
        assert row["recall_reused"] == row["recall_full"]
    assert results["ratios"]["1.0"]["exact"] == 1.0
    # Another persona's KV shifted in is an approximation: the harness sees the difference.
    assert results["ratios"]["0.0"]["top1_agreement"] < 1.0
    # The full-prefill answer is greedy decoding of the reader's prompt, cut after the first
    # token that ends it.
    row = full_recompute[0]
    round_ = rounds[0]
    reader = round_.personas[row["reader"]]
    prefix, segment, suffix, _ = pieces(tokenizer, reader, messages=round_.messages,
                                        question=round_.questions[row["reader"]].text)
    tokens = greedy(model, torch.tensor(prefix + segment + suffix), 24).tolist()
    ends = [i for i, t in enumerate(tokens)
            if t in tokenizer.eos_token_ids or "\n" in tokenizer.decode([t])]
    assert row["full"] == tokenizer.decode(tokens[:ends[0] + 1] if ends else tokens).strip()


def test_the_meeting_read_as_one_run_recomputes_its_first_message_only(tiny_engine) -> None:
    """Read as a run, the reader recomputes the first half of the meeting's first message
    alone: with no recompute the two reads are the same KV, with some they differ."""
    model, tokenizer = tiny_engine.executor.model, tiny_engine.tokenizer
    rounds = make_rounds(seed=2, count=1, agents=3)
    by_message = measure(model, tokenizer, rounds, ratios=(0.0, 0.5), diff_keep=1.0)
    as_run = measure(model, tokenizer, rounds, ratios=(0.0, 0.5), diff_keep=1.0, run=True)
    assert by_message["answers"]["0.0"] == as_run["answers"]["0.0"]
    assert [r["agreement"] for r in by_message["answers"]["0.5"]] != [
        r["agreement"] for r in as_run["answers"]["0.5"]]


def test_the_command_prints_a_table_and_writes_json(tiny_checkpoint_dir, tmp_path,
                                                     capsys) -> None:
    out = tmp_path / "answers.json"
    assert main(["--model", str(tiny_checkpoint_dir()), "--rounds", "1", "--agents", "2",
                 "--ratios", "0", "0.5", "--seed", "7", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 0.0 | 2 |" in table and "| 0.5 | 2 |" in table
    results = json.loads(out.read_text())
    assert results["seed"] == 7 and len(results["rounds"]) == 1
    for row in results["ratios"].values():
        assert row["pairs"] == 2
        for field in ("exact", "recall_reused", "recall_full", "top1_agreement"):
            assert 0.0 <= row[field] <= 1.0
        assert row["min_agreement"] <= row["top1_agreement"]
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_checkpoint_dir()), "--agents", "1"])
