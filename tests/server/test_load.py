"""The load test (runtime/bench/load_test.py), short, against a live tiny daemon whose queue
holds 4 requests: agents of one run chat and stream, some are cancelled mid-request, then
waves of 48 calls at once overfill the queue. No call gets a 5xx or goes unanswered, the
overload draws 429s with Retry-After, and once it is over no KV is in use and the pool's
integrity holds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.bench.load_test import LoadConfig, format_report, run_load
from kvrt.runtime.config import ServerLimits
from tests.server.live_server import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, limits=ServerLimits(max_queued_requests=4))


def test_a_short_load_test_serves_sheds_the_overload_and_frees_every_block(
        server: LiveServer) -> None:
    config = LoadConfig(server.url, seconds=8, agents=6, stream_fraction=0.3,
                        cancel_fraction=0.2, burst=48, max_tokens=4, seed=1)
    report = asyncio.run(run_load(config))
    print(format_report(report))
    assert report.served > 20 and report.p50_ms > 0
    assert report.cancelled > 0  # some clients went away mid-request
    assert report.overload_rate_limited > 0, "the overload never drew a 429"
    assert report.retry_after_missing == 0
    assert report.errors == {}, f"errors other than 429: {report.errors}"
    assert report.requests == report.served + report.rate_limited + report.cancelled
    assert report.drained and report.kv_in_use_after == 0
    stats = server.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_in_use) == (0, 0, 0)
    assert stats.generation_tokens >= report.served

    async def check() -> None:
        server.engine.engine.check_integrity()

    server.call(check)
