"""Aggregate calls/s of two engine replicas on Ray against one, under the same client load.

    PYTHONSAFEPATH=1 python -m kvrt.runtime.bench.replica_speed [--repeats 3] [--calls 16]
        [--concurrency 8] [--prompt-tokens 300] [--max-tokens 8] [--model PATH]
        [--out-dir docs/benchmarks]

Three daemons in this process, each the real app on loopback (create_app + start_site), serve
in turn the same load: `--calls` chat calls without a run, `--concurrency` at a time, each a
prompt of its own (no prefix-cache hit anywhere) of about `--prompt-tokens` tokens:

    in-process   today's `kvrt serve`: the engine thread in the daemon's process
    ray x1       `kvrt serve --replicas 1 --ray-address ...`: one replica in a Ray actor
    ray x2       `kvrt serve --replicas 2`: two replicas, the affinity router

Every engine runs torch on one thread (the actors' `threads`, the daemon's
torch.set_num_threads(1)), so the configurations differ only in how many engines there are and
where. The calls are prefill-heavy on purpose: on a CPU a decode step is bound by memory
bandwidth, which two replicas share, while a prefill is bound by compute, which they do not;
the default model (135M) makes a call's compute dwarf Ray's per-call cost (~1 ms). The repeats
run the three side by side (in turn), all replicas loaded from the start; the figures are
medians over the repeats. `ray x1 / in-process` is what the front daemon and Ray cost a call.
Writes replica_speed.json and replica_speed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from kvrt.runtime.config import EngineConfig, ServeConfig, ServerLimits
from kvrt.runtime.server.app import create_app
from kvrt.runtime.server.serve import start_site

CONFIGS = ("in-process", "ray x1", "ray x2")
_READY_TIMEOUT_S = 300.0


def _engine_config(model: str | None, prompt_tokens: int, max_tokens: int,
                   concurrency: int) -> EngineConfig:
    return EngineConfig(model=model, kv_cache_memory=256 * 1024**2,
                        max_model_len=max(1024, 2 * (prompt_tokens + max_tokens)),
                        max_num_seqs=concurrency)


def _engines(engine: EngineConfig) -> dict[str, Any]:
    import torch

    from kvrt.runtime.engine.assembly import context_length
    from kvrt.runtime.engine.async_engine import AsyncEngine
    from kvrt.runtime.model.facts import read_model_facts
    from kvrt.runtime.replicas.ray_replica import RayReplica
    from kvrt.runtime.replicas.replica_set import ReplicaSet
    from kvrt.runtime.replicas.router import make_router

    torch.set_num_threads(1)
    local = AsyncEngine.create(engine)
    facts = read_model_facts(engine.model)
    model = dict(model_name=local.model_name, max_model_len=context_length(
        engine, facts.config.max_position), tokenizer=facts.tokenizer,
        vocab_size=facts.config.vocab_size)

    def replica_set(count: int, first: int) -> ReplicaSet:
        replicas = [RayReplica(str(first + i), engine, resources={"num_cpus": 1}, threads=1,
                               **model) for i in range(count)]  # type: ignore[arg-type]
        router = make_router("affinity", count, step_tokens=engine.max_num_batched_tokens)
        return ReplicaSet(replicas, router, **model)  # type: ignore[arg-type]

    return {"in-process": local, "ray x1": replica_set(1, 0), "ray x2": replica_set(2, 1)}


def _prompts(tokenizer: Any, count: int, tokens: int, seed: int) -> list[str]:
    """`count` texts of about `tokens` tokens each, none sharing a block with another."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [f"{rng.randrange(10**6)}" for _ in range(tokens)]
        while len(tokenizer.encode(" ".join(words))) > tokens:
            words = words[:-max(1, len(words) // 20)]
        texts.append(" ".join(words))
    return texts


async def _load(url: str, texts: list[str], concurrency: int, max_tokens: int) -> float:
    """Sends every text as one chat call, `concurrency` at a time; returns the seconds taken."""
    gate = asyncio.Semaphore(concurrency)

    async def call(session: aiohttp.ClientSession, text: str) -> None:
        async with gate, session.post(url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"a call failed: {resp.status} {body}")

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.gather(*(call(session, text) for text in texts))
    return time.perf_counter() - started


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    engine = _engine_config(args.model, args.prompt_tokens, args.max_tokens, args.concurrency)
    config = ServeConfig(port=0, engine=engine, limits=ServerLimits(request_timeout_s=0))
    engines = await asyncio.get_running_loop().run_in_executor(None, _engines, engine)
    sites = {}
    for name in CONFIGS:
        sites[name] = await start_site(create_app(config, engines[name]), "127.0.0.1", 0)
    try:
        await _wait_ready(engines)
        tokenizer = engines["in-process"].tokenizer
        seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
        warm = _prompts(tokenizer, 2, args.prompt_tokens, seed=-1)
        for name in CONFIGS:  # each engine's first forward pays for its warm-up
            await _load(sites[name][1], warm, 2, args.max_tokens)
        for repeat in range(args.repeats):
            for index, name in enumerate(CONFIGS):
                texts = _prompts(tokenizer, args.calls, args.prompt_tokens,
                                 seed=repeat * len(CONFIGS) + index)
                seconds[name].append(await _load(sites[name][1], texts, args.concurrency,
                                                 args.max_tokens))
                print(f"repeat {repeat + 1} {name}: {args.calls / seconds[name][-1]:.2f} "
                      "calls/s", flush=True)
    finally:
        for runner, _ in sites.values():
            await runner.cleanup()  # stops each engine (the app's cleanup_ctx)
    rate = {name: statistics.median(args.calls / s for s in seconds[name]) for name in CONFIGS}
    return {
        "model": args.model or "SmolLM2-135M-Instruct", "calls": args.calls,
        "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "repeats": args.repeats, "torch_threads_per_engine": 1,
        "calls_per_s": rate,
        "speedup_x2_over_x1": rate["ray x2"] / rate["ray x1"],
        "speedup_x2_over_in_process": rate["ray x2"] / rate["in-process"],
        "ray_x1_over_in_process": rate["ray x1"] / rate["in-process"],
        "runs_calls_per_s": {n: [round(args.calls / s, 3) for s in v] for n, v in seconds.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},
    }


async def _wait_ready(engines: dict[str, Any]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    replicas = [r for name in CONFIGS[1:] for r in engines[name].members]
    while not all(r.state() == "ready" for r in replicas):
        if time.monotonic() > deadline:
            raise RuntimeError("the replicas did not become ready")
        await asyncio.sleep(0.2)


def markdown(result: dict[str, Any]) -> str:
    rate = result["calls_per_s"]
    rows = [f"| {name} | {rate[name]:.2f} | {rate[name] / rate['in-process']:.2f}x | "
            f"{', '.join(f'{r:.2f}' for r in result['runs_calls_per_s'][name])} |"
            for name in CONFIGS]
    return "\n".join([
        f"{result['calls']} chat calls per repeat, {result['concurrency']} at a time, each a "
        f"prompt of its own of ~{result['prompt_tokens']} tokens and {result['max_tokens']} "
        f"output tokens ({result['model']}, one torch thread per engine; medians of "
        f"{result['repeats']} side-by-side repeats; load average "
        f"{result['machine']['load_avg_1m']:.1f} on {result['machine']['cpus']} CPUs).",
        "",
        "| daemon | calls/s | vs in-process | each repeat |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Two replicas over one: {result['speedup_x2_over_x1']:.2f}x. One Ray replica over the "
        f"in-process engine: {result['ray_x1_over_in_process']:.2f}x.", ""])


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    # Room for the three actors (one CPU each, by Ray's count) whatever this machine has.
    ray.init(num_cpus=max(3, os.cpu_count() or 1), include_dashboard=False,
             logging_level="WARNING")
    try:
        result = asyncio.run(_measure(args))
    finally:
        ray.shutdown()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "replica_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "replica_speed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
