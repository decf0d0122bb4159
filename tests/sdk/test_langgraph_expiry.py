"""A LangGraph thread whose run the daemon ended by itself (idle past `--run-idle-timeout`)
goes on in a new run of its key: its model calls, tool calls and lifecycle events are refused
for the old run (409 run_expired) once, then placed in the new one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.config import ControlConfig
from kvrt.sdk import Client
from kvrt.sdk.langgraph import close_all, register
from tests.sdk.conftest import SDK_ENGINE
from tests.sdk.test_langgraph import Did, assert_attributed, make_model, research, run_of, thread
from tests.server.live_server import LiveServer, live_server, wait_released

IDLE_S = 1.5


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, SDK_ENGINE,
                           control=ControlConfig(run_idle_timeout_s=IDLE_S))


async def expired(client: Client, run_id: str) -> None:
    deadline = time.monotonic() + IDLE_S + 10
    while (await (await client.get_run(run_id)).state()).status != "expired":
        assert time.monotonic() < deadline, "the idle run never expired"
        await asyncio.sleep(0.2)


def test_a_thread_whose_run_expired_goes_on_in_a_new_run(server: LiveServer) -> None:
    first, second = Did(), Did()
    model = make_model(server)

    async def go() -> None:
        async with Client(server.url) as client:
            before = await register(research(model, first).compile(), client, name="expiring")
            after = await register(research(model, second).compile(), client, name="expiring")
            graph_id = before.config["metadata"]["kvrt_graph_id"]
            await before.ainvoke({"round": 0, "notes": []}, thread("t-idle"))
            old = await run_of(client, graph_id, "t-idle")
            await expired(client, old.id)
            # The same thread, through the other compiled graph (its own binding): it too
            # knew nothing of the expiry, and every kind of call must find the new run.
            await after.ainvoke({"round": 0, "notes": []}, thread("t-idle"))
            runs = [r for r in await client.list_runs(graph_id, key="t-idle")
                    if r.status == "live"]
            assert [r.id for r in runs] != [old.id] and len(runs) == 1
            new = await (await client.get_run(runs[0].id)).state()
            assert_attributed(new, second)  # every call and event of the second invocation
            # The first binding still remembers the expired run: its next invocation moves too.
            await before.ainvoke({"round": 0, "notes": []}, thread("t-idle"))
            assert {r.id for r in await client.list_runs(graph_id, key="t-idle")
                    if r.status == "live"} == {new.id}
            await close_all(before)
            await close_all(after)

    asyncio.run(go())
    wait_released(server)

