"""`kvrt sim WORKLOAD`: `kvrt bench` on a simulated GPU, at a scale this machine cannot serve.

Everything but the model is real: the daemon, the SDK over loopback, the control plane, the
scheduler, the KV manager and the policies. The executor is SimExecutor (a step's time from the
roofline cost model of `--device` and `--model-shape`), and the event loop runs on simulated
time (virtual_loop.py), so a run of hundreds of agents and minutes of tool calls takes seconds.
Text is tokenized with the default model's tokenizer (`--tokenizer`), whatever the shape.

`--engine-profile` says whose engine the GPU's step times describe (engine_profiles.py):
`vllm-class` (the default) or `kvrt`; the report names it. `cpu-calibrated` is kvrt's engine,
measured on this machine, and takes no profile. Its first run measures it (calibrate.py, plan
`--calibration`) before the simulation's loop starts: the measuring serves real workloads on
loops of its own.

`--compare RESULTS` replays the workload, parameters and engine settings of a `kvrt bench`
report and adds, per policy, how far the simulated figures are from the measured ones: the
completion times (the cost model) and the reuse figures, prefill tokens and the shared KV per
agent (the engine's reuse as simulated: masters, readers' diffs). With `--device
cpu-calibrated` that is the check of the simulation against this machine.

`--replicas N` serves the workload from N simulated engines behind one daemon and compares the
routers (`--router`) side by side instead of the policies (replicas.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvrt.runtime.bench.main import (
    UNBOUNDED,
    add_workload_arguments,
    check_arguments,
    compare_policies,
    machine,
    refused_calls_exit,
    size_argument,
    workload_from,
)
from kvrt.runtime.bench.runner import EngineFactory
from kvrt.runtime.bench.workloads import Workload, make_workload
from kvrt.runtime.config import ConfigError, EngineConfig, ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.policy import policy_names
from kvrt.runtime.sim.calibrate import DEFAULT_PLAN, PLANS, CalibrationError, cpu_calibrated
from kvrt.runtime.sim.driver import SimDriver
from kvrt.runtime.sim.engine import build_sim_engine, kv_cache_bytes, sim_block_bytes
from kvrt.runtime.sim.engine_profiles import DEFAULT_PROFILE, get_profile, profile_names
from kvrt.runtime.sim.hardware import CPU_CALIBRATED, Device, device_names, get_device
from kvrt.runtime.sim.model_shapes import get_shape, shape_names
from kvrt.runtime.sim.replicas import (
    add_replica_arguments,
    check_replica_arguments,
    replicas_summary,
    router_columns,
)
from kvrt.runtime.sim.virtual_loop import VirtualTimeLoop

GPU_SHAPE, CPU_SHAPE = "qwen2.5-7b", "smollm2-135m"  # the default shapes (the CPU's: measured)
# The engine settings of a vLLM-class server on one GPU: 256 sequences, 8k-token steps.
GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS = 256, 8192
GPU_HOST_GIB = 128  # pinned host memory per GPU: a 8-GPU server's 1-2 TB of DRAM, shared
# What --compare checks: completion times, and the reuse figures (the shared KV only where the
# workload marks segments).
COMPARED = ("jct_mean_s", "jct_p95_s", "prefill_tokens", "shared_kv_bytes_per_agent")
TOLERANCE = 0.15  # the bar for cpu-calibrated against the CPU benchmark


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload_arguments(p)
    p.add_argument("--device", default="h100", choices=device_names(),
                   help="simulated accelerator (default: %(default)s); cpu-calibrated: this "
                        "machine, fitted to the real engine (measured once, ~2 min, then cached)")
    p.add_argument("--calibration", default=DEFAULT_PLAN, choices=sorted(PLANS),
                   help="how cpu-calibrated measures this machine when no calibration is "
                        "cached (default: %(default)s, ~2 min; quick: seconds, a rough fit "
                        "cached apart)")
    p.add_argument("--engine-profile", default=None, choices=profile_names(),
                   help=f"whose engine the GPU's step times describe (default: "
                        f"{DEFAULT_PROFILE}): vllm-class (CUDA graphs, host work overlapped) or "
                        "kvrt (its own per-step, per-sequence and launch costs); not with "
                        "cpu-calibrated, which measures kvrt's engine on this machine")
    p.add_argument("--model-shape", default=None, choices=shape_names(),
                   help=f"simulated model (default: {GPU_SHAPE}; {CPU_SHAPE} on cpu-calibrated)")
    p.add_argument("--kv-cache-memory", type=size_argument, default=None,
                   help="KV pool (default: 90%% of the device's memory less the weights)")
    p.add_argument("--host-cache-memory", type=size_argument, default=None,
                   help=f"host tier for offloaded KV (default: {GPU_HOST_GIB} GiB on a GPU; "
                        "the bench's under --compare, 1 GiB on cpu-calibrated)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"running batch (default: {GPU_MAX_NUM_SEQS}; "
                        "the CPU engine's on cpu-calibrated)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens per step (default: {GPU_MAX_NUM_BATCHED_TOKENS}; "
                        "the CPU engine's on cpu-calibrated)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="checkpoint whose tokenizer reads the text (default: SmolLM2)")
    p.add_argument("--compare", default=None, metavar="RESULTS",
                   help="a `kvrt bench` results.json: replay its workload and engine settings "
                        "and report how close the simulated completion times, prefill tokens "
                        "and shared KV per agent come")
    add_replica_arguments(p)
    # The policies' default depends on --replicas (check_replica_arguments).
    p.set_defaults(policies=None)


def engine_config(args: argparse.Namespace, bench: dict[str, Any] | None) -> EngineConfig:
    """The bench report's engine settings under --compare (flags given still win); else the
    GPU serving defaults, or the CPU engine's own on cpu-calibrated."""
    settings: dict[str, Any] = {}
    if bench is not None:
        settings = {k: v for k, v in bench["engine"].items()
                    if k in ("kv_cache_memory", "host_cache_memory", "block_size", "max_num_seqs",
                             "max_num_batched_tokens", "prefix_caching", "seed")}
    elif args.device != CPU_CALIBRATED:
        settings = {"max_num_seqs": GPU_MAX_NUM_SEQS,
                    "max_num_batched_tokens": GPU_MAX_NUM_BATCHED_TOKENS,
                    "host_cache_memory": GPU_HOST_GIB * 2**30}
    else:
        settings = {"host_cache_memory": 2**30}
    for flag in ("kv_cache_memory", "host_cache_memory", "max_num_seqs",
                 "max_num_batched_tokens"):
        if getattr(args, flag) is not None:
            settings[flag] = getattr(args, flag)
    settings.setdefault("seed", args.seed)
    return EngineConfig(**settings, policy_options=dict(args.policy_option))


