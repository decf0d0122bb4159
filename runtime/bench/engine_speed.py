"""Engine speed beside transformers' `generate` on the same weights, in one run.

    python -m kvrt.runtime.bench.engine_speed [--dtypes float32,bfloat16] [--repeats 3]
                                              [--device auto] [--out bench-out/engine_speed.json]

Four figures per dtype, each the median of `--repeats` runs, each beside its transformers twin:
- single-stream decode tokens/s (one request, time after its first token);
- aggregate tokens/s of 16 concurrent streams (clients) with prompts of 16-196 tokens and outputs
  of 32-128 tokens, each client sending 2 requests back to back (transformers: the clients'
  r-th requests as one left-padded batched `generate`, which runs until its longest member is
  done); and of one batch of the same 16 prompts with every output 64 tokens long;
- prefill tokens/s of a 1,000-token prompt (cache off);
- TTFT of a repeated 1,000-token prompt with the prefix cache on versus off.
Both run on the same device (`--device`: auto is CUDA where there is one). A benchmark, not a
test: the machine is shared and noisy, so read the ratios, measured side by side, more than the
absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.model.gguf_loader import cache_folder

DECODE_TOKENS = 64
BATCH = 16
BATCH_TOKENS = 64
# Streams of different lengths: prompts of 16..196 tokens (below) and outputs of 32..128 tokens.
OUTPUT_LENGTHS = [32 + (37 * i) % 97 for i in range(BATCH)]
ROUNDS = 2  # each stream sends this many requests, one after the other
LONG_PROMPT = 1000


def _prompt(tokenizer, words: int, salt: str) -> list[int]:
    text = " ".join(f"{salt}{i % 97}" for i in range(words))
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def _long_prompt(tokenizer, length: int, salt: str) -> list[int]:
    return _prompt(tokenizer, length, salt)[:length]


def _batch_prompts(tokenizer, round_: int = 0) -> list[list[int]]:
    """16 prompts of 16 to 196 tokens: streams of different lengths."""
    return [_long_prompt(tokenizer, 16 + 12 * i, f"b{round_}x{i}") for i in range(BATCH)]


def _round_lengths(round_: int) -> list[int]:
    return OUTPUT_LENGTHS[round_ * 5 :] + OUTPUT_LENGTHS[: round_ * 5]


def _median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


# -- kvrt ------------------------------------------------------------------------------------


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _drive(
    engine: Engine, prompts: list[list[int]], max_tokens: int | list[int]
) -> tuple[float, float]:
    """Runs the prompts to completion; returns (seconds to the first token, total seconds)."""
    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for i, (prompt, count) in enumerate(zip(prompts, counts)):
        request_id = f"bench-{time.monotonic_ns()}-{i}"
        engine.add(GenerateRequest(request_id, prompt, _params(count)))
    start = time.perf_counter()
    first = None
    while engine.has_work():
        if engine.step() and first is None:
            first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


def _streams(engine: Engine, rounds: list[list[list[int]]]) -> float:
    """16 clients, each sending its next request as soon as its previous one is done (request r
    of client i: prompt rounds[r][i], _round_lengths(r)[i] tokens). Returns tokens/s."""
    owner: dict[str, int] = {}
    sent = [0] * BATCH

    def send(client: int) -> None:
        r = sent[client]
        request_id = f"stream-{time.monotonic_ns()}-{client}-{r}"
        params = _params(_round_lengths(r)[client])
        engine.add(GenerateRequest(request_id, rounds[r][client], params))
        owner[request_id], sent[client] = client, r + 1

    start = time.perf_counter()
    for client in range(BATCH):
        send(client)
    while engine.has_work():
        for request_id, output in engine.step():
            client = owner[request_id]
            if output.finish_reason is not None and sent[client] < len(rounds):
                send(client)
    elapsed = time.perf_counter() - start
    return sum(sum(_round_lengths(r)) for r in range(len(rounds))) / elapsed


def _kvrt_figures(engine: Engine, cold: Engine, tok, repeats: int) -> dict[str, float]:
    short = _prompt(tok, 20, "s")
    batch = _batch_prompts(tok)

    def decode() -> float:
        first, total = _drive(engine, [short], DECODE_TOKENS)
        return (DECODE_TOKENS - 1) / (total - first)

    def aggregate(lengths: list[int]) -> Callable[[], float]:
        return lambda: sum(lengths) / _drive(engine, batch, lengths)[1]

    def streams() -> float:
        return _streams(engine, [_batch_prompts(tok, r) for r in range(ROUNDS)])

    long = _long_prompt(tok, LONG_PROMPT, "p")
    _drive(cold, [long], 1)  # warm-up

    def prefill() -> float:
        return LONG_PROMPT / _drive(cold, [long], 1)[0]

    repeated = _long_prompt(tok, LONG_PROMPT, "r")
    _drive(engine, [repeated], 1)  # computes and caches it once
    return {
        "decode_tok_s": _median(decode, repeats),
        "aggregate_16_tok_s": _median(streams, repeats),
        "aggregate_16_same_len_tok_s": _median(aggregate([BATCH_TOKENS] * BATCH), repeats),
        "prefill_tok_s": _median(prefill, repeats),
        "ttft_repeated_cache_on_ms": 1000
        * _median(lambda: _drive(engine, [repeated], 1)[0], repeats),
        "ttft_repeated_cache_off_ms": 1000
        * _median(lambda: _drive(cold, [repeated], 1)[0], repeats),
    }


# -- transformers ----------------------------------------------------------------------------


def _hf_figures(model, tok, repeats: int) -> dict[str, float]:
    device = model.device
    short = _prompt(tok, 20, "s")
    pad = tok.hf.pad_token_id if tok.hf.pad_token_id is not None else 0
    batch = _batch_prompts(tok)

    def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return ids, torch.tensor(mask, device=device)

    def aggregate(lengths: list[int]) -> Callable[[], float]:
        # A static batch runs until its longest member is done; only requested tokens count.
        return lambda: sum(lengths) / generate(*padded(batch), max(lengths))

    def streams() -> float:
        # The 16 clients' r-th requests as one static batch, round after round.
        seconds = sum(
            generate(*padded(_batch_prompts(tok, r)), max(_round_lengths(r))) for r in range(ROUNDS)
        )
        return sum(sum(_round_lengths(r)) for r in range(ROUNDS)) / seconds

    def generate(input_ids, attention_mask, tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=pad,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    one = torch.tensor([short], device=device)
    ones = torch.ones_like(one)

    def decode() -> float:
        return (DECODE_TOKENS - 1) / (generate(one, ones, DECODE_TOKENS) - generate(one, ones, 1))

    long = torch.tensor([_long_prompt(tok, LONG_PROMPT, "p")], device=device)

    def prefill() -> float:
        return LONG_PROMPT / generate(long, torch.ones_like(long), 1)

    return {
        "decode_tok_s": _median(decode, repeats),
        "aggregate_16_tok_s": _median(streams, repeats),
        "aggregate_16_same_len_tok_s": _median(aggregate([BATCH_TOKENS] * BATCH), repeats),
        "prefill_tok_s": _median(prefill, repeats),
    }


def run(dtype_name: str, model_path: str | None, repeats: int,
        device: str = "auto") -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    checkpoint = load_checkpoint(model_path, dtype)
    hf_source = Path(checkpoint.source)
    if hf_source.suffix == ".gguf":
        # The dequantized Hugging Face copy kvrt made of the GGUF: the same weights, loaded the
        # ordinary way (transformers' own GGUF path keeps weights packed and computes in fp32).
        hf_source = cache_folder(hf_source)
    settings = dict(model=model_path, dtype=dtype_name, kv_cache_memory=1024**3, max_model_len=4096,
                    device=device)
    engine, _ = build_engine(EngineConfig(**settings), checkpoint=checkpoint)
    cold, _ = build_engine(EngineConfig(**settings, prefix_caching=False))
    hf = AutoModelForCausalLM.from_pretrained(hf_source, dtype=dtype).to(engine.executor.device)
    tok = engine.tokenizer
    return {
        "kvrt": _kvrt_figures(engine, cold, tok, repeats),
        "transformers": _hf_figures(hf.eval(), tok, repeats),
    }


def report(results: dict) -> str:
    lines = ["| dtype | figure | kvrt | transformers | ratio |", "|---|---|---:|---:|---:|"]
    for dtype, sides in results["dtypes"].items():
        ours, theirs = sides["kvrt"], sides["transformers"]
        for name in (
            "decode_tok_s",
            "aggregate_16_tok_s",
            "aggregate_16_same_len_tok_s",
            "prefill_tok_s",
        ):
            ratio = ours[name] / theirs[name]
            lines.append(
                f"| {dtype} | {name} | {ours[name]:.1f} | {theirs[name]:.1f} | {ratio:.2f}x |"
            )
        on, off = ours["ttft_repeated_cache_on_ms"], ours["ttft_repeated_cache_off_ms"]
        lines.append(
            f"| {dtype} | ttft_repeated_1000 on / off (ms) | {on:.1f} | {off:.1f} (off) "
            f"| {off / on:.1f}x |"
        )
        lines.append(
            f"| {dtype} | aggregate_16 / own single stream | | | "
            f"{ours['aggregate_16_tok_s'] / ours['decode_tok_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M GGUF)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CUDA if any), cpu, cuda")
    parser.add_argument("--out", default="bench-out/engine_speed.json")
    args = parser.parse_args(argv)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "repeats": args.repeats,
        "dtypes": {d: run(d, args.model, args.repeats, args.device)
                   for d in args.dtypes.split(",")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(report(results))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
