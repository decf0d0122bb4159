"""The control plane's speed: events over loopback, and priorities of a 1,000-agent graph.

    python -m kvrt.runtime.bench.control_speed [--seconds 5] [--concurrency 1,16]
                                               [--agents 1000] [--out bench-out/control.json]

- Events: a `kvrt serve` subprocess (tiny random model: events never touch the model) and
  clients in this process posting tool_call.started / tool_call.finished pairs, each with an
  id as the SDK sends them, for `--seconds` at each concurrency, on a run of a graph of as many
  agents as clients, then of the random `--agents` graph (its agents with a tool post).
  Reported: events/s, the client-side round trip p50/p99, and the server's own time per event
  (decode, apply, encode; its `kvrt:control_event_seconds`). The push of the priorities an
  event moved runs on the loop's next turn, after the reply: it shows in events/s and the round
  trip, not in the server's time per event (see event_push_ms for it alone).
- Priorities: the critical path and every agent's priority of a run of a random 1,000-agent
  graph with loops (the work done on each GET of a run and each attributed call), the same
  plus the whole run-state view, building the graph's structure (once per graph), and an
  event's own work in the server: applying it, and pushing the priorities it moved
  (server/priority_sync.py: the critical path, every priority, the diff).
A benchmark, not a test: the machine is shared and noisy; figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import msgspec

from kvrt.runtime.config import ControlConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.critical_path import GraphStructure, critical_path
from kvrt.runtime.model.tiny import init_tiny
from kvrt.runtime.server.control_views import run_state
from kvrt.runtime.server.priority_sync import PrioritySync
from kvrt.sdk.protocol.control import (
    AgentSpec,
    EdgeSpec,
    GraphSpec,
    ToolCallFinished,
    ToolCallStarted,
)


def random_graph(agents: int, seed: int = 0) -> GraphSpec:
    """Agents each fed by 1-3 of the 40 before them, a two-agent loop every 50 agents (an agent
    and its predecessor feeding each other), and a tool on every third agent."""
    rng = random.Random(seed)
    names = [f"agent{i}" for i in range(agents)]
    specs = [AgentSpec(name=n, tools={"tool": rng.uniform(0.1, 5)} if i % 3 == 0 else {},
                       expected_output_tokens=rng.randint(16, 512)) for i, n in enumerate(names)]
    edges: set[tuple[int, int]] = set()
    for i in range(1, agents):
        for source in rng.sample(range(max(0, i - 40), i), k=min(i, rng.randint(1, 3))):
            edges.add((source, i))
    for i in range(50, agents, 50):
        edges.update({(i - 1, i), (i, i - 1)})
    return GraphSpec(name="random", agents=specs,
                     edges=[EdgeSpec(source=names[s], target=names[t]) for s, t in sorted(edges)])


def time_priorities(agents: int, repeats: int = 50) -> dict[str, float]:
    spec = random_graph(agents)
    control = ControlPlane(ControlConfig())
    started = time.perf_counter()
    entry = control.create_graph(spec)
    create_ms = (time.perf_counter() - started) * 1e3
    run = control.start_run(entry.id)
    costs = [entry.costs.work(a) for a in entry.graph.agents]

    def median_ms(fn, times: int = repeats) -> float:
        samples = []
        for _ in range(times):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    structure = entry.graph.structure
    apply_ms, push_ms, pushed = time_event_work(control, run, repeats)
    return {
        "agents": agents,
        "edges": len(spec.edges),
        "loops": sum(1 for m in structure.members if len(m) > 1),
        "critical_path_ms": median_ms(lambda: critical_path(structure, costs)),
        "run_priorities_ms": median_ms(lambda: [run.priority(i, c) for c in [run.criticality()]
                                                for i in range(agents)]),
        "run_state_view_ms": median_ms(lambda: run_state(run, {})),
        "build_structure_ms": median_ms(
            lambda: GraphStructure.build(agents, [(e.source, e.target, None)
                                                  for e in entry.graph.edges]), times=5),
        "declare_graph_ms": create_ms,
        "event_apply_ms": apply_ms,
        "event_push_ms": push_ms,
        "event_pushed_agents": pushed,
    }


class _Count:
    """Takes the pushes in place of the engine, counting the agents sent."""

    def __init__(self) -> None:
        self.agents = 0

    def set_priorities(self, run: str, priorities) -> None:
        self.agents += len(priorities)

    def set_outlook(self, run: str, remaining_s: float, next_use) -> None:
        pass


def time_event_work(control: ControlPlane, run, repeats: int) -> tuple[float, float, float]:
    """Medians over tool_call.started / .finished events of the run's agents with a tool, in
    ms: applying an event, and pushing what it moved; and the agents pushed per event."""
    sink = _Count()
    sync = PrioritySync(sink)
    sync.track(run)
    sync.push(run)  # the first push sends every agent: not what an event costs
    sink.agents = 0
    tooled = [a.name for a in run.graph.agents if a.tools]
    applies, pushes = [], []
    for n in range(2 * repeats):
        agent = tooled[(n // 2) % len(tooled)]
        event = (ToolCallStarted(agent=agent, tool="tool") if n % 2 == 0
                 else ToolCallFinished(agent=agent, tool="tool"))
        t0 = time.perf_counter()
        run.apply(event)
        t1 = time.perf_counter()
        sync.push(run)
        t2 = time.perf_counter()
        applies.append((t1 - t0) * 1e3)
        pushes.append((t2 - t1) * 1e3)
    return statistics.median(applies), statistics.median(pushes), sink.agents / (2 * repeats)


# ---- events over loopback --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "kvrt.runtime.cli", "serve", "--model", str(model),
               "--port", str(port), "--kv-cache-memory", "4MiB", "--max-model-len", "256",
               "--max-events-per-second", "1e6"]  # the speed, not the per-run limit
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))


async def wait_healthy(url: str, timeout: float = 120,
                       server: subprocess.Popen | None = None) -> None:
    """Until `/health` is 200; TimeoutError past `timeout`, or once `server` (the daemon's
    process, if given) has exited."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and (server is None or server.poll() is None):
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    status = "" if server is None else f" (exit status {server.poll()})"
    raise TimeoutError(f"the server at {url} did not come up{status}")