def sim_engine_factory(shape: ModelConfig, device: Device, tokenizer: Tokenizer,
                       loop: VirtualTimeLoop) -> EngineFactory:
    def make(config: EngineConfig) -> tuple[AsyncEngine, int]:
        engine, executor, link = build_sim_engine(shape, device, config, tokenizer, loop.clock,
                                                  advance_clock=False)
        return (AsyncEngine(engine, "bench", SimDriver(executor, link)),
                sim_block_bytes(shape, device, config))

    return make


def simulated_machine(device: Device, profile: str, shape_name: str,
                      replicas: int = 1) -> dict[str, Any]:
    host = machine()
    devices = device.name if replicas == 1 else f"{replicas} x {device.name}"
    return {"description": f"simulated {devices} ({profile} engine), {shape_name} "
                           f"(on {host['cpu']})",
            "simulated": True, "device": device.name, "engine_profile": profile,
            "model_shape": shape_name, "host": host}


def engine_profile(args: argparse.Namespace, device: Device) -> tuple[Device, dict[str, Any]]:
    """The device with the chosen engine's host costs, and the profile as the report names it:
    on cpu-calibrated, the calibration's (kvrt's engine, fitted on this machine)."""
    if args.device == CPU_CALIBRATED:
        return device, {"name": "kvrt-calibrated",
                        "summary": "kvrt's engine, its host costs fitted on this machine"}
    profile = get_profile(args.engine_profile or DEFAULT_PROFILE)
    return profile.on(device), asdict(profile)


