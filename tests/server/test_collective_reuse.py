"""Collective reuse on a live daemon (tiny model, `--policy kvrt`): an All-Gather round computes
its shared text once; the other agents read that copy at their own positions and say so in
their usage, the run state (per agent, and the run's compression) and /metrics. A plain `lru`
daemon computes it once per agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server, start_run

WORDS = ("the bridge on mill road is closed so we should run a ferry across the river until "
         "the county repairs it next week and the parish hall can store flour for the bakery ")
SHARED = [{"role": "user", "content": f"Mara said: {WORDS}"},
          {"role": "user", "content": f"Tomas said: {WORDS[::-1]}"}]
OWN = {"alice": [{"role": "system", "content": "You are Alice, a careful engineer."}],
       "bob": [{"role": "system", "content": "You are Bob, who likes boats and has a long "
                "memory of storms at sea."}],
       "carol": [{"role": "system", "content": "You are Carol."}]}


def serve(tiny_model: Path, policy: str) -> Iterator[LiveServer]:
    config = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=512, max_num_seqs=8,
                          policy=policy)
    yield from live_server(tiny_model, config)


@pytest.fixture(scope="module")
def kvrt_server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from serve(tiny_model, "kvrt")


@pytest.fixture(scope="module")
def lru_server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from serve(tiny_model, "lru")


def play_round(server: LiveServer) -> tuple[str, dict[str, Any]]:
    run = start_run(server, *OWN)
    reply = server.post(f"/v1/runs/{run}/rounds", {
        "shared": SHARED, "agents": {n: {"messages": m} for n, m in OWN.items()},
        "instruction": [{"role": "user", "content": "Say what you do next."}],
        "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert reply.status == 200, reply.body
    return run, reply.json()


def metric(server: LiveServer, name: str) -> float:
    text = server.request("GET", "/metrics").body.decode()
    return float(next(line for line in text.splitlines() if line.startswith(name + "{"))
                 .rsplit(" ", 1)[1])


def test_a_round_computes_its_shared_text_once(kvrt_server) -> None:
    run, result = play_round(kvrt_server)
    cached = {n: a["usage"]["prompt_tokens_details"]["cached_tokens"]
              for n, a in result["agents"].items()}
    assert sorted(c > 0 for c in cached.values()) == [False, True, True]  # one master
    state = kvrt_server.request("GET", f"/v1/runs/{run}").json()
    kv = {a["name"]: a["kv"] for a in state["agents"]}
    assert all(kv[n]["segment_tokens"] == kv["alice"]["segment_tokens"] > 0 for n in OWN)
    # Read in place: what admission found (cached), and the recomputed rows the diff encode
    # let go afterwards.
    shared = {n: kv[n]["segment_reused_tokens"] for n in OWN}
    assert all(shared[n] > cached[n] if cached[n] else shared[n] == 0 for n in OWN)
    dropped = metric(kvrt_server, "kvrt:segment_dropped_tokens_total")
    assert sum(shared.values()) == sum(cached.values()) + dropped
    stored = 3 * kv["alice"]["segment_tokens"] - sum(shared.values())
    ratio = 3 * kv["alice"]["segment_tokens"] / stored  # sent to 3 significant digits
    assert state["segment_kv_compression"] == pytest.approx(ratio, rel=5e-3)
    assert state["segment_kv_compression"] > 1.5
    assert metric(kvrt_server, "kvrt:segment_reused_tokens_total") == sum(cached.values())
    assert kvrt_server.request("DELETE", f"/v1/runs/{run}").status == 200
    assert kvrt_server.stats().kv_blocks_in_use == 0
    kvrt_server.engine.engine.check_integrity()


def test_lru_computes_it_for_every_agent(lru_server) -> None:
    run, result = play_round(lru_server)
    assert all(a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
               for a in result["agents"].values())
    state = lru_server.request("GET", f"/v1/runs/{run}").json()
    assert state["segment_kv_compression"] == 1.0
    assert metric(lru_server, "kvrt:segment_kv_compression") == 1.0
