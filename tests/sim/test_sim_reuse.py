"""What the simulation does of the engine's reuse: outputs that re-tokenize as a real model's
text does (so each speaker's decode KV is the master of what it said), and the diff encode's
row comparisons and compaction copies priced on the step that makes them."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.engine.scheduler import Chunk
from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.sim.cost_model import CostModel
from kvrt.runtime.sim.engine import LOGIT_WIDTH, build_sim_engine
from kvrt.runtime.sim.executor import SimClock, SimExecutor, kv_rows_read
from kvrt.runtime.sim.hardware import H100
from kvrt.runtime.sim.model_shapes import SMOLLM2_135M
from kvrt.runtime.sim.words import word_token_ids
from tests.engine.helpers import greedy, run


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint_dir):
    return load_checkpoint(str(tiny_checkpoint_dir())).tokenizer


@pytest.fixture(params=["default", "tiny"])
def tokenizer(request, default_checkpoint, tiny_tokenizer):
    """The tokenizers the simulation reads text with: the default model's (kvrt sim's default),
    and the tiny test checkpoint's (a byte-level BPE of 512 ids)."""
    return default_checkpoint.tokenizer if request.param == "default" else tiny_tokenizer


def test_sampled_words_come_back_as_the_same_ids_from_text(tokenizer):
    words = word_token_ids(tokenizer, LOGIT_WIDTH)
    assert len(words) >= 50 and not set(words) & tokenizer.eos_token_ids
    rng = random.Random(0)
    for _ in range(200):
        said = [rng.choice(words) for _ in range(rng.randint(1, 60))]
        text = tokenizer.decode(said)
        assert tokenizer.encode_piece(text) == said
        # Quoted in a next prompt's message, after a speaker's name, inside the chat template.
        quoted = tokenizer.encode_chat([{"role": "user", "content": f"persona3: {text}"}])
        assert _contains(quoted, said), text


def _contains(ids: list[int], run_: list[int]) -> bool:
    return any(ids[i:i + len(run_)] == run_ for i in range(len(ids) - len(run_) + 1))


def test_the_sim_engine_says_only_word_tokens(tiny_tokenizer):
    engine = _engine(tiny_tokenizer)
    said = run(engine, [GenerateRequest("a", list(range(5, 40)), greedy(30))])["a"].token_ids
    assert set(said) <= set(word_token_ids(tiny_tokenizer, LOGIT_WIDTH)) and len(set(said)) > 5


def _engine(tokenizer, policy: str = "lru"):
    clock = SimClock()
    return build_sim_engine(SMOLLM2_135M, H100, EngineConfig(policy=policy), tokenizer,
                            clock).engine


SPEAKERS, SAID = 3, 40  # tokens each speaker says in round 1


def test_each_speaker_is_the_master_of_what_it_said(default_checkpoint):
    """Round 2 of an All-Gather: every reader quotes every speaker's round-1 output. Each quote
    is read from the speaker's own decode KV, by every reader, the first admitted included:
    one master per speaker, none computed by a reader."""
    tokenizer = default_checkpoint.tokenizer
    engine = _engine(tokenizer, policy="kvrt")
    first = run(engine, [GenerateRequest(f"s{i}", tokenizer.encode_piece(_private(i, 1)),
                                         greedy(SAID)) for i in range(SPEAKERS)])
    # Quoted as the workload does: the output's text, after the speaker's name, tokenized again.
    end = tokenizer.encode_piece("\n")
    segments_ids = [tokenizer.encode_piece(f"persona{i}: {first[f's{i}'].text}\n")
                    for i in range(SPEAKERS)]
    headers = [ids[:len(ids) - SAID - len(end)] for ids in segments_ids]
    readers = []
    for i in range(SPEAKERS):
        prompt, spans = tokenizer.encode_piece(_private(i, 2)), []
        for ids in segments_ids:
            spans.append((len(prompt), len(prompt) + len(ids)))
            prompt += ids
        prompt += tokenizer.encode_piece(" Say what you do next.")
        readers.append(GenerateRequest(f"r{i}", prompt, greedy(4), segments=tuple(spans)))
    second = run(engine, readers)
    # Segment j: its header and the output's first token are computed (a quote puts text
    # before it), then the first 15% (EPIC's recompute); the output from there to its
    # second-to-last token is read (the last one sampled was never fed back: it has no KV).
    expected = sum(
        len(h) + SAID - 1 - max(len(h) + 1, math.ceil(0.15 * (len(h) + SAID + len(end))))
        for h in headers)
    assert [second[f"r{i}"].final.cached_tokens for i in range(SPEAKERS)] == [expected] * 3
    stats = engine.stats()
    assert stats.segment_reused_tokens == SPEAKERS * expected
    # The diff encode compared each reader's recomputed rows inside the outputs with the
    # speaker's: those past the output's first token, before the 15% mark.
    compared = sum(math.ceil(0.15 * (len(h) + SAID + len(end))) - (len(h) + 1) for h in headers)
    assert engine.executor.totals.rows_compared == SPEAKERS * compared > 0
    assert engine.kv.usage().in_use == 0