def comparison(bench: dict[str, Any], sim: dict[str, Any], source: str) -> dict[str, Any]:
    """Per policy run in both, each compared metric both report (a figure that is 0 in the
    bench, e.g. prefill served wholly from cache, has no relative error and is left out):
    measured, simulated, relative error."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for policy, simulated in sim["policies"].items():
        measured = bench["policies"].get(policy)
        if measured is None:
            continue
        rows[policy] = {key: {"bench": measured[key], "sim": simulated[key],
                              "error": simulated[key] / measured[key] - 1}
                        for key in COMPARED
                        if measured.get(key) and simulated.get(key) is not None}
    errors = [abs(m["error"]) for row in rows.values() for m in row.values()]
    return {"against": source, "bench_machine": bench["machine"]["description"],
            "policies": rows, "max_abs_error": max(errors, default=float("nan")),
            "tolerance": TOLERANCE,
            "within_tolerance": bool(errors) and max(errors) <= TOLERANCE}


def simulated_device(args: argparse.Namespace) -> Device:
    """`--device`; cpu-calibrated's calibration is loaded, or measured when none is cached
    (on event loops of its own: call this before the simulation's loop starts)."""
    if args.device == CPU_CALIBRATED:
        return cpu_calibrated(plan=args.calibration)
    return get_device(args.device)


async def simulate(args: argparse.Namespace, bench: dict[str, Any] | None,
                   device: Device) -> dict[str, Any]:
    from kvrt.runtime.model.checkpoint import load_checkpoint

    device, profile = engine_profile(args, device)
    shape_name = args.model_shape or (CPU_SHAPE if args.device == CPU_CALIBRATED else GPU_SHAPE)
    shape = get_shape(shape_name)
    tokenizer = load_checkpoint(args.tokenizer).tokenizer
    workload: Workload
    if bench is not None:
        params = {k: v for k, v in bench["params"].items() if k != "time_scale"}
        workload = make_workload(bench["workload"], **params)
    else:
        workload = workload_from(args)
    config = ServeConfig(served_model_name="bench", engine=engine_config(args, bench),
                         limits=UNBOUNDED)
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    make_engine = sim_engine_factory(shape, device, tokenizer, loop)
    pool = kv_cache_bytes(shape, device, config.engine)
    extra: dict[str, Any] = {"sim": {"device": device.name, "engine_profile": profile,
                                     "model_shape": shape_name,
                                     "kv_cache_bytes": pool * args.replicas,
                                     "kv_cache_bytes_per_replica": pool,
                                     "device_spec": asdict(device)}}
    machine = simulated_machine(device, profile["name"], shape_name, args.replicas)
    if args.replicas > 1:
        extra["replicas"] = replicas_summary(args)
        return await compare_policies(args, workload, config, machine, extra=extra,
                                      columns=router_columns(args, config, make_engine),
                                      compared="router")

    def compare(results: dict[str, Any]) -> None:
        assert bench is not None
        results["comparison"] = comparison(bench, results, args.compare)

    return await compare_policies(args, workload, config, machine, make_engine, extra,
                                  compare if bench is not None else None)


def run(args: argparse.Namespace) -> int:
    bench = None
    if args.compare is not None:
        try:
            bench = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"kvrt sim: cannot read --compare {args.compare}: {exc}") from None
        if bench.get("workload") != args.workload:
            raise SystemExit(f"kvrt sim: {args.compare} is a `{bench.get('workload')}` report, "
                             f"not `{args.workload}`")
        if bench.get("machine", {}).get("simulated"):
            raise SystemExit(f"kvrt sim: {args.compare} is a simulation; compare against a "
                             "`kvrt bench` report")
        args.time_scale = bench["params"].get("time_scale", args.time_scale)
    check_replica_arguments(args, "kvrt sim")
    if args.policies is None:
        args.policies = ",".join(policy_names())
    check_arguments(args, "kvrt sim")
    if args.engine_profile is not None and args.device == CPU_CALIBRATED:
        raise SystemExit("kvrt sim: --engine-profile applies to a GPU device; cpu-calibrated is "
                         "kvrt's own engine, measured on this machine")
    try:
        device = simulated_device(args)
        with refused_calls_exit("kvrt sim"), asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runner.run(simulate(args, bench, device))
    except ConfigError as exc:
        raise SystemExit(f"kvrt sim: {exc}") from None
    except CalibrationError as exc:
        raise SystemExit(f"kvrt sim: calibrating this machine failed: {exc}. Other work on the "
                         "machine disturbs the measurements: run it again when it is quieter"
                         ) from None
    return 0
