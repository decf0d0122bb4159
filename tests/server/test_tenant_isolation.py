"""The tenant-isolation benchmark (runtime/bench/tenant_isolation.py), short, against a live tiny
daemon with two tenants whose quotas are small: the victim is served in both phases and never
refused, the abuser's burst is refused with 429s past its share, its giant prompts are 400s
(or 429s past its body rate), its quotas are found, and the daemon is left as found (no KV in
use, no abuser graph)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kvrt.runtime.bench.tenant_isolation import IsolationConfig, format_report, run_isolation
from kvrt.runtime.config import ControlConfig, ServerLimits
from tests.server.live_server import SMALL_ENGINE, LiveServer, live_server

VICTIM, ABUSER = "victim-key-0001", "abuser-key-0001"


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_model, replace(SMALL_ENGINE, max_num_seqs=16),
        api_keys=((VICTIM, "victim"), (ABUSER, "abuser")),
        limits=ServerLimits(max_queued_requests=32, max_body_bytes=2 * 1024**2),
        control=ControlConfig(max_graphs_per_tenant=6, max_runs_per_tenant=4))


def test_the_victim_is_served_while_the_abuser_is_refused(server: LiveServer) -> None:
    config = IsolationConfig(server.url, VICTIM, ABUSER, seconds=4, victim_agents=2,
                             max_tokens=2, burst=48, giant_body_bytes=1024**2, round_agents=40)
    report = asyncio.run(run_isolation(config))
    print(format_report(report))
    assert report.alone.served > 0 and report.abused.served > 0
    assert set(report.alone.statuses) == {"200"}
    assert set(report.abused.statuses) == {"200"}  # never refused: its share is its own
    assert report.abuser["burst"].get("429", 0) > 0
    # too long when decoded (400), or refused unread past its body rate (429)
    assert "400" in report.abuser["giant_prompt"]
    assert set(report.abuser["giant_prompt"]) <= {"400", "429"}
    assert report.graphs_before_refusal == 6 - 1  # one graph is the giant round's
    assert report.runs_before_refusal == 4 - 1  # one run is the giant round's
    assert report.alone.health_polls > 0 and report.abused.health_failed == 0
    stats = server.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_in_use) == (0, 0, 0)
    abuser = {"Authorization": f"Bearer {ABUSER}"}
    listed = server.request("GET", "/v1/graphs", headers=abuser).json()
    assert listed["data"] == []