def _private(agent: int, round_: int) -> str:
    return (f"You are agent number {agent} in round {round_}, and these are your own "
            f"memories of the village, written for agent {agent} alone. " * 2)


def test_the_diff_encodes_rows_cost_their_bytes_at_the_kv_bandwidth():
    clock = SimClock(1.0)
    executor = SimExecutor(CostModel(SMOLLM2_135M, H100), clock, vocab_size=64, choices=[7])
    # SmolLM2-135M's KV row: K and V, 30 layers, 3 KV heads of 64, bf16 on the H100.
    row_bytes = 2 * 30 * 3 * 64 * 2
    bandwidth = 3.35e12 * 0.7  # the H100's HBM, at the KV gathers' efficiency
    change = executor.change(torch.arange(10), torch.arange(10, 20), shift=3)
    compare_s = 2 * 10 * row_bytes / bandwidth  # its rows and the master's read
    assert clock() == pytest.approx(1.0 + compare_s, rel=1e-12)
    executor.copy(torch.tensor([40, 41, 42]), torch.tensor([1, 2, 3]))
    copy_s = (3 + 3) * row_bytes / bandwidth  # each moved row read, then written
    assert clock() == pytest.approx(1.0 + compare_s + copy_s, rel=1e-12)
    assert executor.totals.rows_seconds == pytest.approx(compare_s + copy_s, rel=1e-12)
    assert (executor.totals.rows_compared, executor.totals.rows_copied) == (10, 3)
    # The stand-in ranking: the first row changed most, so the first rows are kept.
    assert change.argsort(descending=True).tolist() == list(range(10))


def test_the_rows_time_goes_to_the_step_that_post_processes_it():
    executor = SimExecutor(CostModel(SMOLLM2_135M, H100), None, vocab_size=64, choices=[7])
    executor.change(torch.arange(4), torch.arange(4), shift=0)
    assert executor.last_step_seconds == pytest.approx(8 * 23_040 / (3.35e12 * 0.7))
    assert executor.totals.seconds == executor.last_step_seconds


def _reading(name: str, slots: list[int], shifts: list[int] | None, new: int = 1) -> Chunk:
    """A chunk computing the last `new` of len(slots) positions mapped to `slots`."""
    table = BlockTable(4, slots=torch.tensor(slots),
                       shifts=None if shifts is None else torch.tensor(shifts, dtype=torch.int32))
    seq = Sequence(request=GenerateRequest(name, list(range(len(slots))), greedy(1)),
                   table=table, arrival=0.0, token_ids=list(range(len(slots))))
    return Chunk(seq, new, len(slots))


def test_the_torch_path_reads_a_shared_block_once_for_its_decodes():
    # Blocks of 4. Decodes a and b read block 5 spliced (a at shift 3, b at 2); a and c read
    # block 0 at shift 0 (a prefix both hold); d is a prefill chunk of 3 over 7 positions.
    a = _reading("a", [0, 1, 2, 3, 20, 21, 22, 23, 4, 5], [0, 0, 0, 0, 3, 3, 3, 3, 0, 0])
    b = _reading("b", [8, 9, 10, 11, 20, 21, 22, 23, 12], [0, 0, 0, 0, 2, 2, 2, 2, 0])
    c = _reading("c", [0, 1, 2, 3, 28, 29], None)
    d = _reading("d", [40, 41, 42, 43, 44, 45, 46], None, new=3)
    # Blocks 0 and 5 once, whole (8 rows); a's 2 own rows, b's 5, c's 2; d's whole context, 7.
    assert kv_rows_read([a, b, c, d]) == 8 + 2 + 5 + 2 + 7
    assert kv_rows_read([c, d]) is None  # nothing spliced in the batch: every context is read
    # Only a at a shift: its spliced block is still read as one block (all 4 rows).
    assert kv_rows_read([_reading("e", [20, 21, 22], [1, 1, 1])]) == 4


def test_a_device_that_reads_shared_blocks_once_prices_those_rows():
    chunks = [
        _reading("a", [0, 1, 2, 3, 20, 21, 22, 23, 4, 5], [0, 0, 0, 0, 3, 3, 3, 3, 0, 0]),
        _reading("b", [8, 9, 10, 11, 20, 21, 22, 23, 12], [0, 0, 0, 0, 2, 2, 2, 2, 0]),
    ]
    once = dataclasses.replace(H100, shared_reads_once=True)
    times = {}
    for device in (H100, once):
        executor = SimExecutor(CostModel(SMOLLM2_135M, device), None, vocab_size=64, choices=[7])
        executor.run(chunks)
        times[device.shared_reads_once] = executor.last_step_seconds
    # The two differ by the rows not read again: 19 in the contexts, 4 + 4 + 2 + 5 = 15 read.
    # Decodes this small are bound by the weights' read; the KV term is separate (it adds).
    row_bytes = 2 * 30 * 3 * 64 * 2
    assert times[False] - times[True] == pytest.approx(4 * row_bytes / (3.35e12 * 0.7),
                                                       rel=1e-9)
