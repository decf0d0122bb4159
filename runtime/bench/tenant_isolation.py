"""Does one tenant's abuse cost another tenant its latency? `python -m
kvrt.runtime.bench.tenant_isolation --url URL --victim-key KEY --abuser-key KEY`

    python -m kvrt.runtime.bench.tenant_isolation --url http://127.0.0.1:8400 \\
        --victim-key VKEY --abuser-key AKEY [--seconds 20] [--victim-agents 4] \\
        [--burst 256] [--giant-body-bytes 8MiB] [--round-agents 2000] [--json]

Two phases of `--seconds` each against a daemon that knows both keys:

    phase   who                 what
    ------  ------------------  ------------------------------------------------------------
    alone   the victim          `--victim-agents` agents chat in a loop (a growing
                                conversation each); their latencies are the baseline
    abused  the victim, as      the same loop, while the abuser, at once:
            before, and the       bursts: `--burst` calls always in flight, retried 10 ms
            abuser                after each refusal (Retry-After ignored)
                                  giant prompts: bodies of `--giant-body-bytes`, one after
                                  another
                                  giant rounds: rounds of `--round-agents` agents, one after
                                  another
                                  quotas: graphs and runs created until refused (once, first)

and /health is polled every 50 ms throughout; at the phase's end the abuser's calls still in
flight are dropped (their connections closed). The report: per phase, the victim's served
calls, p50 / p99 latency and statuses, /health's worst answer; for the abuser, the statuses
of each kind of abuse. The abuser's graphs and runs are deleted at the end. Run the daemon in
another process (the benchmark's own CPU use is the abuser's; on a small machine it competes
with the daemon, which is part of what a real abuser does too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp

from kvrt.runtime.bench.load_test import _percentile
from kvrt.runtime.config import ConfigError, parse_size

_REQUEST_TIMEOUT_S = 300.0
_HEALTH_EVERY_S = 0.05
_RETRY_AFTER_REFUSAL_S = 0.01
_MAX_QUOTA_PROBES = 5000  # graphs (and runs) created before giving up on finding a quota


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    url: str
    victim_key: str | None = None
    abuser_key: str | None = None
    seconds: float = 20.0  # each phase
    victim_agents: int = 4
    max_tokens: int = 8
    burst: int = 256
    giant_body_bytes: int = 8 * 1024**2
    round_agents: int = 2000
    quota_probes: bool = True  # create graphs and runs until refused


@dataclass(slots=True)
class PhaseReport:
    served: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)  # the victim's, "200" included
    health_polls: int = 0
    health_max_ms: float = 0.0
    health_over_100ms: int = 0
    health_failed: int = 0  # polls that got no 200


@dataclass(slots=True)
class IsolationReport:
    alone: PhaseReport
    abused: PhaseReport
    abuser: dict[str, dict[str, int]]  # kind of abuse -> status -> count
    graphs_before_refusal: int | None  # None: no refusal within the probes (or not probed)
    runs_before_refusal: int | None

    @property
    def p50_ratio(self) -> float:
        return self.abused.p50_ms / self.alone.p50_ms if self.alone.p50_ms else 0.0

    @property
    def p99_ratio(self) -> float:
        return self.abused.p99_ms / self.alone.p99_ms if self.alone.p99_ms else 0.0


class _Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []


async def run_isolation(config: IsolationConfig) -> IsolationReport:
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    async with (tenant_session(config.url, config.victim_key, timeout) as victim,
                tenant_session(config.url, config.abuser_key, timeout) as abuser):
        alone = await _phase(victim, config, abuse=None)
        created = _Created()
        abuse = _Abuse(abuser, config, created)
        try:
            abused = await _phase(victim, config, abuse=abuse)
        finally:
            await created.remove(abuser)
    return IsolationReport(alone, abused, {k: dict(t.statuses) for k, t in abuse.tallies.items()},
                           abuse.graphs_before_refusal, abuse.runs_before_refusal)


def tenant_session(url: str, key: str | None, timeout: aiohttp.ClientTimeout
                   ) -> aiohttp.ClientSession:
    """A client session of the tenant whose key is `key` (None: no key), without a limit on
    its connections."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return aiohttp.ClientSession(url, headers=headers, timeout=timeout,
                                 connector=aiohttp.TCPConnector(limit=0))


