"""`kvrt sim --replicas N --router NAMES`: the routers compared side by side over N simulated
engines, as `kvrt sim` compares policies over one.

Each replica is a whole simulated engine (its own executor, KV pool and host link, built by the
one-engine factory) driven as an AsyncEngine on the one VirtualTimeLoop, so the replicas step in
parallel on one simulated clock, as N GPUs would. They sit in the ReplicaSet that
`kvrt serve --replicas N` serves, with the router by the name runtime/replicas/router.py gives
it: the same routing code, the same daemon, the same SDK. Each replica is wrapped in a
ReplicaRecorder (runtime/bench/runner.py) for the report's per-replica figures.

Every router runs under one policy (`--policies`, default DEFAULT_POLICY: the graph-aware one,
which reads the control messages the ReplicaSet sends to an agent's replica); each router is one
column of the report.
"""

from __future__ import annotations

import argparse

from kvrt.runtime.bench.main import Column, compared_policies
from kvrt.runtime.bench.runner import EngineFactory, ReplicaRecorder, Served, with_policy
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.replicas.replica_set import ReplicaSet
from kvrt.runtime.replicas.router import ROUTERS, make_router

DEFAULT_POLICY = "kvrt"
DEFAULT_ROUTERS = ",".join(ROUTERS)  # affinity, prefix, round-robin


def add_replica_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=1,
                   help="simulated engine replicas behind the daemon, each a whole device "
                        "(default: %(default)s)")
    p.add_argument("--router", default=None,
                   help=f"with --replicas > 1: the routers to compare, comma-separated, one "
                        f"column each (default: {DEFAULT_ROUTERS}), under one policy "
                        f"(--policies, default {DEFAULT_POLICY})")


def check_replica_arguments(args: argparse.Namespace, command: str) -> None:
    """Fills the defaults that depend on --replicas (policies, routers) and rejects what does
    not fit: call before check_arguments."""
    if args.replicas < 1:
        raise SystemExit(f"{command}: --replicas must be at least 1, not {args.replicas}")
    if args.replicas == 1:
        if args.router is not None:
            raise SystemExit(f"{command}: --router compares routers over replicas: it needs "
                             "--replicas 2 or more")
        return
    if args.policies is None:
        args.policies = DEFAULT_POLICY
    if len(compared_policies(args)) != 1:
        raise SystemExit(f"{command}: with --replicas the routers are compared under one "
                         f"policy; --policies names {args.policies!r} (run once per policy)")
    if args.compare is not None:
        raise SystemExit(f"{command}: --compare replays a one-engine bench; not with --replicas")
    routers = [name.strip() for name in (args.router or DEFAULT_ROUTERS).split(",")
               if name.strip()]
    unknown = [name for name in routers if name not in ROUTERS]
    if unknown or not routers:
        raise SystemExit(f"{command}: unknown --router {', '.join(unknown) or repr(args.router)};"
                         f" choose among {', '.join(ROUTERS)}")
    if len(set(routers)) != len(routers):
        raise SystemExit(f"{command}: --router names a router twice: {args.router!r}")
    args.router = ",".join(routers)


def replica_set_factory(one_engine: EngineFactory, replicas: int, router: str) -> EngineFactory:
    """Each call builds `replicas` engines with `one_engine` and a fresh router over them."""
    def make(config: EngineConfig) -> tuple[Served, int]:
        built = [one_engine(config) for _ in range(replicas)]
        engines = [engine for engine, _ in built]
        assert all(isinstance(engine, AsyncEngine) for engine in engines)
        first = engines[0]
        members = [ReplicaRecorder(engine) for engine in engines]  # type: ignore[arg-type]
        routing = make_router(router, replicas, step_tokens=config.max_num_batched_tokens)
        served = ReplicaSet(members, routing,  # type: ignore[arg-type]
                            model_name=first.model_name, max_model_len=first.max_model_len,
                            tokenizer=first.tokenizer, vocab_size=first.vocab_size)
        return served, built[0][1]

    return make


def router_columns(args: argparse.Namespace, config: ServeConfig,
                   one_engine: EngineFactory) -> list[Column]:
    """One column per router, each under the one policy."""
    configured = with_policy(config, compared_policies(args)[0])
    return [Column(router, configured, replica_set_factory(one_engine, args.replicas, router))
            for router in args.router.split(",")]


def replicas_summary(args: argparse.Namespace) -> dict[str, object]:
    return {"replicas": args.replicas, "policy": compared_policies(args)[0],
            "routers": args.router.split(",")}
