"""`kvrt` command line: `kvrt serve ...`, `kvrt model init-tiny DIR`.

Flags default to the config dataclasses' own defaults, so there is one source of truth; values
are validated by building the configs, and a bad one is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields

from kvrt.runtime.config import (
    DEVICES,
    DTYPES,
    KERNELS,
    ConfigError,
    ControlConfig,
    EngineConfig,
    ServeConfig,
    ServerLimits,
    format_size,
    parse_api_key,
    read_api_keys,
)
from kvrt.runtime.policy import make_policy, policy_names, policy_option_names
from kvrt.runtime.replicas.router import ROUTERS
from kvrt.runtime.server.tool_parsers import tool_parser_names

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ARCHS = ("llama", "qwen2", "qwen3")

log = logging.getLogger("kvrt")


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line on stderr (not argparse's usage block) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def build_parser() -> argparse.ArgumentParser:
    # kvrt bench's argument types serve every command (importing it loads torch, which the
    # bench and sim commands need anyway).
    from kvrt.runtime.bench.main import add_arguments as add_bench_arguments
    from kvrt.runtime.bench.main import param_argument, size_argument

    engine, serve = _defaults(EngineConfig), _defaults(ServeConfig)
    control, limits = _defaults(ControlConfig), _defaults(ServerLimits)
    parser = _Parser(prog="kvrt", description="KV-cache runtime for multi-agent LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("serve", help="serve a model over the OpenAI API")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF checkpoint folder or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default=serve["host"], help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=serve["port"],
                   help="port to bind; 0 picks a free one (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default=engine["device"],
                   help="default: %(default)s (cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=engine["dtype"],
                   help="default: %(default)s (float32 on CPU, bfloat16 on CUDA)")
    # A size's default is given as text (argparse parses it with `type`), so help shows 512MiB.
    p.add_argument("--kv-cache-memory", type=size_argument,
                   default=format_size(engine["kv_cache_memory"]),
                   metavar="SIZE", help="size of the device KV pool, e.g. 512MiB, 2GiB "
                   "(default: %(default)s)")
    p.add_argument("--host-cache-memory", type=size_argument,
                   default=format_size(engine["host_cache_memory"]),
                   metavar="SIZE", help="host tier for offloaded KV, e.g. 4GiB (default: 0, none)")
    p.add_argument("--max-model-len", type=int, default=engine["max_model_len"], metavar="N",
                   help="context length in tokens (default: the model's own)")
    p.add_argument("--max-num-seqs", type=int, default=engine["max_num_seqs"], metavar="N",
                   help="sequences in the running batch (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=engine["max_num_batched_tokens"], metavar="N",
                   help="token budget per engine step (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=engine["block_size"], metavar="N",
                   help="tokens per KV block (default: %(default)s)")
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction,
                   default=engine["prefix_caching"],
                   help="reuse the KV of shared prompt prefixes (default: on)")
    p.add_argument("--seed", type=int, default=engine["seed"],
                   help="sampling seed of requests without their own (default: %(default)s)")
    p.add_argument("--policy", choices=policy_names(), default=engine["policy"],
                   help="KV cache policy (default: %(default)s)")
    p.add_argument("--policy-option", action="append", default=[], type=param_argument,
                   metavar="KEY=VALUE", help="set one of the policy's options (repeatable): "
                   + _policy_options_help())
    p.add_argument("--kernels", choices=KERNELS, default=engine["kernels"],
                   help="default: %(default)s (triton on CUDA, torch on CPU)")
    p.add_argument("--served-model-name", default=serve["served_model_name"], metavar="NAME",
                   help="model name clients use (default: derived from the checkpoint)")
    p.add_argument("--tool-call-parser", choices=tool_parser_names(),
                   default=serve["tool_call_parser"],
                   help="how replies are read for tool calls (default: %(default)s)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=serve["log_level"],
                   help="default: %(default)s")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY[:TENANT]",
                   help="require this bearer key (repeatable); its tenant isolates caches, "
                   "graphs and runs (default tenant: default)")
    p.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="more keys, one KEY[:TENANT] per line")
    p.add_argument("--admin-key", action="append", default=[], metavar="KEY",
                   help="an operator's key (repeatable): it opens /metrics, with per-tenant "
                   "figures, and nothing else; with any key set, tenant keys get 403 there")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without a key even when keys are set (without "
                   "per-tenant figures, which need an admin key)")
    p.add_argument("--state-dir", default=serve["state_dir"], metavar="DIR",
                   help="persist graphs and run metadata here (SQLite; default: none)")
    p.add_argument("--max-queued-requests", type=int, default=limits["max_queued_requests"],
                   metavar="N", help="requests waiting for the engine before 429 "
                   "(default: %(default)s)")
    p.add_argument("--max-queued-tokens", type=int, default=limits["max_queued_tokens"],
                   metavar="N", help="their prompt tokens before 429 (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=limits["request_timeout_s"],
                   metavar="S", help="a request's whole life in seconds; 0: none "
                   "(default: %(default)s)")
    p.add_argument("--max-body-size", type=size_argument,
                   default=format_size(limits["max_body_bytes"]),
                   metavar="SIZE", help="largest request body (default: %(default)s)")
    p.add_argument("--max-body-rate-per-tenant", type=size_argument,
                   default=format_size(limits["max_body_bytes_per_s_per_tenant"]), metavar="SIZE",
                   help="with several tenants, the bytes of request bodies one tenant may send "
                   "a second (bursts of --max-body-size); past it, 429 body_rate_exceeded; 0: "
                   "no limit (default: %(default)s a second)")
    p.add_argument("--max-messages", type=int, default=limits["max_messages"], metavar="N",
                   help="messages per chat request or round (default: %(default)s)")
    p.add_argument("--max-events-per-second", type=float, default=limits["max_events_per_s"],
                   metavar="R", help="events per run per second (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=limits["shutdown_timeout_s"],
                   metavar="S", help="seconds in-flight work gets to finish on shutdown "
                   "(default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=limits["header_timeout_s"],
                   metavar="S", help="seconds a connection gets to send a request's line and "
                   "headers, from its opening or its previous response; an idle keep-alive "
                   "connection is closed after as long (default: %(default)s)")
    p.add_argument("--seconds-per-output-token", type=float,
                   default=control["seconds_per_output_token"], metavar="S",
                   help="the graph cost model's decode time per token (default: %(default)s)")
    p.add_argument("--max-live-runs", type=int, default=control["max_live_runs"], metavar="N",
                   help="runs live at once (default: %(default)s)")
    p.add_argument("--max-runs-per-tenant", type=int, default=control["max_runs_per_tenant"],
                   metavar="N", help="runs one tenant may have live at once; past it, a new run "
                   "is a 429 quota_exceeded (default: %(default)s)")
    p.add_argument("--max-graphs-per-tenant", type=int,
                   default=control["max_graphs_per_tenant"], metavar="N",
                   help="graphs one tenant may hold (default: %(default)s)")
    # Tenant shares (runtime/server/admission.py) and abandoned runs (runtime/graph/runs.py)
    p.add_argument("--max-queue-share-per-tenant", type=float,
                   default=limits["max_queue_share_per_tenant"], metavar="F",
                   help="with several tenants, the part of --max-queued-requests and "
                   "--max-queued-tokens one tenant may hold; past it, 429 tenant_queue_full "
                   "(default: %(default)s)")
    p.add_argument("--run-idle-timeout", type=float, default=control["run_idle_timeout_s"],
                   metavar="S", help="a live run with no call in flight and no event, call or "
                   "round for S seconds ends by itself (status expired) and frees its KV; "
                   "0: never (default: %(default)s)")
    p.add_argument("--max-graph-bytes-per-tenant", type=size_argument,
                   default=format_size(control["max_graph_bytes_per_tenant"]), metavar="SIZE",
                   help="the declarations of one tenant's graphs together, as compact JSON; "
                   "past it a new graph is a 429 quota_exceeded, a 413 if it alone is larger "
                   "(default: %(default)s)")
    p.add_argument("--max-run-agents-per-tenant", type=int,
                   default=control["max_run_agents_per_tenant"], metavar="N",
                   help="the agents of one tenant's live runs together (each run counts its "
                   "graph's agents); past it a new run is a 429 quota_exceeded, a 413 if its "
                   "graph alone has more (default: %(default)s)")
    p.add_argument("--transition-prior-observations", type=int,
                   default=control["transition_prior_observations"], metavar="N",
                   help="a declared edge counts towards priorities until its source was seen "
                   "leaving N times, then only if taken often enough (default: %(default)s)")
    p.add_argument("--min-branch-share", type=float, default=control["min_branch_share"],
                   metavar="F", help="the share of its source's departures an edge needs to "
                   "stay in the learned graph (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=serve["replicas"], metavar="N",
                   help="engine replicas, each a Ray actor with its own GPU (or CPU), behind "
                   "this daemon (default: 1, in this process without Ray; with --ray-address, "
                   "one per GPU of the cluster)")
    p.add_argument("--ray-address", default=serve["ray_address"], metavar="ADDR",
                   help="run the replicas on this Ray cluster (auto, or HOST:6379: the head node) "
                   "instead of a local Ray instance")
    p.add_argument("--router", choices=ROUTERS, default=serve["router"],
                   help="which replica a call goes to: affinity (a run's agents on one replica, "
                   "calls without a run by prompt prefix), prefix, round-robin "
                   "(default: %(default)s)")
    p.set_defaults(run=_serve, command_parser=p)

    bench = commands.add_parser("bench", help="replay a multi-agent workload under several "
                                "policies and report latency, prefill work and KV memory")
    add_bench_arguments(bench)
    bench.set_defaults(run=_bench, command_parser=bench)

    from kvrt.runtime.sim.main import add_arguments as add_sim_arguments

    sim = commands.add_parser("sim", help="the same benchmark on a simulated GPU and model shape "
                              "(roofline cost model, simulated time)")
    add_sim_arguments(sim)
    sim.set_defaults(run=_sim, command_parser=sim)

    model = commands.add_parser("model", help="model utilities")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    tiny = model_commands.add_parser("init-tiny", help="write a tiny random checkpoint "
                                     "(for tests and demos)")
    tiny.add_argument("dir", metavar="DIR")
    tiny.add_argument("--arch", choices=ARCHS, default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_init_tiny, command_parser=tiny)
    return parser


def _policy_options_help() -> str:
    return "; ".join(f"{name}: {', '.join(policy_option_names(name)) or 'none'}"
                     for name in policy_names())


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Raises ConfigError for an out-of-range value."""
    engine = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory, host_cache_memory=args.host_cache_memory,
        block_size=args.block_size,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_caching=args.prefix_caching, policy=args.policy,
        policy_options=dict(args.policy_option), kernels=args.kernels, seed=args.seed,
    )
    make_policy(engine.policy, engine.policy_options)  # a bad option fails here, not at load
    control = ControlConfig(seconds_per_output_token=args.seconds_per_output_token,
                            max_live_runs=args.max_live_runs,
                            max_runs_per_tenant=args.max_runs_per_tenant,
                            max_graphs_per_tenant=args.max_graphs_per_tenant,
                            max_graph_bytes_per_tenant=args.max_graph_bytes_per_tenant,
                            max_run_agents_per_tenant=args.max_run_agents_per_tenant,
                            transition_prior_observations=args.transition_prior_observations,
                            min_branch_share=args.min_branch_share,
                            run_idle_timeout_s=args.run_idle_timeout)
    limits = ServerLimits(
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_size,
        max_messages=args.max_messages, max_events_per_s=args.max_events_per_second,
        shutdown_timeout_s=args.shutdown_timeout, header_timeout_s=args.header_timeout,
        max_queue_share_per_tenant=args.max_queue_share_per_tenant,
        max_body_bytes_per_s_per_tenant=args.max_body_rate_per_tenant,
    )
    keys = [parse_api_key(text) for text in args.api_key]
    if args.api_keys_file is not None:
        keys += read_api_keys(args.api_keys_file)
    return ServeConfig(host=args.host, port=args.port, log_level=args.log_level,
                       served_model_name=args.served_model_name,
                       tool_call_parser=args.tool_call_parser, api_keys=tuple(keys),
                       admin_keys=tuple(args.admin_key), metrics_public=args.metrics_public,
                       state_dir=args.state_dir,
                       limits=limits, engine=engine, control=control,
                       replicas=args.replicas, ray_address=args.ray_address, router=args.router)


def _serve(args: argparse.Namespace) -> int:
    try:
        config = serve_config(args)
    except ConfigError as exc:
        args.command_parser.error(str(exc))  # exits 2 with a one-line message
    # aiohttp, torch and transformers load only when serving
    from kvrt.runtime.model.checkpoint import CheckpointError
    from kvrt.runtime.server.serve import run_server

    try:
        run_server(config)
    except ConfigError as exc:  # found while loading: --max-model-len too long, no CUDA, ...
        args.command_parser.error(str(exc))
    except (CheckpointError, OSError, ValueError) as exc:  # no such model, port in use, ...
        log.debug("serve failed", exc_info=True)
        log.error("cannot serve: %s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    return 0


def _bench(args: argparse.Namespace) -> int:
    from kvrt.runtime.bench.main import run

    return run(args)


def _sim(args: argparse.Namespace) -> int:
    from kvrt.runtime.sim.main import run

    return run(args)


def _init_tiny(args: argparse.Namespace) -> int:
    from kvrt.runtime.model.tiny import init_tiny

    path = init_tiny(args.dir, arch=args.arch, seed=args.seed)
    log.info("wrote a tiny %s checkpoint to %s", args.arch, path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
