"""Whether one client's heavy request stops the daemon: /health latency under load.

    python -m kvrt.runtime.bench.loop_latency [--model PATH|tiny] [--agents 2000]
        [--body-bytes 64MiB] [--baseline-s 3] [--url URL] [--out bench-out/loop_latency.json]

A `kvrt serve` subprocess (the default model, or `--model`; `tiny`: a tiny random checkpoint
written for the run), or the daemon at `--url`. A thread polls /health every 10 ms while this
process, one load at a time and then all at once, sends:

- body:   the largest body the daemon accepts (`--body-bytes`, its --max-body-bytes less 1 KiB):
          one message whose text is longer than any prompt, refused (400) from its length;
- prompt: one message whose text is just under that length limit (the limit read from the
          400's message), tokenized before it is refused as too many tokens;
- round:  a round of `--agents` agents of a run (max_tokens 1): a shared message, then each
          agent's own question; the agents' prompts share the news as a prefix, so the engine's
          work is small and the server's (rendering, tokenizing, admitting) shows;
- all:    the three together.

Reported per phase, beside a baseline with no load: the polls' median, p99 and max latency (ms),
how many took over 100 ms (the goal: none), and each load's status and seconds. A benchmark,
not a test: the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from kvrt.runtime.bench.control_speed import wait_healthy
from kvrt.runtime.config import ServerLimits, parse_size

POLL_S = 0.01
SLOW_MS = 100.0
NEWS = " ".join(f"Item {k}: the bridge on road {k} is closed, take the ferry at pier {k}."
                for k in range(8))
_LIMIT = re.compile(r"\((\d+) characters at most\)")


class Poller:
    """Polls /health every POLL_S from a process of its own, so that this one's work (sending
    64 MiB costs Python 3.11's asyncio transport seconds of copying) cannot delay a poll;
    `window(start, end)` gives the latencies (ms) of the polls sent between two
    time.monotonic() readings (one clock for both processes). Entering waits for the first
    poll's answer: a spawned process takes seconds to import aiohttp on a busy machine."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop, self._polling = context.Event(), context.Event()
        self._results, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_poll,
                                        args=(url, self._stop, self._polling, sender))
        self.polls: list[tuple[float, float]] = []  # (sent at, latency in ms)
        self.errors = 0

    def __enter__(self) -> Poller:
        self._process.start()
        if not self._polling.wait(120):
            self._process.kill()
            raise RuntimeError("the poller's process did not answer a poll in 120 s")
        return self

    def __exit__(self, *_: object) -> None:
        self.collect()
        self._process.join(10)

    def collect(self) -> None:
        """Stops the polls and takes their latencies."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.polls, self.errors = self._results.recv()

    def window(self, start: float, end: float) -> list[float]:
        return [ms for sent, ms in self.polls if start <= sent < end]


def _poll(url: str, stop: Any, polling: Any, results: Any) -> None:
    async def go() -> tuple[list[tuple[float, float]], int]:
        polls, errors = [], 0
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                sent = time.monotonic()
                async with session.get(url + "/health") as resp:
                    await resp.read()
                    errors += resp.status != 200
                took = time.monotonic() - sent
                polls.append((sent, took * 1e3))
                polling.set()
                await asyncio.sleep(max(POLL_S - took, 0.0))
        return polls, errors

    results.send(asyncio.run(go()))


def latency_summary(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    if not ordered:
        return {"polls": 0}
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"polls": len(ordered), "median_ms": statistics.median(ordered), "p99_ms": p99,
            "max_ms": ordered[-1], "over_100ms": sum(ms > SLOW_MS for ms in ordered)}


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, json.loads(await resp.read())


def chat_body(chars: int) -> bytes:
    text = ("lorem ipsum " * (chars // 12 + 1))[:chars]
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 1}).encode()


async def char_limit(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """The daemon's limit on a prompt's characters, as its refusal of `body` states it."""
    status, reply = await post(session, url + "/v1/chat/completions", body)
    match = _LIMIT.search(reply.get("error", {}).get("message", ""))
    if status != 400 or match is None:
        raise RuntimeError(f"the largest body was not refused from its length: {status} {reply}")
    return int(match.group(1))


def round_body(agents: list[str]) -> bytes:
    return json.dumps({
        "shared": [{"role": "user", "content": NEWS}],
        "agents": {name: {"messages": [], "after": [
            {"role": "user", "content": f"You are {name}. Say what you do next."}]}
            for name in agents},
        "max_tokens": 1, "ignore_eos": True}).encode()


async def start_round_run(session: aiohttp.ClientSession, url: str, agents: list[str]) -> str:
    graph = {"name": "loop-latency", "agents": [{"name": a} for a in agents]}
    status, reply = await post(session, url + "/v1/graphs", json.dumps(graph).encode())
    assert status == 201, reply
    status, reply = await post(session, url + "/v1/runs",
                               json.dumps({"graph_id": reply["id"]}).encode())
    assert status == 201, reply
    return reply["id"]


async def timed(load: Any) -> dict[str, Any]:
    started = time.monotonic()
    status, reply = await load
    return {"status": status, "seconds": time.monotonic() - started,
            **({"error": reply["error"].get("code")} if status >= 400 else {})}


async def run_phases(url: str, body_bytes: int, agents: int, baseline_s: float
                     ) -> dict[str, Any]:
    names = [f"agent{i}" for i in range(agents)]
    largest = chat_body(body_bytes - 1024)  # the JSON around the text fits in the rest
    windows: dict[str, tuple[float, float, dict[str, Any]]] = {}  # phase -> start, end, loads
    timeout = aiohttp.ClientTimeout(total=None)
    with Poller(url) as poller:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            limit = await char_limit(session, url, largest)
            under = chat_body(limit - 64)
            runs = [await start_round_run(session, url, names) for _ in range(2)]
            rounds = [f"{url}/v1/runs/{run}/rounds" for run in runs]
            start = time.monotonic()
            await asyncio.sleep(baseline_s)
            windows["baseline"] = (start, time.monotonic(), {})
            chat = url + "/v1/chat/completions"
            loads = {"body": lambda: post(session, chat, largest),
                     "prompt": lambda: post(session, chat, under),
                     "round": lambda: post(session, rounds[0], round_body(names))}
            for name, load in loads.items():
                start = time.monotonic()
                result = await timed(load())
                windows[name] = (start, time.monotonic(), {name: result})
            loads["round"] = lambda: post(session, rounds[1], round_body(names))
            start = time.monotonic()
            together = await asyncio.gather(*(timed(load()) for load in loads.values()))
            windows["all"] = (start, time.monotonic(), dict(zip(loads, together)))
            for run in runs:
                async with session.delete(f"{url}/v1/runs/{run}") as resp:
                    await resp.read()
    phases = {name: {"loads": done, "latency": latency_summary(poller.window(start, end))}
              for name, (start, end, done) in windows.items()}
    return {"limit_chars": limit, "body_bytes": len(largest), "agents": agents,
            "health_errors": poller.errors, "phases": phases}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "kvrt.runtime.cli", "serve", "--port", str(port), *extra]
    if model is not None:
        command += ["--model", model]
    # PYTHONSAFEPATH: run from a checkout, the repo's kernels/ would shadow the `kernels`
    # distribution that transformers imports.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)


def measure(model: str | None, url: str | None, body_bytes: int, agents: int,
            baseline_s: float, serve_args: list[str]) -> dict[str, Any]:
    """Runs the phases against `url`, or a daemon started for them (`model` None: the
    default model; "tiny": a tiny random checkpoint)."""
    if url is not None:
        return asyncio.run(run_phases(url, body_bytes, agents, baseline_s))
    with tempfile.TemporaryDirectory() as tmp:
        if model == "tiny":
            from kvrt.runtime.model.tiny import init_tiny  # torch: not in the polling process

            model = str(init_tiny(Path(tmp) / "tiny", arch="llama", seed=0))
        port, log = free_port(), Path(tmp) / "serve.log"
        server = start_server(model, port, log, serve_args)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(wait_healthy(url, timeout=300, server=server))
            return asyncio.run(run_phases(url, body_bytes, agents, baseline_s))
        except BaseException:
            sys.stderr.write(log.read_text()[-4000:])
            raise
        finally:
            server.terminate()
            server.wait(60)


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['agents']} agents, body of {report['body_bytes']} bytes, prompt limit "
          f"{report['limit_chars']} characters")
    print("| phase | polls | median (ms) | p99 (ms) | max (ms) | over 100 ms | loads |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, phase in report["phases"].items():
        lat = phase["latency"]
        loads = ", ".join(f"{k}: {v['status']} in {v['seconds']:.2f} s"
                          for k, v in phase.get("loads", {}).items())
        print(f"| {name} | {lat['polls']} | {lat.get('median_ms', 0):.1f} | "
              f"{lat.get('p99_ms', 0):.1f} | {lat.get('max_ms', 0):.1f} | "
              f"{lat.get('over_100ms', 0)} | {loads} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="checkpoint to serve, or `tiny` (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--url", default=None, help="a running daemon to measure instead")
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--body-bytes", type=parse_size,
                        default=ServerLimits().max_body_bytes)
    parser.add_argument("--baseline-s", type=float, default=3.0)
    parser.add_argument("--serve-args", default="--max-num-seqs 64",
                        help="more `kvrt serve` options (default: %(default)s)")
    parser.add_argument("--out", default="bench-out/loop_latency.json")
    args = parser.parse_args(argv)
    report = measure(args.model, args.url, args.body_bytes, args.agents, args.baseline_s,
                     args.serve_args.split())
    report["machine"] = f"{platform.machine()} {platform.python_version()}"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