async def server_event_seconds(session: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    """(sum, count) of the server's kvrt:control_event_seconds histogram."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("kvrt:control_event_seconds_"):
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            values[name] = float(value)
    return values["kvrt:control_event_seconds_sum"], int(values["kvrt:control_event_seconds_count"])


async def drive_events(url: str, concurrency: int, seconds: float,
                       graph_agents: int | None = None) -> dict[str, float]:
    """`graph_agents`: the run is of random_graph(graph_agents), each client posting for one
    of its agents with a tool; None: of a graph of `concurrency` agents, one each."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        spec = (GraphSpec(name="bench", agents=[AgentSpec(name=f"a{i}", tools={"tool": 1.0})
                                                for i in range(concurrency)])
                if graph_agents is None else random_graph(graph_agents))
        async with session.post(url + "/v1/graphs", json=msgspec.to_builtins(spec)) as r:
            graph = await r.json()
        tooled = [a.name for a in spec.agents if a.tools][:concurrency]
        async with session.post(url + "/v1/runs", json={"graph_id": graph["id"]}) as r:
            run = (await r.json())["id"]
        sum_before, count_before = await server_event_seconds(session, url)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def client(agent: str) -> None:
            kinds = ("tool_call.started", "tool_call.finished")
            n = 0
            while time.perf_counter() < deadline:
                body = {"type": kinds[n % 2], "agent": agent, "tool": "tool",
                        "id": uuid.uuid4().hex}
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/runs/{run}/events", json=body) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - t0)
                n += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(name) for name in tooled))
        elapsed = time.perf_counter() - started
        sum_after, count_after = await server_event_seconds(session, url)
        await session.delete(f"{url}/v1/runs/{run}")
    latencies.sort()
    served = count_after - count_before
    return {
        "graph_agents": len(spec.agents),
        "concurrency": concurrency,
        "events": len(latencies),
        "events_per_s": len(latencies) / elapsed,
        "roundtrip_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "roundtrip_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "server_us_per_event": (sum_after - sum_before) / served * 1e6,
    }


async def events_benchmark(concurrencies: list[int], seconds: float,
                           graph_agents: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        model = init_tiny(Path(tmp) / "tiny", arch="llama", seed=0)
        port = _free_port()
        server = start_server(model, port, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_healthy(url)
            return ([await drive_events(url, c, seconds) for c in concurrencies]
                    + [await drive_events(url, c, seconds, graph_agents) for c in concurrencies])
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--out", default="bench-out/control_plane.json")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    priorities = time_priorities(args.agents)
    events = asyncio.run(events_benchmark(concurrencies, args.seconds, args.agents))
    report = {"machine": f"{platform.machine()} {platform.processor()} "
                         f"{platform.python_version()}", "priorities": priorities,
              "events": events}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"priorities of {priorities['agents']} agents, {priorities['edges']} edges, "
          f"{priorities['loops']} loops:")
    for key in ("critical_path_ms", "run_priorities_ms", "run_state_view_ms",
                "build_structure_ms", "declare_graph_ms", "event_apply_ms", "event_push_ms",
                "event_pushed_agents"):
        print(f"  {key:22s} {priorities[key]:8.2f}")
    print("| agents | clients | events/s | round trip p50 (ms) | p99 (ms) "
          "| server time/event (us) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in events:
        print(f"| {row['graph_agents']} | {row['concurrency']} | {row['events_per_s']:.0f} | "
              f"{row['roundtrip_p50_ms']:.2f} | {row['roundtrip_p99_ms']:.2f} | "
              f"{row['server_us_per_event']:.0f} |")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
