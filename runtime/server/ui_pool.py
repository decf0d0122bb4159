"""The KV pool over time, for the live view: the engine's block counts sampled once a second
into a bounded ring (five minutes), by a task that lives as long as the app.

    sample      taken on the event loop from `engine.stats()` (what /metrics reads too)
    in_use      device blocks requests hold or the policy pins (pinned: of those, the pins)
    cached      device blocks no one holds, still indexed (evictable)
    host        host-tier blocks holding KV (0 without a host tier)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web
from msgspec import Struct

from kvrt.runtime.engine.protocol import EngineStats
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.background import in_background

SAMPLE_EVERY_S = 1.0
KEPT = 300  # samples: five minutes


class PoolSample(Struct, array_like=True):
    """One sample; on the wire an array [t, in_use, pinned, cached, host] (the page draws
    hundreds of them each second)."""

    t: float  # the loop's clock, seconds
    in_use: int
    pinned: int
    cached: int
    host: int


class PoolHistory:
    def __init__(self, kept: int = KEPT) -> None:
        self.samples: deque[PoolSample] = deque(maxlen=kept)
        self.total_blocks = 0
        self.host_blocks = 0

    def add(self, stats: EngineStats, now: float) -> None:
        self.total_blocks, self.host_blocks = stats.kv_blocks_total, stats.kv_host_blocks_total
        self.samples.append(PoolSample(now, stats.kv_blocks_in_use, stats.kv_blocks_pinned,
                                       stats.kv_blocks_cached, stats.kv_host_blocks_held))


POOL_HISTORY = web.AppKey("pool_history", PoolHistory)


async def pool_sampling(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: samples the pool every SAMPLE_EVERY_S while the app runs (after the
    engine's start in the list: it reads the engine)."""
    history, engine = app[POOL_HISTORY], app[app_keys.ENGINE]

    async def sample_forever() -> None:
        loop = asyncio.get_running_loop()
        while True:
            if engine.is_alive():
                history.add(engine.stats(), loop.time())
            await asyncio.sleep(SAMPLE_EVERY_S)

    async with in_background(sample_forever(), "kvrt-pool-sampling"):
        yield
