"""Two engine replicas of the tiny model as real Ray actors (a local Ray instance, 2 CPUs)
behind the real daemon: where each call lands is read from the replicas' own counters (each
actor counts the calls it took per run), never from the router that placed them.

The last test kills a replica mid-call: it runs last in the module on purpose (the module's
replicas are shared), and it ends with every replica back and its KV accounting at zero."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest

from kvrt.runtime.config import ConfigError, EngineConfig, ServeConfig
from kvrt.runtime.model.facts import read_model_facts
from kvrt.runtime.replicas.ray_cluster import Placement, plan_placement
from kvrt.runtime.replicas.ray_replica import RayReplica
from kvrt.runtime.replicas.replica_set import ReplicaSet
from kvrt.runtime.replicas.router import make_router
from kvrt.sdk import Client, Graph
from tests.server.live_server import (
    SMALL_ENGINE,
    LiveServer,
    assert_error_shape,
    sse_events,
    start_run,
)

ray = pytest.importorskip("ray")

READY_TIMEOUT_S = 90.0  # two actors loading torch on a busy 2-core machine
SYSTEM_A = "You are a planner. " * 12  # a few KV blocks of shared prefix
SYSTEM_B = "You are a careful reviewer of code. " * 10


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir) -> Iterator[LiveServer]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    model = str(tiny_checkpoint_dir())
    engine = replace(SMALL_ENGINE, model=model)
    facts = read_model_facts(model)
    facts_kw: dict[str, Any] = dict(model_name="tiny", max_model_len=256,
                                    tokenizer=facts.tokenizer, vocab_size=facts.config.vocab_size)
    replicas = [RayReplica(str(i), engine, resources={"num_cpus": 1}, threads=1, **facts_kw)
                for i in range(2)]
    config = ServeConfig(host="127.0.0.1", port=0, served_model_name="tiny", engine=engine)
    router = make_router("affinity", 2, step_tokens=engine.max_num_batched_tokens)
    live = LiveServer(ReplicaSet(replicas, router, **facts_kw),  # type: ignore[arg-type]
                      config).start()
    try:
        wait_for(lambda: all(r.state() == "ready" for r in replicas), READY_TIMEOUT_S)
        yield live
    finally:
        live.stop()
        ray.shutdown()


def members(server: LiveServer) -> list[RayReplica]:
    return server.engine.members  # type: ignore[attr-defined]


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def served(server: LiveServer) -> list[dict[str, int]]:
    """Per replica, the calls it took per run ("": without a run), asked of the actors now."""

    async def ask() -> list[dict[str, int]]:
        snapshots = await asyncio.gather(*(r.refresh() for r in members(server)))
        return [dict(s.served) if s is not None else {} for s in snapshots]

    return server.call(ask)


def assert_kv_released(server: LiveServer) -> None:
    """Every replica idle, its request KV released, its pool consistent."""

    async def check() -> list[tuple[str | None, int]]:
        results = []
        for replica in members(server):
            why = await replica.check_integrity()
            snapshot = await replica.refresh()
            assert snapshot is not None
            results.append((why, snapshot.stats.kv_blocks_in_use - snapshot.stats.kv_blocks_pinned))
        return results

    assert server.call(check) == [(None, 0), (None, 0)]


def openai_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, content: str, system: str | None = None,
         kvrt: dict[str, str] | None = None, max_tokens: int = 4) -> Any:
    messages = [{"role": "system", "content": system}] if system else []
    return client.chat.completions.create(
        model="tiny", messages=[*messages, {"role": "user", "content": content}],
        max_tokens=max_tokens, temperature=0, extra_body={"kvrt": kvrt} if kvrt else None)


def delta(before: list[dict[str, int]], after: list[dict[str, int]], run: str) -> list[int]:
    return [a.get(run, 0) - b.get(run, 0) for b, a in zip(before, after, strict=True)]


def test_every_call_of_a_run_lands_on_its_replica(server: LiveServer) -> None:
    client = openai_client(server)
    runs = [start_run(server, "planner", "coder") for _ in range(2)]
    for run in runs:
        for agent in ("planner", "coder", "planner", "coder"):
            reply = chat(client, f"step for {agent}", kvrt={"run": run, "agent": agent})
            assert reply.choices[0].finish_reason in ("stop", "length")
    counts = served(server)
    homes = []
    for run in runs:
        per_replica = [c.get(run, 0) for c in counts]
        assert sorted(per_replica) == [0, 4], per_replica
        homes.append(per_replica.index(4))
        assert server.engine.replica_of(run) == [str(homes[-1])]
    assert sorted(homes) == [0, 1]  # two runs of two agents: one on each replica
    assert_kv_released(server)


def test_a_round_runs_on_one_replica(server: LiveServer) -> None:
    graph = Graph("round")
    for name in ("alice", "bob", "carol"):
        graph.agent(name, system=f"You are {name}.")
    before = served(server)

    async def go() -> str:
        async with Client(server.url) as client, \
                await client.start_run(await client.create_graph(graph)) as run:
            result = await run.round([{"role": "user", "content": "The bridge is closed."}],
                                     {"alice": [], "bob": [], "carol": []},
                                     instruction=[{"role": "user", "content": "Next?"}],
                                     max_tokens=4, temperature=0, ignore_eos=True)
            assert set(result.agents) == {"alice", "bob", "carol"}
            await run.agent("bob").chat([{"role": "user", "content": "And then?"}],
                                        max_tokens=4, temperature=0)
            moved = delta(before, served(server), run.id)
            assert sorted(moved) == [0, 4], moved  # 3 round calls + bob's, all on one
            return run.id

    asyncio.run(go())
    assert_kv_released(server)


def test_calls_without_a_run_follow_their_prefix(server: LiveServer) -> None:
    client = openai_client(server)
    for system in (SYSTEM_A, SYSTEM_B):
        before = served(server)
        for turn in range(4):
            chat(client, f"question {turn}", system=system)
        moved = delta(before, served(server), "")
        assert sorted(moved) == [0, 4], moved
    assert_kv_released(server)


def test_a_grammar_crosses_to_the_replica(server: LiveServer) -> None:
    """llguidance's matchers do not pickle: the replica compiles the front's grammar again."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = openai_client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=32, seed=1,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "ok", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)
    assert_kv_released(server)


