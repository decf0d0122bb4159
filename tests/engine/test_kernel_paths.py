"""The engine on the Triton kernels (in Triton's CPU interpreter) gives what it gives on the torch
kernels, on tiny llama, qwen2 and qwen3 checkpoints: plain prompts batched with chunked prefill,
a prefix hit, an offload/upload round trip through the host tier, and segments spliced in at
several shifts (read in place on both paths, which store the same rows).

What is compared: every request's logits at every step, within `ATOL`, its greedy tokens,
exactly, and how many prompt tokens it read from cache. Logits are not bit-equal because the
paths sum in different orders (the Triton kernel's online softmax over tiles of 32 keys and its
RoPE of shifted K on load, against SDPA and the torch decode's rotation of the query back per
block); in
float32 they differ by up to ~4e-5 here. Float order alone can flip a greedy token only at a
near tie: where the top two logits lie within 2 * ATOL and the tokens differ, the request's
comparison stops there (its contexts differ from then on); any other token that differs is a
real divergence. (The tiny checkpoints spread their logits, tiny.py: no step of these scenarios
comes that close, the nearest lead is ~1e-3, so every step is compared today.)

Paths that store different rows compute different KV, not just round differently: when the
torch path copied a reader's rows at a second shift and the Triton path read them in place and
diff-encoded them, the splice test's logits differed by 6e-3 to 0.1 from the first decode step.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvrt.kernels._triton_support import (
    TRITON_INTERPRET_ENV,
    interpret_enabled,
    triton_available,
    triton_kernels,
)
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.protocol import Attribution, GenerateRequest
from kvrt.runtime.model.tiny import ARCHS
from tests.engine.helpers import Result, greedy, make_engine, run

ATOL = 1e-4
OWNER = ("run-1", "coder")


@pytest.fixture(scope="module")
def interpreted() -> None:
    """Triton's interpreter, or a skip. Its mode is fixed per process at Triton's first import:
    tests/conftest.py asks for the interpreter before anything imports Triton on a machine
    without a GPU. On a GPU machine the kernels run compiled, and forcing the interpreter here
    would fix it for every later test of the process."""
    if not triton_available():
        pytest.skip("Triton is not installed")
    if not interpret_enabled():
        pytest.skip(f"{TRITON_INTERPRET_ENV} is not set: Triton runs compiled in this process")
    try:
        interpreted = triton_kernels().INTERPRETED
    except RuntimeError as err:  # imported compiled before the variable was set
        pytest.skip(str(err))
    if not interpreted:
        pytest.skip("Triton was imported compiled in this process")


@pytest.fixture(scope="module", params=ARCHS)
def folder(request, tiny_checkpoint_dir):
    return tiny_checkpoint_dir(request.param, seed=5)


class Recorded:
    """An engine whose executor records each request's logits rows, step by step."""

    def __init__(self, folder, kernels: str, **settings) -> None:
        self.engine: Engine = make_engine(folder, kernels=kernels, device="cpu",
                                          dtype="float32", **settings)
        self.logits: dict[str, list[torch.Tensor]] = {}
        real = self.engine.executor.run

        def run_and_record(chunks):
            logits = real(chunks)
            for chunk, row in zip([c for c in chunks if c.wants_logits], logits):
                self.logits.setdefault(chunk.seq.request_id, []).append(row.clone())
            return logits

        self.engine.executor.run = run_and_record  # type: ignore[method-assign]


def both(folder, scenario, **settings) -> dict[str, tuple[Recorded, dict[str, Result]]]:
    """Runs `scenario(engine) -> results` on a torch engine and on a Triton one; checks that
    each ends with its KV accounted for."""
    out = {}
    for kernels in ("torch", "triton"):
        recorded = Recorded(folder, kernels, **settings)
        results = scenario(recorded.engine)
        recorded.engine.check_integrity()
        assert recorded.engine.kv.pool.usage().in_use == 0
        recorded.engine.close()
        out[kernels] = recorded, results
    return out


def assert_same(runs: dict[str, tuple[Recorded, dict[str, Result]]]) -> None:
    """Each request's tokens equal, and its logits within ATOL, step by step; past a step
    whose top two logits lie within 2 * ATOL (a near tie) the two may pick different tokens,
    and then see different contexts: the comparison of that request stops there."""
    (torch_rec, torch_out), (triton_rec, triton_out) = runs["torch"], runs["triton"]
    assert torch_out.keys() == triton_out.keys()
    for request_id, expected in torch_out.items():
        got = triton_out[request_id]
        assert got.final.cached_tokens == expected.final.cached_tokens, request_id
        want_logits, got_logits = torch_rec.logits[request_id], triton_rec.logits[request_id]
        assert len(want_logits) == len(got_logits) == len(expected.token_ids)
        steps = zip(want_logits, got_logits, expected.token_ids, got.token_ids)
        for step, (want, seen, want_token, got_token) in enumerate(steps):
            torch.testing.assert_close(seen, want, atol=ATOL, rtol=0,
                                       msg=lambda m, r=request_id, s=step: f"{r} step {s}: {m}")
            if got_token != want_token:
                top = want.topk(2).values
                assert top[0] - top[1] <= 2 * ATOL, f"{request_id} step {step}: tokens differ"
                break


