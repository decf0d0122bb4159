"""The virtual-time loop: timers fire at their simulated time without waiting for it, sockets and
worker threads are never skipped over, and aiohttp runs on it unchanged."""

from __future__ import annotations

import asyncio
import time

from aiohttp import ClientSession, web

from kvrt.runtime.sim.virtual_loop import VirtualTimeLoop


def run(coro_fn):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro_fn())


def test_an_hour_of_timers_passes_at_once_in_order() -> None:
    async def main():
        loop, fired = asyncio.get_running_loop(), []

        async def sleeper(seconds: float) -> None:
            await asyncio.sleep(seconds)
            fired.append((seconds, loop.time()))

        start = loop.time()
        await asyncio.gather(*(sleeper(s) for s in (3600.0, 0.25, 90.0, 0.25)))
        return start, fired

    real = time.perf_counter()
    start, fired = run(main)
    assert time.perf_counter() - real < 2.0
    assert fired == [(0.25, start + 0.25), (0.25, start + 0.25), (90.0, start + 90.0),
                     (3600.0, start + 3600.0)]


def test_the_clock_stands_still_while_a_worker_thread_runs() -> None:
    async def main():
        loop = asyncio.get_running_loop()
        timer = asyncio.ensure_future(asyncio.sleep(1.0, "timer"))
        start = loop.time()
        # 0.2 real seconds in a thread, while a 1-second timer is pending: the loop must wait
        # for the thread, not jump to the timer.
        value = await loop.run_in_executor(None, lambda: time.sleep(0.2) or "thread")
        at_thread = loop.time() - start
        assert not timer.done()
        await timer
        return value, at_thread, loop.time() - start

    assert run(main) == ("thread", 0.0, 1.0)


def test_aiohttp_serves_over_loopback_on_simulated_time() -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query["work"]))
        return web.json_response({"done": asyncio.get_running_loop().time()})

    async def main():
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def call(session: ClientSession, delay: float, work: float) -> float:
            await asyncio.sleep(delay)
            async with session.get(f"http://127.0.0.1:{port}/", params={"work": work}) as r:
                return (await r.json())["done"] - start

        try:
            async with ClientSession() as session:
                return await asyncio.gather(*(call(session, d, w) for d, w in
                                              [(0, 5.0), (1, 0.5), (2, 30.0), (2, 0.0)]))
        finally:
            await runner.cleanup()

    assert run(main) == [5.0, 1.5, 32.0, 2.0]
