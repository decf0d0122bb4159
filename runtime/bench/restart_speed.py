"""How long a daemon takes to restart on a full state dir (`--state-dir`).

    python -m kvrt.runtime.bench.restart_speed [--tenants 1] [--runs 1024]
                                               [--out bench-out/restart.json]

The state dir holds, for each of `--tenants` tenants, as many of the largest graphs the limits
allow as fit its quotas (the default --max-graph-bytes-per-tenant and --max-graphs-per-tenant):
4,096 agents and 65,536 edges each (a random DAG: every agent its own component, the most
structure per byte), and `--runs` runs per tenant left live (they come back interrupted). A
`kvrt serve` subprocess (tiny random model) is started on it, killed (SIGKILL, as a crash), and
started again; reported: seconds from the start until /health answers 200, for the same daemon
on an empty state dir and on the full one (best of `--repeat`), and the difference, the cost of
the state. A benchmark, not a test: the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import declared_bytes
from kvrt.runtime.graph.listing import new_id
from kvrt.runtime.graph.store import SavedGraph, SavedRun, StateStore
from kvrt.runtime.model.tiny import init_tiny
from kvrt.sdk.protocol.control import MAX_AGENTS, MAX_EDGES, AgentSpec, GraphSpec


def largest_graph(seed: int) -> GraphSpec:
    """MAX_AGENTS agents with short names, MAX_EDGES edges, all forward (a DAG)."""
    rng = random.Random(seed)
    edges: set[tuple[int, int]] = set()
    while len(edges) < MAX_EDGES:
        source, target = sorted(rng.sample(range(MAX_AGENTS), 2))
        edges.add((source, target))
    return GraphSpec(name=f"largest-{seed}", agents=[AgentSpec(name=f"a{i}")
                                                     for i in range(MAX_AGENTS)],
                     edges=[(f"a{s}", f"a{t}") for s, t in sorted(edges)])


def fill(state_dir: Path, tenants: int, runs: int) -> dict[str, int]:
    """Writes the state dir as a daemon would have; returns what it holds."""
    quotas, now = ControlConfig(), int(time.time())
    store = StateStore.open(str(state_dir))
    graphs = stored_bytes = 0
    try:
        for tenant in (f"tenant-{t}" for t in range(tenants)):
            held: list[str] = []
            used, seed = 0, 0
            while len(held) < quotas.max_graphs_per_tenant:
                spec = largest_graph(seed)
                size = declared_bytes(spec)
                if used + size > quotas.max_graph_bytes_per_tenant:
                    break
                held.append(new_id("graph"))
                store.add_graph(SavedGraph(held[-1], tenant, now, spec))
                used, seed = used + size, seed + 1
            for i in range(min(runs, quotas.max_runs_per_tenant)):
                store.add_run(SavedRun(new_id("run"), held[i % len(held)], tenant, f"k{i}", now))
            graphs, stored_bytes = graphs + len(held), stored_bytes + used
    finally:
        store.close()
    return {"graphs": graphs, "declared_bytes": stored_bytes,
            "runs": tenants * min(runs, quotas.max_runs_per_tenant)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_healthy(model: Path, state_dir: Path, log: Path, timeout: float = 600) -> float:
    """Seconds from starting `kvrt serve` on the state dir until /health is 200; the daemon is
    then killed (SIGKILL: nothing is closed cleanly, as in a crash)."""
    port = _free_port()
    command = [sys.executable, "-m", "kvrt.runtime.cli", "serve", "--model", str(model),
               "--port", str(port), "--kv-cache-memory", "4MiB", "--max-model-len", "256",
               "--state-dir", str(state_dir)]
    started = time.perf_counter()
    daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        while time.perf_counter() - started < timeout:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"the daemon did not come up in {timeout} s; see {log}")
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--runs", type=int, default=ControlConfig().max_runs_per_tenant,
                        help="runs per tenant left live in the state dir")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="bench-out/restart.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = init_tiny(root / "tiny", arch="llama", seed=0)
        held = fill(root / "full", args.tenants, args.runs)
        log = root / "daemon.log"
        time_to_healthy(model, root / "full", log)  # the first start after the writes
        empty = min(time_to_healthy(model, root / "empty", log) for _ in range(args.repeat))
        full = min(time_to_healthy(model, root / "full", log) for _ in range(args.repeat))
    report = {"machine": f"{platform.machine()} {platform.processor()} "
                         f"{platform.python_version()}", "tenants": args.tenants, **held,
              "empty_state_s": empty, "full_state_s": full, "state_s": full - empty}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{held['graphs']} graphs of {MAX_AGENTS} agents and {MAX_EDGES} edges "
          f"({held['declared_bytes'] / 2**20:.1f} MiB declared) and {held['runs']} "
          f"interrupted runs, {args.tenants} tenant(s): /health after {full:.2f} s "
          f"(empty state dir: {empty:.2f} s; the state's share: {full - empty:.2f} s)")


if __name__ == "__main__":
    main()
