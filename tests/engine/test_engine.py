"""The engine end to end on tiny checkpoints: batching, chunked prefill, prefix caching,
preemption and aborts change no output, and every block comes back."""

import pytest
import torch

from kvrt.runtime.engine.protocol import RequestRejected, SamplingParams
from kvrt.runtime.model.tiny import init_tiny
from tests.engine.helpers import greedy, make_engine, request, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", seed=1)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 33, 48, 3, 64, 21, 40][:count]
    return [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]


def _solo(tiny, prompts, max_tokens, **engine_overrides):
    """Each prompt alone on a fresh engine with no cache: the reference output."""
    outputs = []
    for i, prompt in enumerate(prompts):
        engine = make_engine(tiny, prefix_caching=False, **engine_overrides)
        outputs.append(
            run(engine, [request(f"r{i}", prompt, greedy(max_tokens))])[f"r{i}"].token_ids
        )
    return outputs


def test_batched_chunked_prefill_equals_each_request_alone(tiny):
    prompts = _prompts(8)
    expected = _solo(tiny, prompts, 12)
    # A budget of 16 tokens a step forces prompts into chunks and mixes them with decodes.
    engine = make_engine(tiny, max_num_batched_tokens=16, max_num_seqs=5)
    results = run(engine, [request(f"r{i}", p, greedy(12)) for i, p in enumerate(prompts)])
    for i in range(len(prompts)):
        assert results[f"r{i}"].token_ids == expected[i], f"prompt {i} differs"
        assert results[f"r{i}"].final.finish_reason == "length"
    assert engine.kv.usage().in_use == 0


def test_repeated_and_extended_prompts_hit_the_cache_and_change_nothing(tiny):
    base = _prompts(1)[0] + _prompts(2, seed=5)[1]  # 22 tokens: one full block of 16
    engine = make_engine(tiny)
    first = run(engine, [request("a", base, greedy(11))])["a"]
    again = run(engine, [request("b", base, greedy(11))])["b"]
    # The next turn of a conversation: the prompt, the answer, and more.
    extended = base + first.token_ids + list(range(100, 130))
    longer = run(engine, [request("c", extended, greedy(10))])["c"]
    assert first.token_ids == again.token_ids == _solo(tiny, [base], 11)[0]
    assert longer.token_ids == _solo(tiny, [extended], 10)[0]
    assert first.final.cached_tokens == 0
    assert again.final.cached_tokens == 16
    # base (22) + 11 generated tokens, of which the first 10 have KV: 32 positions, two full
    # blocks, the second partly generated text: answers are reused in the next turn too.
    assert longer.final.cached_tokens == 32
    stats = engine.stats()
    assert stats.prefix_hits_tokens == 48
    assert stats.prefix_queries_tokens == len(base) * 2 + len(extended)


def test_cache_off_reports_no_cached_tokens(tiny):
    prompt = _prompts(1)[0] * 8
    engine = make_engine(tiny, prefix_caching=False)
    run(engine, [request("a", prompt, greedy(2))])
    again = run(engine, [request("b", prompt, greedy(2))])["b"]
    assert again.final.cached_tokens == 0
    assert engine.kv.usage().cached == 0


def test_preemption_under_a_small_pool_changes_no_output(tiny):
    prompts = _prompts(6)
    expected = _solo(tiny, prompts, 24)
    # 14 blocks of 16 tokens cannot hold six sequences of up to 88 tokens at once.
    engine = make_engine(tiny, kv_cache_memory=14 * 16 * 2 * 3 * 2 * 16 * 4)
    assert engine.kv.pool.num_blocks == 14
    results = run(engine, [request(f"r{i}", p, greedy(24)) for i, p in enumerate(prompts)])
    assert engine.scheduler.preemptions > 0
    for i in range(len(prompts)):
        assert results[f"r{i}"].token_ids == expected[i]
    assert engine.kv.usage().in_use == 0


def test_abort_frees_the_blocks_of_running_and_waiting_requests(tiny):
    engine = make_engine(tiny, max_num_seqs=1)
    engine.add(request("running", _prompts(1)[0] * 5, greedy(50)))
    engine.add(request("waiting", _prompts(1)[0], greedy(50)))
    engine.step()
    engine.step()
    assert engine.kv.usage().in_use > 0
    assert engine.abort("running") and engine.abort("waiting")
    assert not engine.abort("unknown")
    assert not engine.has_work()
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()


def test_requests_that_can_never_fit_are_rejected_at_once(tiny):
    engine = make_engine(tiny, max_model_len=64, kv_cache_memory=3 * 16 * 2 * 3 * 2 * 16 * 4)
    with pytest.raises(RequestRejected, match="maximum context length is 64"):
        engine.add(request("long", list(range(3, 60)), greedy(10)))
    with pytest.raises(RequestRejected, match="larger --kv-cache-memory"):
        engine.add(request("big", list(range(3, 40)), greedy(20)))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add(request("empty", [], greedy(1)))
    with pytest.raises(RequestRejected, match="token ids"):
        engine.add(request("oov", [10**6], greedy(1)))
    assert not engine.has_work()


def test_stop_token_ids_and_eos_end_with_reason_stop(tiny):
    engine = make_engine(tiny)
    prompt = _prompts(1)[0]
    free_run = run(engine, [request("a", prompt, greedy(8))])["a"].token_ids
    stop_at = free_run[3]
    stopped = run(engine, [request("b", prompt, greedy(8, stop_token_ids=(stop_at,)))])["b"]
    first = free_run.index(stop_at)
    assert stopped.token_ids == free_run[: first + 1]
    assert stopped.final.finish_reason == "stop"
    eos = next(iter(engine.tokenizer.eos_token_ids))
    with_eos = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=())
    engine_eos = make_engine(tiny)
    engine_eos.tokenizer.eos_token_ids = frozenset({stop_at, eos})
    result = run(engine_eos, [request("c", prompt, with_eos)])["c"]
    assert result.token_ids == free_run[: first + 1]


def test_stop_strings_are_cut_from_the_text(tiny):
    engine = make_engine(tiny)
    prompt = _prompts(1)[0]
    full = run(engine, [request("a", prompt, greedy(16))])["a"].text
    assert len(full) > 6, "the tiny model should produce some text"
    stop = full[3:6]
    cut = run(engine, [request("b", prompt, greedy(16, stop=(stop,)))])["b"]
    assert cut.text == full[: full.index(stop)]
    assert cut.final.finish_reason == "stop"
    # Streaming increments never show part of the stop string.
    assert all(stop not in o.text for o in cut.outputs)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    params = SamplingParams(
        max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True
    )
    prompt = _prompts(1)[0]
    alone = run(make_engine(tiny), [request("a", prompt, params)])["a"].token_ids
    others = [
        request(f"o{i}", p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
        for i, p in enumerate(_prompts(4, seed=3))
    ]
    batched = run(make_engine(tiny), [request("a", prompt, params), *others])["a"].token_ids
    assert alone == batched
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)
    assert run(make_engine(tiny), [request("a", prompt, other_seed)])["a"].token_ids != alone
