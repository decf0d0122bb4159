"""A bounded load test of a live daemon over loopback: `python -m kvrt.runtime.bench.load_test`.

    python -m kvrt.runtime.bench.load_test --url http://127.0.0.1:8400 --seconds 60
        [--agents 16] [--stream-fraction 0.3] [--cancel-fraction 0.1] [--burst 256]
        [--max-tokens 8] [--api-key KEY] [--admin-key KEY] [--json]

Two phases inside the time budget, then a drain check:

    phase     share of --seconds  what
    --------  ------------------  --------------------------------------------------------
    steady    the first 3/4       `--agents` agents of one run call the chat API in a loop
                                  (a growing conversation each, so prefixes are reused);
                                  a fraction stream, a fraction are cancelled mid-request
                                  (the connection closes: the daemon must free their KV)
    overload  the rest            waves of `--burst` concurrent calls at once, far beyond
                                  the daemon's queue: it should answer 429 + Retry-After
    drain     after the budget    /metrics until nothing runs, waits or holds KV (10 s)

Every call either is served (its latency counted), gets a status (429s apart from other
errors), is cancelled by the test, or fails to connect. The run is ended at the end (its
agents' cached KV is released). The report: requests, served, 429s, other errors by status,
cancellations, p50 / p99 latency of served calls, and what /metrics says once drained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp

from kvrt.sdk import Client, Graph

_DRAIN_TIMEOUT_S = 10.0
_REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class LoadConfig:
    url: str
    seconds: float = 60.0
    agents: int = 16
    stream_fraction: float = 0.3
    cancel_fraction: float = 0.1
    burst: int = 256  # concurrent calls of one overload wave
    max_tokens: int = 8
    api_key: str | None = None
    seed: int = 0
    admin_key: str | None = None  # for /metrics on a server with keys (it is the operator's)


@dataclass(slots=True)
class LoadReport:
    requests: int = 0
    served: int = 0
    rate_limited: int = 0  # 429
    retry_after_missing: int = 0  # 429s without a Retry-After header
    errors: dict[str, int] = field(default_factory=dict)  # other statuses, "connection",
    # "timeout" (no answer within the request timeout)
    cancelled: int = 0  # by the test, mid-request
    p50_ms: float = 0.0  # every served call
    p99_ms: float = 0.0
    steady_p50_ms: float = 0.0  # the steady phase's calls alone
    steady_p99_ms: float = 0.0
    served_per_s: float = 0.0
    overload_requests: int = 0
    overload_rate_limited: int = 0
    wall_s: float = 0.0
    drained: bool = False  # nothing running or waiting after the run
    kv_in_use_after: float | None = None  # kvrt:kv_cache_usage_perc once drained
    metrics_after: dict[str, float] = field(default_factory=dict)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.errors.items() if status.isdigit()
                   and int(status) >= 500)


class _Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.cancelled = 0
        self.retry_after_missing = 0

    def status(self, status: int, headers: dict[str, str]) -> None:
        self.statuses[str(status)] += 1
        if status == 429 and "Retry-After" not in headers:
            self.retry_after_missing += 1


async def run_load(config: LoadConfig) -> LoadReport:
    """Runs both phases against `config.url` and the drain check; returns the report."""
    rng = random.Random(config.seed)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    started = time.monotonic()
    graph = Graph("load-test")
    for i in range(config.agents):
        graph.agent(f"a{i}")
    async with (Client(config.url, api_key=config.api_key) as client,
                aiohttp.ClientSession(config.url, connector=connector, timeout=timeout,
                                      headers=headers) as session):
        run = await client.start_run(await client.create_graph(graph))
        steady, overload = _Tally(), _Tally()
        steady_end = started + config.seconds * 0.75
        await asyncio.gather(*(_agent(session, config, run.id, f"a{i}", steady_end, steady,
                                      random.Random(rng.random()))
                               for i in range(config.agents)))
        await _overload(session, config, started + config.seconds, overload)
        await run.close()
        wall = time.monotonic() - started
        drained, metrics = await _drain(session, config.admin_key)
    return _report(steady, overload, wall, drained, metrics)


async def _agent(session: aiohttp.ClientSession, config: LoadConfig, run: str, agent: str,
                 until: float, tally: _Tally, rng: random.Random) -> None:
    """One agent's loop: a call, its reply appended to the conversation, the next call."""
    messages = [{"role": "system", "content": f"You are agent {agent}. " * 8}]
    turn = 0
    while time.monotonic() < until:
        turn += 1
        messages.append({"role": "user", "content": f"Step {turn}: what next, {agent}?"})
        body = {"messages": messages[-9:], "max_tokens": config.max_tokens,
                "stream": rng.random() < config.stream_fraction, "temperature": 0,
                "kvrt": {"run": run, "agent": agent}}
        cancel_after = (rng.uniform(0.001, 0.2) if rng.random() < config.cancel_fraction
                        else None)
        reply = await _call(session, body, tally, cancel_after, until + _REQUEST_TIMEOUT_S)
        messages.append({"role": "assistant", "content": reply or "..."})
        if reply is None:
            await asyncio.sleep(0.05)  # refused or failed: back off a little


async def _overload(session: aiohttp.ClientSession, config: LoadConfig, until: float,
                    tally: _Tally) -> None:
    """Waves of `burst` calls at once until the budget ends (at least one wave)."""
    body = {"messages": [{"role": "user", "content": "Burst."}], "max_tokens": config.max_tokens,
            "temperature": 0}
    while True:
        await asyncio.gather(*(_call(session, body, tally, None, until + _REQUEST_TIMEOUT_S)
                               for _ in range(config.burst)))
        if time.monotonic() >= until:
            return


