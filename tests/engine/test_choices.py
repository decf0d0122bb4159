"""n > 1: the prompt is computed once and every choice forks its KV (full blocks shared by
reference, the partly filled last block copied); each choice is what a request of its own
would have produced, seeded as vLLM seeds choices (choice i: seed + i); every block comes back.
"""

from __future__ import annotations

import pytest
import torch

from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import make_engine, request, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=1)


def _prompt(length: int) -> list[int]:
    return torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(7)).tolist()


def _choices(engine: Engine, req: GenerateRequest) -> dict[int, list[int]]:
    """Runs one request to its end; each choice's tokens, by index (outputs of different
    choices interleave)."""
    by_index: dict[int, list[int]] = {}
    ended: set[int] = set()
    engine.add(req)
    while engine.has_work():
        for request_id, output in engine.step():
            assert request_id == req.request_id and output.index not in ended
            by_index.setdefault(output.index, []).extend(output.token_ids)
            if output.finish_reason is not None:
                ended.add(output.index)
    engine.check_integrity()
    assert ended == set(range(req.params.n))
    return by_index


def _sampled(max_tokens: int, seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n,
                          ignore_eos=True)


@pytest.mark.parametrize("length", [37, 32, 5])  # a partial last block, none, only a partial one
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_each_choice_equals_its_own_request_and_the_prompt_is_computed_once(
        tiny, length, prefix_caching):
    prompt, n, max_tokens, seed = _prompt(length), 4, 9, 1234
    engine = make_engine(tiny, prefix_caching=prefix_caching)
    choices = _choices(engine, request("r", prompt, _sampled(max_tokens, seed, n)))
    stats = engine.stats()
    # The prompt once, then each choice's tokens after its first (drawn from the prompt's
    # logits); the last token of each is never computed.
    assert stats.computed_tokens == length + n * (max_tokens - 1)
    assert stats.prompt_tokens == length and stats.generation_tokens == n * max_tokens
    assert stats.kv_blocks_in_use == 0
    # The reference: each choice alone, a request of its own on a fresh engine seeded
    # seed + i, nothing shared nor forked.
    for i in range(n):
        alone = make_engine(tiny, prefix_caching=False)
        expected = run(alone, [request("a", prompt, _sampled(max_tokens, seed + i))])["a"]
        assert choices[i] == expected.token_ids, f"choice {i} differs"
    assert len({tuple(c) for c in choices.values()}) > 1  # the choices really differ


def test_the_forks_share_the_prompt_blocks_while_they_run(tiny):
    """Right after the prompt's step: each of the 3 choices holds the 2 full prompt blocks by
    reference (ref count 3) and a copy of the partial third of its own."""
    engine = make_engine(tiny)
    engine.add(request("r", _prompt(40), _sampled(5, 3, n=3)))
    engine.step()  # the prompt's prefill (it fits one step's budget): every choice forks
    tables = [seq.table for seq in engine.scheduler.running]
    assert len(tables) == 3
    blocks = engine.kv.pool.blocks
    shared = tables[0].block_ids()[:2]
    assert all(t.block_ids()[:2] == shared for t in tables)
    assert [blocks[b].ref_count for b in shared] == [3, 3]
    partial = {t.block_ids()[2] for t in tables}
    assert len(partial) == 3 and all(blocks[b].ref_count == 1 for b in partial)
    engine.check_integrity()
    assert engine.abort("r")  # ends every choice: all blocks come back
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()


def test_greedy_choices_are_all_the_greedy_answer(tiny):
    prompt = _prompt(21)
    engine = make_engine(tiny)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=3)
    choices = _choices(engine, request("g", prompt, greedy))
    alone = run(make_engine(tiny, prefix_caching=False),
                [request("a", prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                     ignore_eos=True))])["a"]
    assert list(choices.values()) == [alone.token_ids] * 3


def test_choices_of_a_call_with_segments_wait_and_are_computed(tiny):
    """A call with segments does not fork (the reuse planner follows each sequence that
    computes them): its other choices wait and are admitted, reading what the prefix cache
    holds; each is still its own seeded request."""
    prompt, n, max_tokens, seed = _prompt(37), 3, 6, 99
    engine = make_engine(tiny)
    req = GenerateRequest(request_id="s", prompt_token_ids=prompt,
                          params=_sampled(max_tokens, seed, n), segments=((4, 30),))
    choices = _choices(engine, req)
    stats = engine.stats()
    # Choice 0 computes the prompt; the others its partial last block again (the two full
    # blocks are prefix hits); then every choice its tokens but the last.
    assert stats.computed_tokens == 37 + (n - 1) * (37 - 32) + n * (max_tokens - 1)
    assert stats.kv_blocks_in_use == 0
    for i in range(n):
        alone = make_engine(tiny, prefix_caching=False)
        expected = run(alone, [request("a", prompt, _sampled(max_tokens, seed + i))])["a"]
        assert choices[i] == expected.token_ids, f"choice {i} differs"


def _pool(count: int) -> int:
    """KV memory for `count` blocks of the tiny llama (sized as test_engine.py sizes them)."""
    return count * 16 * 2 * 3 * 2 * 16 * 4


@pytest.mark.parametrize(("blocks", "max_tokens"), [(4, 27), (8, 40)])
def test_choices_under_a_small_pool_change_no_output(tiny, blocks, max_tokens):
    """4 blocks: after the prompt's 3, one is left, so one choice forks and the other waits
    (computed at its admission); 8: every choice forks, and their growth preempts. Either
    way each choice is its own seeded request, and every block comes back."""
    prompt, n, seed = _prompt(37), 3, 5
    engine = make_engine(tiny, kv_cache_memory=_pool(blocks))
    assert engine.kv.pool.num_blocks == blocks
    choices = _choices(engine, request("p", prompt, _sampled(max_tokens, seed, n)))
    assert engine.kv.usage().in_use == 0
    assert engine.scheduler.preemptions > 0 or blocks == 4
    # Something was computed twice: a waiting choice's partial block, or a preempted one.
    assert engine.stats().computed_tokens > 37 + n * (max_tokens - 1)
    for i in range(n):
        alone = make_engine(tiny, prefix_caching=False)
        expected = run(alone, [request("a", prompt, _sampled(max_tokens, seed + i))])["a"]
        assert choices[i] == expected.token_ids, f"choice {i} differs"


def test_abort_before_the_fork_frees_everything(tiny):
    engine = make_engine(tiny, max_num_batched_tokens=16)
    engine.add(request("r", _prompt(40), _sampled(5, 1, n=4)))
    engine.step()  # the first 16 of 40 prompt tokens: no choice has forked yet
    assert engine.kv.usage().in_use > 0 and len(engine.scheduler.running) == 1
    assert engine.abort("r")
    assert not engine.has_work() and engine.kv.usage().in_use == 0
    engine.check_integrity()
