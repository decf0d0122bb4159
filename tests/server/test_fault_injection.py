"""Faults injected into a live daemon under `tokencake` with a host tier, while agents of two
runs keep calling: tier copies (the mover's pack and unpack: write-through backups, offloads
at tool calls, uploads) fail at random, some after writing part of the target, and engine
steps raise at random (the executor's `run`). Meanwhile each agent chats (some streamed) and
reports tool calls.

While the faults last, a call may fail with a 500 `engine_error` (its step failed) and nothing
else: no other status, no hang, and every tool-call event is applied. Once they stop, every
agent's next call succeeds, both graphs and runs are still there with every call counted, tier
copies land again, and after the runs end no KV block is in use or pinned and the pools'
integrity holds."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.server.live_server import LiveServer, live_server, sse_events, tokencake_engine

POOL_BLOCKS = 48
SYSTEM = "You are one of many agents working on one code base. " * 6  # several full blocks
AGENTS = ("coder", "helper", "writer")
FAULT_SECONDS = 5.0


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, tokencake_engine(tiny_model, POOL_BLOCKS))


class InjectedFault(RuntimeError):
    pass


class Faults:
    """Raises in the wrapped functions at `rate` while `on`; counts where it did. Called from
    the engine thread and the mover's worker threads."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate, self.on = rate, False
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _strike(self, where: str) -> bool:
        with self._lock:
            if self.on and self._rng.random() < self.rate:
                self.injected[where] += 1
                return True
            return False

    def before(self, fn: Callable[..., Any], where: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._strike(where):
                raise InjectedFault(f"injected fault in {where}")
            return fn(*args, **kwargs)

        return wrapped

    def after(self, fn: Callable[..., Any], where: str) -> Callable[..., Any]:
        """Runs `fn` (a copy writes its target), then may fail: a half-done move."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if self._strike(where):
                raise InjectedFault(f"injected fault after {where}")
            return result

        return wrapped


async def _chat(session: aiohttp.ClientSession, url: str, run: str, agent: str, turn: int,
                stream: bool, system: str) -> str:
    """One attributed call; "ok", or the error code it failed with."""
    body = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": f"{agent}, step {turn}."}],
            "max_tokens": 4, "temperature": 0, "stream": stream,
            "kvrt": {"run": run, "agent": agent}}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            error = (await resp.json())["error"]
            return f"{resp.status} {error['code']}"
        if not stream:
            reply = await resp.json()
            assert reply["choices"][0]["finish_reason"] in ("stop", "length")
            return "ok"
        events = [event async for event in sse_events(resp)]
        assert events[-1] == "[DONE]", events
        failed = [e["error"]["code"] for e in events[:-1] if "error" in e]
        return f"stream {failed[0]}" if failed else "ok"


async def _event(session: aiohttp.ClientSession, url: str, run: str, event: dict) -> int:
    async with session.post(f"{url}/v1/runs/{run}/events", json=event) as resp:
        await resp.read()
        return resp.status


async def _agent(url: str, run: str, agent: str, until: float, seed: int,
                 system: str) -> tuple[Counter, Counter]:
    """Chats and reports a tool call after each chat until `until`; (call outcomes, event
    statuses)."""
    rng = random.Random(seed)
    calls: Counter[str] = Counter()
    events: Counter[int] = Counter()
    tool = {"coder": "tests", "helper": "search", "writer": "lint"}[agent]
    async with aiohttp.ClientSession() as session:
        turn = 0
        while time.monotonic() < until:
            turn += 1
            calls[await _chat(session, url, run, agent, turn, rng.random() < 0.3, system)] += 1
            for kind in ("tool_call.started", "tool_call.finished"):
                events[await _event(session, url, run, {
                    "type": kind, "agent": agent, "tool": tool, "id": f"{agent}-{turn}-{kind}"})
                ] += 1
                await asyncio.sleep(rng.uniform(0, 0.05))
    return calls, events


def _start_runs(server: LiveServer) -> list[tuple[str, str]]:
    """Two runs, each of its own graph: (graph id, run id)."""
    started = []
    for name in ("faults-a", "faults-b"):
        graph = server.post("/v1/graphs", {"name": name, "agents": [
            {"name": "coder", "tools": {"tests": 30}}, {"name": "helper", "tools": {"search": 20}},
            {"name": "writer", "tools": {"lint": 10}}],
            "edges": [["coder", "writer"], ["helper", "writer"]]})
        assert graph.status == 201, graph.body
        run = server.post("/v1/runs", {"graph_id": graph.json()["id"]})
        assert run.status == 201, run.body
        started.append((graph.json()["id"], run.json()["id"]))
    return started


async def _all_agents(url: str, runs: list[tuple[str, str]], until: float,
                      system: str = SYSTEM) -> list:
    return await asyncio.gather(*(
        _agent(url, run, agent, until, i * 10 + j, system)
        for i, (_, run) in enumerate(runs) for j, agent in enumerate(AGENTS)))


def test_random_copy_and_step_faults_fail_only_their_calls(server: LiveServer,
                                                            monkeypatch) -> None:
    engine = server.engine.engine
    assert engine.kv.host is not None
    mover, executor = engine.kv.host.mover, engine.executor
    faults = Faults(rate=0.15, seed=7)
    monkeypatch.setattr(mover, "_pack", faults.before(mover._pack, "pack"))
    monkeypatch.setattr(mover, "_unpack", faults.after(mover._unpack, "unpack"))
    monkeypatch.setattr(executor, "run", faults.before(executor.run, "step"))
    runs = _start_runs(server)
    moves_failed = engine.kv.host.failed

    faults.on = True
    outcomes = asyncio.run(_all_agents(server.url, runs, time.monotonic() + FAULT_SECONDS))
    faults.on = False
    calls = sum((c for c, _ in outcomes), Counter())
    events = sum((e for _, e in outcomes), Counter())
    print(f"faults injected {dict(faults.injected)}; calls {dict(calls)}; events {dict(events)}")
    stats = server.stats()
    print(f"tier blocks backed up {stats.kv_blocks_backed_up}, offloaded "
          f"{stats.kv_blocks_offloaded}, uploaded {stats.kv_blocks_uploaded}; decisions "
          f"{stats.kv_decisions}")
    assert stats.kv_blocks_backed_up > 0  # copies landed between the faults (write-through)
    assert faults.injected["step"] > 0 and faults.injected["pack"] + faults.injected["unpack"] > 0
    assert engine.kv.host.failed > moves_failed  # failed copies were completed as failures
    assert set(calls) <= {"ok", "500 engine_error", "stream engine_error"}, calls
    assert calls["ok"] > 0 and calls["ok"] < sum(calls.values())
    assert set(events) == {200}, events

    # The faults are over: everything works again, and nothing was lost. New text (a new
    # system prompt) makes new full blocks, which write-through copies to the host.
    backed_up = server.stats().kv_blocks_backed_up
    after = asyncio.run(_all_agents(server.url, runs, time.monotonic() + 1.0,
                                    "Second phase. " + SYSTEM))
    assert all(set(c) == {"ok"} and set(e) == {200} for c, e in after), after
    for graph, run in runs:
        assert server.request("GET", f"/v1/graphs/{graph}").status == 200
        state = server.request("GET", f"/v1/runs/{run}").json()
        assert {a["name"]: a["calls"] > 0 for a in state["agents"]} == dict.fromkeys(AGENTS, True)
    assert server.stats().kv_blocks_backed_up > backed_up  # copies land again

    for _, run in runs:
        assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    server.call(server.engine.wait_idle)
    deadline = time.monotonic() + 10
    while (stats := server.stats()).kv_blocks_in_use or stats.running or stats.waiting:
        assert time.monotonic() < deadline, f"KV still held after the runs ended: {stats}"
        time.sleep(0.05)
    assert stats.kv_blocks_pinned == 0

    async def check() -> None:
        engine.kv.host.wait()
        engine.check_integrity()
        assert engine.kv.usage().in_flight == 0

    server.call(check)
