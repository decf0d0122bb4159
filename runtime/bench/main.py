"""`kvrt bench WORKLOAD`: one workload, several policies side by side, one report.

Each policy gets a fresh engine (same model, same KV memory) and replays the same seeded
workload through the SDK over loopback; the report (results.json, results.md, summary.png,
kv_timeline.png) goes to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvrt.runtime.bench.metrics import ideal, summarize
from kvrt.runtime.bench.report import write_report
from kvrt.runtime.bench.runner import (
    EngineFactory,
    PolicyRun,
    parse_variant,
    real_engine,
    run_policy,
    with_policy,
)
from kvrt.runtime.bench.workloads import Workload, make_workload, workload_names
from kvrt.runtime.config import (
    ConfigError,
    EngineConfig,
    ServeConfig,
    ServerLimits,
    parse_key_value,
    parse_size,
)
from kvrt.runtime.policy import make_policy, options_for, policy_names, policy_option_names
from kvrt.sdk import KvrtError

# Which parameter scales a workload up, for the SLO sweep.
_SCALE = {"generative-agents": "agents", "map-reduce": "agents", "tool-agents": "runs",
          "langgraph": "threads", "workflows": "workflows", "dag-apps": "apps",
          "swe-agents": "agents"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--kv-cache-memory", type=size_argument, default="256MiB",
                   help="device KV pool per policy (default: %(default)s)")
    p.add_argument("--host-cache-memory", type=size_argument, default="1GiB",
                   help="host tier for policies that offload (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=32)


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """What `kvrt bench` and `kvrt sim` share: the workload, its scale, the policies, the report."""
    p.add_argument("workload", choices=workload_names(), metavar="WORKLOAD",
                   help=f"one of: {', '.join(workload_names())}")
    p.add_argument("--policies", default=",".join(policy_names()),
                   help="comma-separated policies to compare (default: %(default)s); "
                        "NAME:KEY=VALUE[:KEY=VALUE] is a variant of a policy with those "
                        "options (an ablation: tokencake:cross_run=false)")
    p.add_argument("--agents", type=int, help="agents (generative-agents, swe-agents) or mappers "
                   "(map-reduce)")
    p.add_argument("--rounds", type=int, help="rounds (generative-agents) or tool turns per "
                                              "worker (tool-agents)")
    p.add_argument("--runs", type=int, help="concurrent runs (tool-agents, map-reduce)")
    p.add_argument("--threads", type=int, help="concurrent threads of each app (langgraph)")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="the JSONL file the `trace` workload replays (format: README)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiplies every tool duration (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], type=param_argument,
                   metavar="KEY=VALUE", help="set any parameter of the workload (repeatable; "
                   "the names are in the report's params, e.g. tool_output_words=400)")
    p.add_argument("--policy-option", action="append", default=[], type=param_argument,
                   metavar="KEY=VALUE", help="set an option of every compared policy that has "
                   "it (repeatable; `kvrt serve --help` lists each policy's)")
    p.add_argument("--quick", action="store_true", help="a small run (a couple of minutes)")
    p.add_argument("--out", default=None, help="report folder (default: bench-out/WORKLOAD)")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="also sweep the scale for the most agents whose TTFT p99 meets this")


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def param_argument(text: str) -> tuple[str, str]:
    try:
        return parse_key_value(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def workload_from(args: argparse.Namespace) -> Workload:
    try:
        return make_workload(args.workload, quick=args.quick, settings=dict(args.param),
                             agents=args.agents, rounds=args.rounds, turns=args.rounds,
                             runs=args.runs, threads=args.threads, seed=args.seed, path=args.trace)
    except ValueError as exc:
        raise SystemExit(f"kvrt: --param: {exc}") from None


# A benchmark measures the policies, not the daemon's pushback: every call is queued however
# many wait (a workload of a thousand agents submits at once), none times out, and a run's
# events are not rate limited.
UNBOUNDED = ServerLimits(max_queued_requests=2**62, max_queued_tokens=2**62,
                         request_timeout_s=0, max_events_per_s=1e12)


def config_from(args: argparse.Namespace) -> ServeConfig:
    engine = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                          host_cache_memory=args.host_cache_memory,
                          max_num_seqs=args.max_num_seqs, seed=args.seed,
                          policy_options=dict(args.policy_option))
    return ServeConfig(served_model_name="bench", engine=engine, limits=UNBOUNDED)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"description": f"{cpu}, {os.cpu_count()} cores, {device}", "cpu": cpu,
            "cores": os.cpu_count(), "device": device, "torch": torch.__version__,
            "python": platform.python_version()}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    return await compare_policies(args, workload_from(args), config_from(args), machine())


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a report: its name, its config, and how its engine is built (a policy
    over one engine, or under `kvrt sim --replicas`, a router over the replicas)."""

    name: str
    config: ServeConfig
    make_engine: EngineFactory


def compared_policies(args: argparse.Namespace) -> list[str]:
    return [p.strip() for p in args.policies.split(",") if p.strip()]


