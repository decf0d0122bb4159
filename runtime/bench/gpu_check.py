"""`make gpu-check`: what kvrt claims about CUDA, checked on one GPU by one command, into one
JSON report.

    python -m kvrt.runtime.bench.gpu_check [--out bench-out/gpu-check] [--skip STEP,...]
                                           [--device cuda] [--model PATH]

Each step is recorded with `ok`, its figures and its seconds; a failing step does not stop the
others, and the command exits 1 if any failed. The steps:

- `environment`: the GPU, torch, CUDA and Triton versions.
- `gpu_tests`: pytest over the kernel tests (each Triton kernel against its torch reference,
  compiled on the GPU), the host tier's mover (offload/upload bit-exact with pinned staging)
  and every test marked `gpu`.
- `engine_vs_transformers`: the default model on the GPU in float32 and bfloat16, with the
  Triton and the torch kernels, against transformers' greedy `generate` on the same GPU. In
  float32 the tokens must be identical; in bfloat16, where the two sum in different orders, the
  report gives how many tokens agree before the first difference.
- `host_round_trip`: the engine offloads a prompt's KV to the host tier, uploads it back, and
  must find it bit-identical and answer the same tokens.
- `engine_speed`: `make bench-engine` on the GPU, beside transformers.
- `bench_quick`: `kvrt bench tool-agents --quick`.

On a machine without a GPU, `--device cpu` runs the engine steps on the CPU (how CI checks this
module); the report says which device it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from itertools import takewhile
from pathlib import Path
from typing import Any

import torch

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.engine.protocol import Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.model.gguf_loader import cache_folder

STEPS = ("environment", "gpu_tests", "engine_vs_transformers", "host_round_trip",
         "engine_speed", "bench_quick")
PROMPTS = (
    "Write a haiku about a cache that never forgets.",
    "List three prime numbers and explain why each is prime.",
    "Summarise what a key-value cache does in a transformer, in two sentences.",
)
NEW_TOKENS = 32
REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/ lives beside runtime/
GPU_TESTS = ("tests/kernels", "tests/kv/test_mover.py")


class CheckFailed(Exception):
    """A step ran and found kvrt wrong (not a crash of the step itself)."""


def environment(device: str) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": device,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        figures.update(gpu=properties.name,
                       gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                       multiprocessors=properties.multi_processor_count,
                       capability=f"{properties.major}.{properties.minor}")
    try:
        import triton

        figures["triton"] = triton.__version__
    except ImportError:
        figures["triton"] = None
    return figures


def gpu_tests(out: Path) -> dict[str, Any]:
    """The kernel and mover tests, compiled on the GPU (never interpreted), and every test
    marked `gpu` wherever it lives."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONSAFEPATH"] = "1"
    runs = {"kernels_and_mover": [*GPU_TESTS, "-m", "not gpu"],
            "gpu_marked": ["tests", "-m", "gpu"]}
    figures: dict[str, Any] = {}
    for name, selection in runs.items():
        junit = out / f"{name}.xml"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection,
             f"--junitxml={junit}"], cwd=REPO, env=env, capture_output=True, text=True)
        figures[name] = {**_junit_counts(junit), "exit_code": done.returncode,
                         "tail": done.stdout[-2000:]}
    failed = [name for name, f in figures.items() if f["exit_code"] != 0]
    if failed:
        raise CheckFailed(f"tests failed: {', '.join(failed)}", figures)
    return figures


def _junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def engine_vs_transformers(model: str | None, device: str) -> dict[str, Any]:
    """Greedy tokens of kvrt (each dtype x kernel set) against transformers on `device`."""
    from transformers import AutoModelForCausalLM

    figures: dict[str, Any] = {}
    mismatched = []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        checkpoint = load_checkpoint(model, dtype)
        source = Path(checkpoint.source)
        hf_folder = cache_folder(source) if source.suffix == ".gguf" else source
        hf = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=dtype).to(device).eval()
        prompts = [checkpoint.tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in PROMPTS]
        reference = [_hf_greedy(hf, prompt) for prompt in prompts]
        del hf
        for kernels in _kernel_sets(device):
            engine = _engine(model, dtype_name, device, kernels)
            ours = _greedy(engine, prompts)
            agree = [_agreeing(a, b) for a, b in zip(ours, reference)]
            figures[f"{dtype_name}/{kernels}"] = {
                "tokens_agreeing": agree, "of": NEW_TOKENS,
                "identical": all(a == NEW_TOKENS for a in agree)}
            if dtype_name == "float32" and not all(a == NEW_TOKENS for a in agree):
                mismatched.append(f"{dtype_name}/{kernels}")
            engine.close()
    if mismatched:
        raise CheckFailed(f"float32 greedy tokens differ from transformers: {mismatched}",
                          figures)
    return figures