async def _call(session: aiohttp.ClientSession, body: dict, tally: _Tally,
                cancel_after: float | None, deadline: float) -> str | None:
    """One chat call; its text when served, else None. A cancelled call closes its
    connection mid-request (the daemon sees a disconnect)."""
    limit = max(0.001, deadline - time.monotonic()) if cancel_after is None else cancel_after
    started = time.monotonic()
    try:
        text = await asyncio.wait_for(_chat(session, body, tally), limit)
    except TimeoutError:
        if cancel_after is None:
            tally.statuses["timeout"] += 1
        else:
            tally.cancelled += 1
        return None
    except aiohttp.ClientError:
        tally.statuses["connection"] += 1
        return None
    if text is not None:  # counted once whole: one cancelled mid-stream is a cancellation
        tally.statuses["200"] += 1
        tally.latencies.append(time.monotonic() - started)
    return text


async def _chat(session: aiohttp.ClientSession, body: dict, tally: _Tally) -> str | None:
    async with session.post("/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            tally.status(resp.status, dict(resp.headers))
            await resp.read()
            return None
        if not body.get("stream"):
            return (await resp.json())["choices"][0]["message"]["content"]
        parts = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    parts.append(delta[0]["delta"]["content"])
        return "".join(parts)


async def _drain(session: aiohttp.ClientSession,
                 admin_key: str | None) -> tuple[bool, dict[str, float]]:
    """Polls /metrics until no request runs or waits and no KV is in use (or time is up)."""
    deadline = time.monotonic() + _DRAIN_TIMEOUT_S
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else None
    while True:
        async with session.get("/metrics", headers=headers) as resp:
            if resp.status != 200:  # a server with keys: /metrics takes an admin key
                raise RuntimeError(f"/metrics answered {resp.status}: {await resp.text()}")
            metrics = parse_metrics(await resp.text())
        idle = not any(metrics.get(name) for name in (
            "kvrt:num_requests_running", "kvrt:num_requests_waiting", "kvrt:kv_cache_usage_perc"))
        if idle or time.monotonic() > deadline:
            return idle, metrics
        await asyncio.sleep(0.1)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled-by-name samples of the Prometheus text (the first sample of each name)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples.setdefault(name.split("{", 1)[0], float(value))
    return samples


def _report(steady: _Tally, overload: _Tally, wall: float, drained: bool,
            metrics: dict[str, float]) -> LoadReport:
    statuses = steady.statuses + overload.statuses
    latencies = sorted(steady.latencies + overload.latencies)
    served = len(latencies)
    errors = {s: n for s, n in statuses.items() if s not in ("200", "429")}
    return LoadReport(
        requests=sum(statuses.values()) + steady.cancelled + overload.cancelled,
        served=served,
        rate_limited=statuses["429"],
        retry_after_missing=steady.retry_after_missing + overload.retry_after_missing,
        errors=errors,
        cancelled=steady.cancelled + overload.cancelled,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        steady_p50_ms=_percentile(sorted(steady.latencies), 0.50) * 1000,
        steady_p99_ms=_percentile(sorted(steady.latencies), 0.99) * 1000,
        served_per_s=served / wall if wall else 0.0,
        overload_requests=sum(overload.statuses.values()) + overload.cancelled,
        overload_rate_limited=overload.statuses["429"],
        wall_s=wall,
        drained=drained,
        kv_in_use_after=metrics.get("kvrt:kv_cache_usage_perc"),
        metrics_after={k: v for k, v in metrics.items() if k in _REPORTED_METRICS},
    )


_REPORTED_METRICS = ("kvrt:num_requests_running", "kvrt:num_requests_waiting",
                     "kvrt:kv_cache_usage_perc", "kvrt:kv_cache_cached_blocks",
                     "kvrt:kv_cache_pinned_blocks", "kvrt:num_preemptions_total")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def format_report(report: LoadReport) -> str:
    errors = ", ".join(f"{s}: {n}" for s, n in sorted(report.errors.items())) or "none"
    return "\n".join([
        f"requests {report.requests} in {report.wall_s:.1f} s: served {report.served} "
        f"({report.served_per_s:.1f}/s), 429 {report.rate_limited} "
        f"(overload phase: {report.overload_rate_limited} of {report.overload_requests}), "
        f"cancelled {report.cancelled}, other errors: {errors}",
        f"latency of served calls: p50 {report.p50_ms:.0f} ms, p99 {report.p99_ms:.0f} ms "
        f"(steady phase: p50 {report.steady_p50_ms:.0f} ms, p99 {report.steady_p99_ms:.0f} ms)",
        f"after: drained {report.drained}, KV in use {report.kv_in_use_after}, "
        f"429s without Retry-After {report.retry_after_missing}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrt.runtime.bench.load_test",
                                description="A bounded load test of a live kvrt daemon.")
    p.add_argument("--url", default="http://127.0.0.1:8400")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--stream-fraction", type=float, default=0.3)
    p.add_argument("--cancel-fraction", type=float, default=0.1)
    p.add_argument("--burst", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--api-key", default=None)
    p.add_argument("--admin-key", default=None, help="for /metrics, if the server has keys")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    config = LoadConfig(args.url.rstrip("/"), args.seconds, args.agents, args.stream_fraction,
                        args.cancel_fraction, args.burst, args.max_tokens, args.api_key,
                        args.seed, admin_key=args.admin_key)
    report = asyncio.run(run_load(config))
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0 if report.server_errors == 0 and report.drained else 1


if __name__ == "__main__":
    raise SystemExit(main())