def tokens(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (length,), generator=gen).tolist()


def test_plain_prompts_batched_with_chunked_prefill(interpreted, folder):
    """Three prompts at once, prefill chunks of at most 16 tokens: steps mix prefill chunks
    with decode tokens, and sequences of unlike lengths share the decode batch."""
    prompts = {"a": tokens(1, 7), "b": tokens(2, 19), "c": tokens(3, 30)}

    def scenario(engine):
        return run(engine, [GenerateRequest(r, p, greedy(5)) for r, p in prompts.items()])

    assert_same(both(folder, scenario, max_num_batched_tokens=16, prefix_caching=False))


def test_a_prefix_hit(interpreted, folder):
    first, shared = tokens(4, 40), 37

    def scenario(engine):
        out = run(engine, [GenerateRequest("first", first, greedy(4))])
        out |= run(engine, [GenerateRequest("hit", first[:shared] + tokens(5, 9), greedy(5))])
        assert out["hit"].final.cached_tokens == 32  # two full blocks of 16
        return out

    assert_same(both(folder, scenario))


def test_an_offload_upload_round_trip(interpreted, folder):
    """The owner's cached prefix goes to the host tier and back (admission uploads it): the
    call that reads it must see the same rows on both paths."""
    prompt = tokens(6, 50)

    def call(request_id, prompt, max_tokens):
        return GenerateRequest(request_id, prompt, greedy(max_tokens),
                               attribution=Attribution(*OWNER))

    def scenario(engine):
        out = run(engine, [call("before", prompt, 4)])
        moved = engine.kv.offload(OWNER)
        assert moved > 0 and engine.kv.host is not None and engine.kv.host.wait() == moved
        assert engine.kv.match_prefix(prompt, b"").block_ids == []  # gone from the device
        out |= run(engine, [call("after", prompt + tokens(7, 5), 5)])
        assert out["after"].final.cached_tokens == moved * 16
        assert engine.stats().kv_blocks_uploaded == moved
        return out

    assert_same(both(folder, scenario, host_cache_memory=2 * 1024**2))


# Two segments, each inside its donor's full blocks (a donor's copy is its prompt's keyed rows).
SEGMENT, OTHER = tokens(8, 24), tokens(9, 28)


def reused(segment: list[int]) -> int:
    """The rows a reader reads of `segment`: all but its first ones, which it recomputes."""
    return len(segment) - math.ceil(0.15 * len(segment))


def test_segments_spliced_at_several_shifts(interpreted, folder):
    """Donors compute two segments; readers then splice them in at other positions: one reader
    at two shifts, the others each at one shift, forwards and backwards, all read in place.
    Default policy options: the recomputed rows that changed least are given back for the
    master's (diff encode)."""
    donors = [
        GenerateRequest("donor-a", tokens(10, 8) + SEGMENT + tokens(11, 2), greedy(2),
                        segments=((8, 32),)),
        GenerateRequest("donor-b", tokens(12, 4) + OTHER + tokens(13, 2), greedy(2),
                        segments=((4, 32),)),
    ]
    readers = [  # shifts: +8 and +36; +12; -3
        # Its recomputed rows of SEGMENT lie in an unkeyed block (16..31): some are given
        # back for the master's.
        GenerateRequest("two-shifts", tokens(14, 16) + SEGMENT + OTHER + tokens(15, 4),
                        greedy(5), segments=((16, 40), (40, 68))),
        GenerateRequest("forward", tokens(16, 20) + SEGMENT + tokens(17, 3), greedy(5),
                        segments=((20, 44),)),
        GenerateRequest("backward", tokens(18, 1) + OTHER + tokens(19, 3), greedy(5),
                        segments=((1, 29),)),
    ]

    def scenario(engine):
        out = run(engine, donors)
        out |= run(engine, readers)
        expected = {"two-shifts": reused(SEGMENT) + reused(OTHER), "forward": reused(SEGMENT),
                    "backward": reused(OTHER)}
        assert {r: out[r].final.cached_tokens for r in expected} == expected
        stats = engine.stats()
        assert stats.segment_dropped_tokens > 0  # the diff encode ran
        return out

    assert_same(both(folder, scenario, policy="kvrt"))