def test_a_client_gone_mid_stream_stops_the_call_on_its_replica(server: LiveServer) -> None:
    """Closing the stream cancels the actor's generator: the replica aborts the call (it
    generates far fewer than max_tokens) and frees its KV."""

    def generated() -> int:
        return sum(r.stats().generation_tokens for r in members(server))

    served(server)  # fresh snapshots
    before = generated()

    async def read_a_little_then_leave() -> None:
        async with aiohttp.ClientSession() as session, session.post(
                server.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "go on"}], "max_tokens": 240,
                      "ignore_eos": True, "stream": True}) as resp:
            assert resp.status == 200
            events = sse_events(resp)
            await anext(events)
            await anext(events)

    asyncio.run(read_a_little_then_leave())
    assert_kv_released(server)  # waits until the replica has no work: aborted, or done
    assert 1 <= generated() - before < 120, generated() - before


def test_ending_a_run_mid_call_ends_the_call_with_run_ended(server: LiveServer) -> None:
    """RunEnded crosses from the actor as itself (not as a bare engine error): 409 run_ended
    in the stream, and the replica freed the call's KV."""
    run = start_run(server, "solo")

    async def go() -> list[Any]:
        async with aiohttp.ClientSession() as session, session.post(
                server.url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "go on"}], "max_tokens": 240,
                      "ignore_eos": True, "stream": True,
                      "kvrt": {"run": run, "agent": "solo"}}) as resp:
            assert resp.status == 200
            events = sse_events(resp)
            await anext(events)
            async with session.delete(f"{server.url}/v1/runs/{run}") as deleted:
                assert deleted.status == 200
            return [event async for event in events]

    rest = asyncio.run(go())
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "run_ended", rest[-2:]
    assert_kv_released(server)


def test_placement_plans() -> None:
    config = ServeConfig(replicas=3)
    assert plan_placement(config, {"CPU": 2.0}, local=True).resources == {"num_cpus": 1}
    assert plan_placement(config, {"CPU": 8.0, "GPU": 4.0}, local=True).resources == {
        "num_gpus": 1}
    with pytest.raises(ConfigError, match="3 replicas need 3 GPUs; the Ray cluster has 2"):
        plan_placement(config, {"GPU": 2.0}, local=True)
    cluster = ServeConfig(ray_address="auto")
    assert plan_placement(cluster, {"GPU": 8.0}, local=False).replicas == 8
    with pytest.raises(ConfigError, match="no GPU"):
        plan_placement(replace(cluster, engine=EngineConfig(device="cuda")), {"CPU": 64.0},
                       local=False)
    assert plan_placement(cluster, {"CPU": 64.0}, local=False) == Placement(
        1, {"num_cpus": 1}, None)  # no GPU: one CPU replica, torch threads as Ray sets them
    cpu = ServeConfig(ray_address="auto", engine=EngineConfig(device="cpu"))
    assert plan_placement(cpu, {"CPU": 64.0, "GPU": 8.0}, local=False).resources == {
        "num_cpus": 1}


def test_a_replica_killed_mid_call(server: LiveServer) -> None:
    """Runs last: the call in flight gets 503 with Retry-After; the run's later calls go to the
    other replica; Ray restarts the dead one; the daemon lost no graph or run."""
    client = openai_client(server)
    run = start_run(server, "writer", "editor")
    chat(client, "draft", kvrt={"run": run, "agent": "writer"})
    home = next(i for i, c in enumerate(served(server)) if c.get(run))
    victim = members(server)[home]
    pid = victim.pid()
    assert pid is not None
    replies: list[Any] = []
    long_call = threading.Thread(target=lambda: replies.append(server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a long draft"}], "max_tokens": 200,
         "ignore_eos": True, "kvrt": {"run": run, "agent": "writer"}})))
    long_call.start()

    async def in_flight() -> int:
        return victim.load().in_flight

    wait_for(lambda: server.call(in_flight) == 1, 10)
    os.kill(pid, signal.SIGKILL)
    long_call.join(30)
    error = assert_error_shape(replies[0], 503)
    assert int(replies[0].headers["Retry-After"]) >= 1, replies[0].headers
    assert "replica" in error["message"]

    other = members(server)[1 - home]
    before = served(server)[1 - home].get(run, 0)
    for agent in ("writer", "editor"):  # the run goes on, on the live replica
        chat(client, "again", kvrt={"run": run, "agent": agent})
    assert served(server)[1 - home].get(run, 0) - before == 2
    assert other.state() == "ready"

    wait_for(lambda: victim.state() == "ready", READY_TIMEOUT_S)
    assert victim.restarts == 1 and victim.pid() != pid
    statuses = {s.name: s for s in server.engine.replicas()}
    assert statuses[str(home)].restarts == 1
    assert all(s.state == "ready" for s in statuses.values())
    state = server.request("GET", f"/v1/runs/{run}")
    assert state.status == 200 and state.json()["status"] == "live", state.body
    graph_id = state.json()["graph_id"]
    assert server.request("GET", f"/v1/graphs/{graph_id}").status == 200
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    assert_kv_released(server)
