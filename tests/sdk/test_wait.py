"""`AgentClient.wait` (and its sync twin): a wait that is not a tool call, reported around a
block as agent.waiting / agent.resumed, against a live tiny daemon."""

from __future__ import annotations

import asyncio

import pytest

from kvrt.sdk import Client, Graph
from kvrt.sdk import sync as sdk_sync
from tests.server.live_server import LiveServer


def test_a_wait_is_reported_around_its_block_also_when_it_raises(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url) as client:
            run = await client.start_run(await client.create_graph(Graph("w").agent("a")))
            agent = run.agent("a")
            async with agent.wait("approval", expected_s=5.0) as ack:
                assert ack.state == "waiting"
                [state] = (await run.state()).agents
                assert (state.state, state.waiting) == ("waiting", "approval")
            with pytest.raises(KeyError):
                async with agent.wait():
                    raise KeyError("no answer")
            after = await run.state()
            assert after.agents[0].state == "idle" and after.event_count == 4
            assert [(t.tool, t.observations) for t in after.tools] == [
                ("wait:approval", 1), ("wait:interrupt", 1)]
            await run.close()

    asyncio.run(go())


def test_the_sync_twin_waits_the_same_way(server: LiveServer) -> None:
    with sdk_sync.Client(server.url) as client:
        with client.start_run(client.create_graph(Graph("ws").agent("a"))) as run:
            with run.agent("a").wait() as ack:
                assert ack.state == "waiting"
            assert run.state().agents[0].state == "idle"
            assert run.agent("a").event("agent.waiting", reason="x").state == "waiting"
            assert run.agent("a").event("agent.resumed").state == "idle"