async def compare_policies(args: argparse.Namespace, workload: Workload, config: ServeConfig,
                           machine: dict[str, Any], make_engine: EngineFactory = real_engine,
                           extra: dict[str, Any] | None = None,
                           annotate: Callable[[dict[str, Any]], None] | None = None,
                           columns: list[Column] | None = None, compared: str = "policy"
                           ) -> dict[str, Any]:
    """Runs the workload once per column (by default one per policy, each with
    `make_engine`), then the SLO sweep if asked; `annotate` may add to the results (kvrt sim's
    comparison) before the report is written. `compared` names what the columns are (the
    results' "compared": "policy", or "router"); the rows stay under "policies" either way."""
    from tqdm import tqdm  # the `bench` extra

    if columns is None:
        columns = [Column(p, with_policy(config, p), make_engine)
                   for p in compared_policies(args)]
    runs: dict[str, PolicyRun] = {}
    progress = tqdm(columns, desc=args.workload, unit=compared)
    for column in progress:
        progress.set_postfix_str(column.name)
        runs[column.name] = await run_policy(workload, column.config, args.time_scale,
                                             column.make_engine)
    results = {
        "workload": args.workload,
        "params": {**asdict(workload.params), "time_scale": args.time_scale},
        "machine": machine,
        "engine": {k: v for k, v in asdict(config.engine).items() if k != "policy"},
        "compared": compared,
        "ideal": _ideal(runs),
        "policies": {p: summarize(run) for p, run in runs.items()},
        **(extra or {}),
    }
    if args.slo_ttft_ms is not None:
        results["slo_ttft_ms"] = args.slo_ttft_ms
        for column in columns:
            results["policies"][column.name]["max_agents_within_slo"] = await _sweep(
                args, workload, column.config, column.make_engine)
    if annotate is not None:
        annotate(results)
    out = Path(args.out or f"bench-out/{args.workload}")
    write_report(out, results, {p: _timeline(run) for p, run in runs.items()})
    print((out / "results.md").read_text())
    print(f"report: {out}/results.json, results.md, summary.png, kv_timeline.png")
    return results


def _ideal(runs: dict[str, PolicyRun]) -> dict[str, float]:
    run = next(iter(runs.values()))  # every policy sends the same prompts (greedy, seeded)
    block_size = EngineConfig().block_size
    return ideal(run.tokens, run.block_bytes / block_size)


def _timeline(run: PolicyRun) -> list[tuple[float, float, float]]:
    if not run.samples:
        return []
    start, mib = run.samples[0].at, run.block_bytes / 2**20
    return [(s.at - start, s.in_use_blocks * mib, (s.in_use_blocks + s.cached_blocks) * mib)
            for s in run.samples]


async def _sweep(args: argparse.Namespace, workload: Workload, config: ServeConfig,
                 make_engine: EngineFactory) -> int | None:
    """The most concurrent agents whose TTFT p99 meets the SLO (a trace has no scale): the
    workload's scale doubled from 1 while it does (up to twice the given one), then bisected
    between the last that did and the first that did not, to a step of 1/16 of the scale (or
    1): so that two policies' figures compare to ~6%, not to a power of two."""
    key = _SCALE.get(args.workload)
    if key is None:
        return None

    async def agents_if_met(scale: int) -> int | None:
        candidate = make_workload(args.workload, **{**asdict(workload.params), key: scale})
        row = summarize(await run_policy(candidate, config, args.time_scale, make_engine))
        return candidate.params.concurrent_agents if row["ttft_p99_ms"] <= args.slo_ttft_ms \
            else None

    limit = 2 * getattr(workload.params, key)
    met, failed, best, scale = 0, None, None, 1
    while scale <= limit:
        agents = await agents_if_met(scale)
        if agents is None:
            failed = scale
            break
        met, best, scale = scale, agents, scale * 2
    if not met or failed is None:
        return best
    while failed - met > max(1, met // 16):
        middle = (met + failed) // 2
        agents = await agents_if_met(middle)
        if agents is None:
            failed = middle
        else:
            met, best = middle, agents
    return best


def check_arguments(args: argparse.Namespace, command: str) -> None:
    if (args.workload == "trace") != (args.trace is not None):
        raise SystemExit(f"{command}: --trace FILE goes with the `trace` workload, and only there")
    entries = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        variants = {entry: parse_variant(entry) for entry in entries}
    except ValueError as exc:
        raise SystemExit(f"{command}: {exc}") from None
    unknown = {name for name, _ in variants.values()} - set(policy_names())
    if unknown:
        raise SystemExit(f"{command}: unknown policies {sorted(unknown)}; "
                         f"available: {', '.join(policy_names())}")
    options = dict(args.policy_option)
    taken = {name for policy, _ in variants.values() for name in policy_option_names(policy)}
    if set(options) - taken:
        raise SystemExit(f"{command}: no compared policy takes --policy-option "
                         f"{', '.join(sorted(set(options) - taken))}")
    for entry, (policy, variant) in variants.items():  # a bad value fails here, before any run
        try:
            make_policy(policy, {**options_for(policy, options), **variant})
        except ConfigError as exc:
            raise SystemExit(f"{command}: {entry}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    check_arguments(args, "kvrt bench")
    with refused_calls_exit("kvrt bench"):
        asyncio.run(bench(args))
    return 0


@contextmanager
def refused_calls_exit(command: str) -> Iterator[None]:
    """A call the daemon refuses (a prompt larger than the KV pool, say) ends the run with the
    daemon's message, not a traceback."""
    try:
        yield
    except KvrtError as exc:
        raise SystemExit(f"{command}: the daemon refused a call of the workload: {exc}") from None

