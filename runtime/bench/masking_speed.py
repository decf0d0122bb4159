"""The cost of constrained decoding: decode steps of 16 constrained sequences beside 16 free ones.

    PYTHONSAFEPATH=1 python -m kvrt.runtime.bench.masking_speed [--repeats 5] [--tokens 64]
                                                 [--out-dir docs/benchmarks]

Each repeat runs, one after the other on the same engine (the default model), three batches of
16 requests: all free, all under a JSON schema's grammar, and half and half. A step counts when
all 16 sequences decode in it (no prefill, none finished). The figures are the medians over the
repeats of each batch's median step time, the slowdown of the constrained batches against the
free one, and the time the masking itself took per step (runtime/engine/constraints.py: filling
the matchers' bitmasks and applying them), also as a share of the free step: on a loaded
machine the step times swing by seconds and the share is the steadier figure. Writes
masking_speed.json and masking_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.server.grammars import Grammars

BATCH = 16
# A schema that keeps a model writing for well over 64 tokens: strings, enums, numbers, nesting.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["food", "travel", "work", "home"]}},
        "notes": {"type": "array", "minItems": 24,
                  "items": {"type": "object",
                            "properties": {"day": {"type": "integer"},
                                           "text": {"type": "string", "maxLength": 80}},
                            "required": ["day", "text"]}},
    },
    "required": ["title", "rating", "tags", "notes"],
}
KINDS = ("free", "constrained", "mixed")


class MaskTimer:
    """Wraps the engine's Constraints.mask, adding up the seconds it takes."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = 0.0
        self._mask = engine.constraints.mask
        engine.constraints.mask = self._timed  # type: ignore[method-assign]

    def _timed(self, logits, matchers) -> None:
        start = time.perf_counter()
        self._mask(logits, matchers)
        self.seconds += time.perf_counter() - start


def _batch(engine: Engine, prompts: list[list[int]], grammars: list[Any], tokens: int,
           timer: MaskTimer) -> tuple[float, float]:
    """Runs one batch; returns (median full-batch decode step s, mean mask s per such step)."""
    for i, (prompt, grammar) in enumerate(zip(prompts, grammars)):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                grammar=grammar)
        engine.add(GenerateRequest(f"m-{time.monotonic_ns()}-{i}", prompt, params))
    steps, masked = [], 0.0
    while engine.has_work():
        timer.seconds = 0.0
        start = time.perf_counter()
        emitted = engine.step()
        took = time.perf_counter() - start
        if len(emitted) == BATCH and all(out.completion_tokens > 1 for _, out in emitted) \
                and all(out.finish_reason is None for _, out in emitted):
            steps.append(took)
            masked += timer.seconds
    if not steps:
        raise RuntimeError("no step decoded the whole batch; raise --tokens")
    return statistics.median(steps), masked / len(steps)


def measure(repeats: int, tokens: int) -> dict[str, Any]:
    engine, _ = build_engine(EngineConfig(model=None, kv_cache_memory=256 * 1024**2,
                                          max_model_len=1024, max_num_seqs=BATCH))
    grammar = Grammars(engine).json_schema(SCHEMA, "schema")
    tok = engine.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": f"Write diary notes, as JSON, "
                                 f"about week {i}."}]) for i in range(BATCH)]
    grammars = {"free": [None] * BATCH, "constrained": [grammar] * BATCH,
                "mixed": [grammar, None] * (BATCH // 2)}
    timer = MaskTimer(engine)
    _batch(engine, prompts, grammars["constrained"], 8, timer)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    for _ in range(repeats):
        for kind in KINDS:
            runs[kind].append(_batch(engine, prompts, grammars[kind], tokens, timer))
    step = {kind: statistics.median(s for s, _ in runs[kind]) for kind in KINDS}
    mask = {kind: statistics.median(m for _, m in runs[kind]) for kind in KINDS}
    return {
        "batch": BATCH, "tokens": tokens, "repeats": repeats,
        "step_ms": {k: 1e3 * v for k, v in step.items()},
        "mask_ms_per_step": {k: 1e3 * v for k, v in mask.items()},
        "slowdown": {k: step[k] / step["free"] - 1 for k in ("constrained", "mixed")},
        "runs_step_ms": {k: [round(1e3 * s, 3) for s, _ in v] for k, v in runs.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},
    }


def markdown(result: dict[str, Any]) -> str:
    def versus(kind: str) -> str:
        return "" if kind == "free" else f"{100 * result['slowdown'][kind]:+.1f}%"

    def share(kind: str) -> str:
        return f"{100 * result['mask_ms_per_step'][kind] / result['step_ms']['free']:.1f}%"

    rows = [f"| {kind} | {result['step_ms'][kind]:.2f} | {result['mask_ms_per_step'][kind]:.2f} "
            f"| {share(kind)} | {versus(kind)} |" for kind in KINDS]
    return "\n".join([
        f"Decode steps of {result['batch']} sequences (default model, greedy, "
        f"{result['tokens']} tokens each; medians of {result['repeats']} side-by-side "
        f"repeats; load average {result['machine']['load_avg_1m']:.1f} on "
        f"{result['machine']['cpus']} CPUs).",
        "",
        "| batch | step (ms) | masking (ms/step) | masking / free step | step vs free |",
        "|---|---|---|---|---|",
        *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    result = measure(args.repeats, args.tokens)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "masking_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "masking_speed.md").write_text(markdown(result))
    print(markdown(result))


def rewrite_markdown(folder: Path) -> None:
    """masking_speed.md again from the folder's masking_speed.json."""
    result = json.loads((folder / "masking_speed.json").read_text())
    (folder / "masking_speed.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
