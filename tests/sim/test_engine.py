"""The real engine over the simulated executor: requests run end to end, prefix caching hits
exactly as in the real engine, and the clock advances by the cost model's prediction."""

import dataclasses

import pytest
import torch

from kvrt.runtime.config import ConfigError, EngineConfig
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.engine.scheduler import Chunk
from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.manager import BlockTable
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.sim.cost_model import CostModel
from kvrt.runtime.sim.engine import KV_RESERVE, MAX_BLOCKS, build_sim_engine, sim_kv_blocks
from kvrt.runtime.sim.executor import SimClock, SimExecutor
from kvrt.runtime.sim.hardware import H100, GiB
from kvrt.runtime.sim.model_shapes import LLAMA31_8B, QWEN25_14B, weight_bytes
from tests.engine.helpers import greedy, make_engine, request, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kvrt.runtime.model.tiny import init_tiny

    folder = init_tiny(tmp_path_factory.mktemp("sim-tiny") / "llama", arch="llama", seed=1)
    return folder, load_checkpoint(str(folder))


def _sim(tokenizer, shape=LLAMA31_8B, device=H100, **settings):
    clock = SimClock()
    engine = build_sim_engine(shape, device, EngineConfig(**settings), tokenizer, clock).engine
    return engine, clock


def _prompts(count: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 40, 17, 90, 3, 64)][
        :count
    ]


def test_requests_run_end_to_end(tiny):
    _, checkpoint = tiny
    tokenizer = checkpoint.tokenizer
    engine, clock = _sim(tokenizer, max_num_batched_tokens=32, max_num_seqs=4)
    prompts = _prompts(6, tokenizer.vocab_size)
    results = run(engine, [request(f"r{i}", p, greedy(12)) for i, p in enumerate(prompts)])
    outputs = [results[f"r{i}"].token_ids for i in range(6)]
    for tokens in outputs:
        assert len(tokens) == 12
        assert all(0 <= t < tokenizer.vocab_size for t in tokens)
        assert not set(tokens) & tokenizer.eos_token_ids
    assert len({t for tokens in outputs for t in tokens}) > 30  # varied, not a constant
    totals = engine.executor.totals
    assert clock.now() == pytest.approx(totals.seconds) and clock.now() > 0
    assert totals.tokens == sum(map(len, prompts)) + 6 * 11  # the last token is never computed
    assert totals.sampled == 6 * 12
    assert engine.kv.usage().in_use == 0


def test_output_is_deterministic(tiny):
    tokenizer = tiny[1].tokenizer
    prompt = _prompts(2, tokenizer.vocab_size)[1]
    first = run(_sim(tokenizer)[0], [request("a", prompt, greedy(8))])["a"].token_ids
    again = run(_sim(tokenizer)[0], [request("b", prompt, greedy(8))])["b"].token_ids
    assert first == again


def test_prefix_caching_hits_as_in_the_real_engine(tiny):
    folder, checkpoint = tiny
    base = _prompts(3, 500)[2] + [7, 8, 9, 10, 11]  # 22 tokens: one full block of 16

    def cached_tokens(engine) -> list[int]:
        first = run(engine, [request("a", base, greedy(11))])["a"]
        again = run(engine, [request("b", base, greedy(11))])["b"]
        # The next turn: the prompt, the engine's own answer, and more.
        extended = base + first.token_ids + list(range(100, 130))
        longer = run(engine, [request("c", extended, greedy(4))])["c"]
        salted = run(engine, [request("d", base, greedy(2), salt=b"other")])["d"]
        return [r.final.cached_tokens for r in (first, again, longer, salted)]

    real = cached_tokens(make_engine(folder))
    sim, _ = _sim(checkpoint.tokenizer, shape=checkpoint.config, kv_cache_memory=8 * 1024**2)
    simulated = cached_tokens(sim)
    assert real == simulated == [0, 16, 32, 0]