async def _phase(victim: aiohttp.ClientSession, config: IsolationConfig,
                 abuse: _Abuse | None) -> PhaseReport:
    until = time.monotonic() + config.seconds
    tally, health = _Tally(), _Tally()
    tasks = [asyncio.create_task(_victim_agent(victim, config, i, until, tally))
             for i in range(config.victim_agents)]
    tasks.append(asyncio.create_task(_poll_health(victim, until, health)))
    abuse_task = asyncio.create_task(abuse.run(until)) if abuse is not None else None
    await asyncio.gather(*tasks)
    if abuse_task is not None:  # the abuser's calls in flight are dropped (disconnects)
        abuse_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abuse_task
    latencies = sorted(tally.latencies)
    health_ms = [s * 1000 for s in health.latencies]
    return PhaseReport(
        served=len(latencies), p50_ms=_percentile(latencies, 0.5) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000, statuses=dict(tally.statuses),
        health_polls=len(health_ms), health_max_ms=max(health_ms, default=0.0),
        health_over_100ms=sum(ms > 100 for ms in health_ms),
        health_failed=sum(n for s, n in health.statuses.items() if s != "200"))


async def _victim_agent(session: aiohttp.ClientSession, config: IsolationConfig, index: int,
                        until: float, tally: _Tally) -> None:
    messages = [{"role": "system", "content": f"You are agent {index}. " * 8}]
    turn = 0
    while time.monotonic() < until:
        turn += 1
        messages.append({"role": "user", "content": f"Step {turn}: what next?"})
        body = {"messages": messages[-7:], "max_tokens": config.max_tokens, "temperature": 0}
        started = time.monotonic()
        status, reply = await _post(session, "/v1/chat/completions", json.dumps(body).encode())
        tally.statuses[status] += 1
        if status == "200":
            tally.latencies.append(time.monotonic() - started)
            messages.append(reply["choices"][0]["message"])
        else:
            messages.pop()
            await asyncio.sleep(_RETRY_AFTER_REFUSAL_S)


async def _poll_health(session: aiohttp.ClientSession, until: float, tally: _Tally) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            async with session.get("/health") as resp:
                await resp.read()
                tally.statuses[str(resp.status)] += 1
        except aiohttp.ClientError:
            tally.statuses["connection"] += 1
        tally.latencies.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, _HEALTH_EVERY_S - (time.monotonic() - started)))


