"""The attack suite (runtime/bench/attacks.py), its quick attacks, against a live tiny daemon
with two tenants and small quotas: each attack is answered as a client should see it (no 5xx,
errors in OpenAI's shape, quotas named), the victim's calls meanwhile are served, and the
daemon is left without the attacker's graphs and runs and without KV in use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.bench.attacks import format_table, run_attacks
from kvrt.runtime.config import ControlConfig, ServerLimits
from tests.server.live_server import LiveServer, live_server, wait_released

ATTACKER, VICTIM = "attacker-key-01", "victim-key-0001"
QUICK = ["top_p_extreme", "giant_prompt", "round_run_ended", "deep_json", "non_utf8_auth",
         "oversized_header", "bad_request_line", "metrics_peek", "run_hoarding",
         "graph_hoarding", "queue_flood"]


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(
        tiny_model, api_keys=((ATTACKER, "attacker"), (VICTIM, "victim")),
        limits=ServerLimits(max_queued_requests=8),
        control=ControlConfig(max_graphs_per_tenant=5, max_runs_per_tenant=3))


def test_the_quick_attacks_are_answered_and_leave_nothing_behind(server: LiveServer) -> None:
    results = asyncio.run(run_attacks(server.url, ATTACKER, VICTIM, QUICK,
                                      giant_prompt_bytes=1024**2, flood=60))
    print(format_table(results))
    rows = {r.attack: r for r in results}
    assert list(rows) == QUICK
    assert (rows["top_p_extreme"].answer, rows["top_p_extreme"].victim[:3]) == ("200", "200")
    assert rows["giant_prompt"].answer == "400 context_length_exceeded"
    assert rows["round_run_ended"].answer == "409 run_ended"
    assert rows["deep_json"].answer == "400 invalid_json"
    assert rows["non_utf8_auth"].answer.startswith("401") and "(JSON)" in rows[
        "non_utf8_auth"].answer
    for raw in ("oversized_header", "bad_request_line"):
        assert " 400 " in f" {rows[raw].answer} " and "(JSON)" in rows[raw].answer
    assert rows["metrics_peek"].answer == "403"
    # one run of round_run_ended is ended; run_hoarding's graph holds the rest of the quota
    assert rows["run_hoarding"].answer == "429 quota_exceeded"
    assert rows["run_hoarding"].victim == "run: 201"  # the victim's quota is its own
    assert rows["graph_hoarding"].answer == "429 quota_exceeded"
    flood = rows["queue_flood"]
    assert "tenant_queue_full" in flood.answer and flood.victim.startswith("200")
    assert all(not r.answer.startswith("5") for r in results)
    attacker = {"Authorization": f"Bearer {ATTACKER}"}
    assert server.request("GET", "/v1/graphs", headers=attacker).json()["data"] == []
    assert server.request("GET", "/v1/runs", headers=attacker).json()["data"] == []
    wait_released(server)
