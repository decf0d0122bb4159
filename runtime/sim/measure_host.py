"""Measures kvrt's own per-step host work, for the `kvrt` engine profile (engine_profiles.py).

    python -m kvrt.runtime.sim.measure_host [--arch qwen2]    ~1 min; prints what it measured

On a GPU, kvrt's engine thread does in Python, every step and without overlap with the device
(the sampler's `.tolist()` waits for the step's logits): schedule, `build_batch` (each
sequence's slot-table mirror brought up to date, the padded table built; on the CPU that
padding is host work, on a GPU it runs on the device), the forward's kernel launches (eager
PyTorch, no CUDA graphs), sampling and the scheduler's update and detokenizing. All but the
launches and the copies are plain CPU work, measured here the way they run: the real engine
on a tiny checkpoint (hidden 64, so its forward is a small share of a step), decode steps of B
sequences at context C, each step's time less its forward's.

    host seconds = fixed + per-sequence * B + per-slot-token * B * C    (least squares, >= 0)

The forward's launches are counted, not timed: the aten ops one forward dispatches (views,
which launch nothing, left out), per layer and outside the layers, with the paged-attention and
KV-store kernels counted apart (one Triton launch each on a GPU). This machine's eager dispatch
cost per op is timed on a tiny tensor. Torch runs on one thread: the tensors are small, and
threads only meet other processes' work.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.sim.calibrate import nnls

BATCHES = (1, 8, 32, 128)
CONTEXTS = (128, 512, 1536)  # the tiny checkpoint's positions end at 2048
STEPS = 5  # decode steps timed per point; the fastest counts (other work only adds time)


@dataclass(frozen=True, slots=True)
class HostCosts:
    fixed: float  # seconds per step
    per_sequence: float  # seconds per decoding sequence
    per_slot_token: float  # seconds per token of the slot tables built
    median_rel_error: float
    launches_per_layer: int  # aten ops that launch work, attention and KV store excluded
    launches_outside_layers: int
    kernel_calls_per_layer: int  # paged attention + KV store: one launch each under Triton
    torch_kernel_ops_per_layer: int  # what those two dispatch on the torch path
    dispatch_seconds: float  # one eager op on a tiny CPU tensor, this machine


def _engine(checkpoint: str, dtype: str = "float32") -> Engine:
    from kvrt.runtime.engine.factory import build_engine

    config = EngineConfig(model=checkpoint, device="cpu", dtype=dtype, kernels="torch",
                          kv_cache_memory=256 * 2**20, max_num_seqs=max(BATCHES),
                          max_num_batched_tokens=8192)
    return build_engine(config)[0]


def _decode_seconds(engine: Engine, batch: int, context: int, forward_time: list[float],
                    gen: torch.Generator) -> float:
    """The fastest of STEPS decode steps of `batch` sequences at ~`context`, forward excluded."""
    vocab = engine.vocab_size
    shared = torch.randint(3, vocab, (context,), generator=gen).tolist()
    ids = []
    params = SamplingParams(max_tokens=STEPS + 2, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        own = torch.randint(3, vocab, (1,), generator=gen).tolist()
        ids.append(f"host-{batch}-{context}-{i}")
        engine.add(GenerateRequest(ids[-1], shared + own, params))
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_computed < len(s.token_ids) - 1
                                   for s in scheduler.running):
        engine.step()  # prefill (the shared prefix once, then the cache)
    best = float("inf")
    for _ in range(STEPS):
        forward_time.clear()
        start = time.perf_counter()
        engine.step()
        best = min(best, time.perf_counter() - start - sum(forward_time))
    for request_id in ids:
        engine.abort(request_id)
    return best


def measure_host(checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows (1, B, B * C) and host seconds, one per grid point."""
    engine = _engine(checkpoint)
    model = engine.executor.model  # type: ignore[attr-defined]
    forward, forward_time = model.forward, []

    def timed_forward(batch, kv_pool):
        start = time.perf_counter()
        out = forward(batch, kv_pool)
        forward_time.append(time.perf_counter() - start)
        return out

    model.forward = timed_forward
    gen = torch.Generator().manual_seed(0)
    _decode_seconds(engine, 4, 64, forward_time, gen)  # warm-up
    rows, seconds = [], []
    for batch, context in itertools.product(BATCHES, CONTEXTS):
        seconds.append(_decode_seconds(engine, batch, context, forward_time, gen))
        rows.append([1.0, batch, batch * context])
    return np.array(rows), np.array(seconds)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view (its outputs in its inputs' storage) launches nothing. The schema cannot tell:
        # under inference mode `aten.to` arrives whole, and may alias or copy.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        view = bool(outputs) and all(t.untyped_storage().data_ptr() in inputs for t in outputs)
        if func._schema.is_mutable or not view:
            self.launches += 1
        return out


def count_launches(checkpoint: str) -> tuple[int, int, int, int]:
    """(per layer outside the two kernels, outside the layers, kernel calls per layer, the
    torch kernels' ops per layer) of one decode step's forward, in bfloat16 as on a GPU (each
    norm computes in float32: two casts that float32 would skip)."""
    engine = _engine(checkpoint, "bfloat16")
    executor = engine.executor
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i in range(4):
        engine.add(GenerateRequest(f"count-{i}", [5 + i] * 40, params))
    engine.step()
    chunks = engine.scheduler.schedule()
    batch = executor.build_batch(chunks)  # type: ignore[attr-defined]
    model = executor.model  # type: ignore[attr-defined]
    inside, calls = _Counter(), [0]
    kernels = model.kernels

    def counted(fn):
        def run(*args, **kwargs):
            calls[0] += 1
            with inside:
                return fn(*args, **kwargs)
        return run

    totals = []
    model.kernels = replace(kernels, paged_attention=counted(kernels.paged_attention),
                            kv_store=counted(kernels.kv_store))
    layers = model.layers
    for keep in (1, len(layers)):
        model.layers, inside.launches, calls[0] = layers[:keep], 0, 0
        with _Counter() as everything:
            model.forward(batch, executor.kv_pool)  # type: ignore[attr-defined]
        totals.append((everything.launches - inside.launches, inside.launches, calls[0]))
    model.layers, model.kernels = layers, kernels
    (one, one_in, one_calls), (many, many_in, many_calls) = totals
    per_layer = (many - one) // (len(layers) - 1)
    return (per_layer, one - per_layer, (many_calls - one_calls) // (len(layers) - 1),
            (many_in - one_in) // (len(layers) - 1))


def dispatch_seconds(repeats: int = 20000) -> float:
    x = torch.ones(4)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.add(x, x)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def host_costs(arch: str = "qwen2") -> HostCosts:
    from kvrt.runtime.model.tiny import init_tiny

    torch.set_num_threads(1)  # small tensors: threads only add contention with other work
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(init_tiny(folder, arch=arch))
        rows, seconds = measure_host(checkpoint)
        counts = count_launches(checkpoint)
    weight = 1.0 / seconds
    fixed, per_sequence, per_slot = nnls(rows * weight[:, None], seconds * weight)
    predicted = rows @ np.array([fixed, per_sequence, per_slot])
    errors = np.abs(predicted - seconds) / seconds
    return HostCosts(float(fixed), float(per_sequence), float(per_slot),
                     float(np.median(errors)), *counts, dispatch_seconds())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="qwen2", help="tiny checkpoint's family (qwen2: "
                        "q/k/v bias, as Qwen2.5)")
    costs = host_costs(parser.parse_args(argv).arch)
    print(f"host per step: {costs.fixed * 1e6:.0f} us + {costs.per_sequence * 1e6:.1f} us per "
          f"sequence + {costs.per_slot_token * 1e9:.2f} ns per slot-table token "
          f"(median error {costs.median_rel_error:.1%})")
    print(f"launches: {costs.launches_per_layer} per layer + {costs.kernel_calls_per_layer} "
          f"kernel calls ({costs.torch_kernel_ops_per_layer} ops on the torch path), "
          f"{costs.launches_outside_layers} outside the layers; eager dispatch "
          f"{costs.dispatch_seconds * 1e6:.1f} us per op here")


if __name__ == "__main__":
    main()