def host_round_trip(model: str | None, device: str) -> dict[str, Any]:
    """Offload a prompt's KV to the host, upload it back: the same bits, the same tokens."""
    figures: dict[str, Any] = {}
    for kernels in _kernel_sets(device):
        engine = _engine(model, "bfloat16" if device == "cuda" else "float32", device, kernels,
                         host_cache_memory=256 * 1024**2)
        owner = ("gpu-check", "agent")
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[2] * 8}])
        first = _greedy(engine, [prompt], owner)[0]
        blocks = engine.kv.match_prefix(prompt, b"").block_ids
        before = engine.executor.kv_pool[blocks].clone()
        offloaded = engine.kv.offload(owner)
        assert engine.kv.host is not None
        engine.kv.host.wait()  # the offload lands
        gone = len(engine.kv.match_prefix(prompt, b"").block_ids)
        second = _greedy(engine, [prompt], owner)[0]
        back = engine.kv.match_prefix(prompt, b"").block_ids[: len(blocks)]
        same_bits = bool(torch.equal(engine.executor.kv_pool[back].cpu(), before.cpu()))
        stats = engine.stats()
        figures[kernels] = {"blocks": len(blocks), "offloaded": offloaded,
                            "left_on_device": gone, "uploaded": stats.kv_blocks_uploaded,
                            "bit_identical": same_bits, "same_tokens": first == second,
                            "move_failures": dict(stats.kv_move_failures)}
        engine.check_integrity()
        engine.close()
        if not (offloaded and not gone and same_bits and first == second
                and stats.kv_blocks_uploaded >= len(blocks)):
            raise CheckFailed(f"host tier round trip failed with kernels {kernels}", figures)
    return figures


def engine_speed(model: str | None, device: str) -> dict[str, Any]:
    from kvrt.runtime.bench import engine_speed as bench

    results = {d: bench.run(d, model, repeats=3, device=device)
               for d in ("float32", "bfloat16")}
    return {"dtypes": results, "table": bench.report({"dtypes": results})}


def bench_quick(out: Path) -> dict[str, Any]:
    folder = out / "bench-quick"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    command = [sys.executable, "-m", "kvrt.runtime.cli", "bench", "tool-agents", "--quick",
               "--out", str(folder)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckFailed("kvrt bench --quick failed", {"tail": done.stderr[-2000:]})
    results = folder / "results.md"
    return {"report": results.read_text() if results.exists() else done.stdout[-4000:]}


# -- helpers ---------------------------------------------------------------------------------


def _kernel_sets(device: str) -> list[str]:
    """Both kernel sets on CUDA; on a CPU only torch's (Triton runs there only interpreted)."""
    return ["triton", "torch"] if device == "cuda" else ["torch"]


def _engine(model: str | None, dtype: str, device: str, kernels: str, **extra: Any) -> Engine:
    config = EngineConfig(model=model, dtype=dtype, device=device, kernels=kernels,
                          kv_cache_memory=256 * 1024**2, **extra)
    return build_engine(config)[0]


def _greedy(engine: Engine, prompts: list[list[int]],
            owner: tuple[str, str] | None = None) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    attribution = Attribution(*owner) if owner else Attribution()
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        request_id = f"check-{time.monotonic_ns()}-{i}"
        tokens[request_id] = []
        engine.add(GenerateRequest(request_id, prompt, params, attribution=attribution))
    while engine.has_work():
        for request_id, output in engine.step():
            tokens[request_id].extend(output.token_ids)
    return list(tokens.values())


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt], device=hf.device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _agreeing(ours: list[int], theirs: list[int]) -> int:
    """How many tokens agree before the first difference."""
    return sum(1 for _ in takewhile(lambda pair: pair[0] == pair[1], zip(ours, theirs)))


def run_steps(steps: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """Runs each step, recording ok, figures (or the failure) and seconds."""
    report: dict[str, Any] = {}
    for name, step in steps.items():
        started = time.perf_counter()
        entry: dict[str, Any]
        try:
            entry = {"ok": True, "figures": step()}
        except CheckFailed as failure:
            message, figures = failure.args
            entry = {"ok": False, "error": message, "figures": figures}
        except Exception as error:  # a step that crashed: the others still run
            entry = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report[name] = entry
        print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['seconds']} s)", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out/gpu-check", help="report folder")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps of {STEPS}")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"no CUDA device is visible to torch {torch.__version__} "
                     "(a CPU build?); `make gpu-check` installs the CUDA build")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every: dict[str, Callable[[], dict[str, Any]]] = {
        "environment": lambda: environment(args.device),
        "gpu_tests": lambda: gpu_tests(out.resolve()),
        "engine_vs_transformers": lambda: engine_vs_transformers(args.model, args.device),
        "host_round_trip": lambda: host_round_trip(args.model, args.device),
        "engine_speed": lambda: engine_speed(args.model, args.device),
        "bench_quick": lambda: bench_quick(out.resolve()),
    }
    report = run_steps({name: step for name, step in every.items() if name not in skip})
    path = out / "gpu-check.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"report: {path}")
    return 0 if all(entry["ok"] for entry in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