def test_the_clock_advances_by_the_cost_models_prediction(tiny):
    tokenizer = tiny[1].tokenizer
    engine, clock = _sim(tokenizer, max_num_batched_tokens=64)
    prompt = _prompts(3, tokenizer.vocab_size)[2]  # 17 tokens
    engine.add(request("r", prompt, greedy(3)))
    model = CostModel(LLAMA31_8B, H100)
    expected = 0.0
    for part in [(17, 17, True), (1, 18, True), (1, 19, True)]:
        engine.step()
        expected += model.step_time([part])
        assert clock.now() == pytest.approx(expected, rel=1e-12)
    assert not engine.has_work()
    assert engine.executor.totals.steps == 3
    # One decode of an 8B model on an H100: milliseconds, dominated by reading 16 GB of weights.
    assert 5e-3 < engine.executor.last_step_seconds < 10e-3


def test_kv_blocks_from_device_memory_or_the_users_setting():
    config = EngineConfig()
    kv_bytes = int(80 * GiB * (1 - KV_RESERVE)) - weight_bytes(LLAMA31_8B)
    assert sim_kv_blocks(LLAMA31_8B, H100, config) == kv_bytes // (16 * 131072)  # ~27k blocks
    assert sim_kv_blocks(LLAMA31_8B, H100, EngineConfig(kv_cache_memory=64 * 1024**2)) == 32
    tiny_model = dataclasses.replace(LLAMA31_8B, num_layers=1, num_kv_heads=1, num_heads=1)
    assert sim_kv_blocks(tiny_model, H100, config) == MAX_BLOCKS
    small = dataclasses.replace(H100, name="small", memory_bytes=16 * GiB)
    with pytest.raises(ConfigError, match="no room"):
        sim_kv_blocks(QWEN25_14B, small, config)


def test_a_request_longer_than_the_pool_is_rejected(tiny):
    from kvrt.runtime.engine.protocol import RequestRejected

    engine, _ = _sim(tiny[1].tokenizer, kv_cache_memory=4 * 1024**2)  # 2 blocks of 16 tokens
    with pytest.raises(RequestRejected, match="KV blocks"):
        engine.add(request("big", list(range(3, 40)), greedy(1)))


def chunk(seq: Sequence, count: int) -> Chunk:
    """A prefill chunk of `count` tokens from where `seq` is."""
    return Chunk(seq, count, seq.num_computed + count)


def test_sim_executor_logits():
    model = CostModel(LLAMA31_8B, H100)
    clock = SimClock(5.0)
    executor = SimExecutor(model, clock, vocab_size=50, choices=range(40, 50))
    seqs = []
    for i, prompt in enumerate(([1, 2, 3], [1, 2, 3], [4, 5, 6, 7])):
        seq = Sequence(
            request=GenerateRequest(f"s{i}", prompt, greedy(1)),
            table=BlockTable(16),
            arrival=0.0,
            token_ids=list(prompt),
        )
        seqs.append(seq)
    chunks = [chunk(seqs[0], 3), chunk(seqs[1], 2), chunk(seqs[2], 4)]  # the 2nd samples nothing
    logits = executor.run(chunks)
    assert logits.shape == (2, 50) and logits.dtype == torch.float32
    picks = logits.argmax(-1).tolist()
    assert all(40 <= t < 50 for t in picks)
    assert picks == executor.run([chunk(seqs[0], 3), chunk(seqs[2], 4)]).argmax(-1).tolist()
    step = model.step_time([(3, 3, True), (2, 2, False), (4, 4, True)])
    assert executor.totals.steps == 2 and clock() == pytest.approx(
        5.0 + step + executor.last_step_seconds
    )
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    narrow = SimExecutor(model, SimClock(), vocab_size=150_000, choices=[3, 7], logit_width=64)
    assert narrow.run(chunks).shape == (2, 64)
    with pytest.raises(ValueError):
        SimExecutor(model, SimClock(), vocab_size=150_000, choices=[3, 64], logit_width=64)