async def _post(session: aiohttp.ClientSession, path: str, body: bytes) -> tuple[str, dict]:
    """(status, the JSON reply) of one POST; status "connection" when it could not be sent."""
    try:
        async with session.post(path, data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            data = await resp.read()
            reply = json.loads(data) if 200 <= resp.status < 300 and data else {}
            return str(resp.status), reply
    except aiohttp.ClientError:
        return "connection", {}


@dataclass(slots=True)
class _Created:
    """The abuser's graphs and runs, removed at the end (the daemon is left as found)."""

    graphs: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    async def remove(self, session: aiohttp.ClientSession) -> None:
        for path in [f"/v1/runs/{r}" for r in self.runs] + [f"/v1/graphs/{g}"
                                                            for g in self.graphs]:
            try:
                async with session.delete(path) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass


class _Abuse:
    def __init__(self, session: aiohttp.ClientSession, config: IsolationConfig,
                 created: _Created) -> None:
        self.session, self.config, self.created = session, config, created
        self.tallies = {kind: _Tally() for kind in ("burst", "giant_prompt", "giant_round",
                                                     "quota")}
        self.graphs_before_refusal: int | None = None
        self.runs_before_refusal: int | None = None

    async def run(self, until: float) -> None:
        round_run = await self._round_run() if self.config.round_agents else None
        tasks = [self._burst(until) for _ in range(self.config.burst)]
        if self.config.giant_body_bytes:
            tasks.append(self._giant_prompts(until))
        if round_run is not None:
            tasks.append(self._giant_rounds(round_run, until))
        if self.config.quota_probes:
            tasks.append(self._quotas())
        await asyncio.gather(*tasks)

    async def _burst(self, until: float) -> None:
        body = json.dumps({"messages": [{"role": "user", "content": "Burst."}],
                           "max_tokens": self.config.max_tokens}).encode()
        await self._repeat("burst", "/v1/chat/completions", body, until)

    async def _giant_prompts(self, until: float) -> None:
        # The JSON envelope's bytes leave room for the text inside the body's size.
        text = "word " * ((self.config.giant_body_bytes - 200) // 5)
        body = json.dumps({"messages": [{"role": "user", "content": text}],
                           "max_tokens": 1}).encode()
        await self._repeat("giant_prompt", "/v1/chat/completions", body, until)

    async def _giant_rounds(self, run: str, until: float) -> None:
        body = json.dumps({
            "agents": {f"a{i}": {"messages": [{"role": "user", "content": f"Agent {i}."}]}
                       for i in range(self.config.round_agents)},
            "shared": [{"role": "user", "content": "The round's shared news."}],
            "max_tokens": 1}).encode()
        await self._repeat("giant_round", f"/v1/runs/{run}/rounds", body, until)

    async def _repeat(self, kind: str, path: str, body: bytes, until: float) -> None:
        while time.monotonic() < until:
            status, _ = await _post(self.session, path, body)
            self.tallies[kind].statuses[status] += 1
            if status != "200":
                await asyncio.sleep(_RETRY_AFTER_REFUSAL_S)

    async def _round_run(self) -> str | None:
        graph = {"name": "abuser-round",
                 "agents": [{"name": f"a{i}"} for i in range(self.config.round_agents)]}
        graph_id = await self._create("/v1/graphs", graph, self.created.graphs)
        if graph_id is None:
            return None
        return await self._create("/v1/runs", {"graph_id": graph_id}, self.created.runs)

    async def _quotas(self) -> None:
        """Graphs, then runs of one of them, created until the daemon refuses one."""
        graph = {"name": "abuser", "agents": [{"name": "a"}]}
        for count in range(_MAX_QUOTA_PROBES):
            graph_id = await self._create("/v1/graphs", graph, self.created.graphs)
            if graph_id is None:
                self.graphs_before_refusal = count
                break
        if not self.created.graphs:
            return
        for count in range(_MAX_QUOTA_PROBES):
            run = {"graph_id": self.created.graphs[-1]}
            if await self._create("/v1/runs", run, self.created.runs) is None:
                self.runs_before_refusal = count
                break

    async def _create(self, path: str, body: dict, into: list[str]) -> str | None:
        status, reply = await _post(self.session, path, json.dumps(body).encode())
        self.tallies["quota"].statuses[f"{path} {status}"] += 1
        if status not in ("200", "201"):
            return None
        into.append(reply["id"])
        return reply["id"]


def format_report(report: IsolationReport) -> str:
    lines = ["phase   served  p50 ms  p99 ms  victim statuses         /health max ms  >100 ms"]
    for name, phase in (("alone", report.alone), ("abused", report.abused)):
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(phase.statuses.items()))
        lines.append(f"{name:<7} {phase.served:>6} {phase.p50_ms:>7.0f} {phase.p99_ms:>7.0f}  "
                     f"{statuses:<23} {phase.health_max_ms:>14.0f} {phase.health_over_100ms:>8}")
    lines.append(f"victim latency abused/alone: p50 x{report.p50_ratio:.2f}, "
                 f"p99 x{report.p99_ratio:.2f}")
    for kind, statuses in report.abuser.items():
        lines.append(f"abuser {kind}: " + (", ".join(f"{s}: {n}" for s, n in
                                                     sorted(statuses.items())) or "none"))
    lines.append(f"abuser graphs before a refusal: {report.graphs_before_refusal}, "
                 f"runs: {report.runs_before_refusal}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrt.runtime.bench.tenant_isolation",
                                description="One tenant's latency with and without another "
                                            "tenant's abuse, on a live kvrt daemon.")
    p.add_argument("--url", default="http://127.0.0.1:8400")
    p.add_argument("--victim-key", default=None)
    p.add_argument("--abuser-key", default=None)
    p.add_argument("--seconds", type=float, default=20.0, help="each phase")
    p.add_argument("--victim-agents", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--burst", type=int, default=256)
    p.add_argument("--giant-body-bytes", type=parse_size, default=8 * 1024**2)
    p.add_argument("--round-agents", type=int, default=2000)
    p.add_argument("--no-quota-probes", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    try:
        config = IsolationConfig(args.url.rstrip("/"), args.victim_key, args.abuser_key,
                                 args.seconds, args.victim_agents, args.max_tokens, args.burst,
                                 args.giant_body_bytes, args.round_agents,
                                 not args.no_quota_probes)
    except ConfigError as exc:
        p.error(str(exc))
    report = asyncio.run(run_isolation(config))
    if args.json:
        print(json.dumps({**asdict(report), "p50_ratio": report.p50_ratio,
                          "p99_ratio": report.p99_ratio}, indent=2))
    else:
        print(format_report(report))
    failed = report.abused.statuses.keys() - {"200", "429"} or report.alone.statuses.keys() - {
        "200"}
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
