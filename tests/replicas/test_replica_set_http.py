"""A daemon serving a ReplicaSet of two in-process engines (tiny model) over HTTP: where a
run's calls and rounds land, prefix affinity for calls without a run, what /health, /metrics
and the run state say of each replica, a replica that goes down, and every replica's KV
accounting back at zero. (Ray actors as replicas: test_ray_replicas.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.replicas.replica_set import ReplicaSet
from kvrt.runtime.replicas.router import make_router
from tests.server.live_server import LiveServer, assert_error_shape, start_run

ENGINE = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=512, max_num_seqs=8)


def serve(model: Path, router: str = "affinity") -> LiveServer:
    config = ServeConfig(host="127.0.0.1", port=0, served_model_name="tiny",
                         engine=replace(ENGINE, model=str(model)))
    members = [AsyncEngine.create(config.engine, "tiny") for _ in range(2)]
    first = members[0]
    engine = ReplicaSet(members, make_router(router, 2, step_tokens=ENGINE.max_num_batched_tokens),
                        model_name="tiny",
                        max_model_len=first.max_model_len, tokenizer=first.tokenizer,
                        vocab_size=first.vocab_size)
    return LiveServer(engine, config).start()  # type: ignore[arg-type]


@pytest.fixture
def server(tiny_checkpoint_dir) -> Iterator[LiveServer]:
    live = serve(tiny_checkpoint_dir())
    try:
        yield live
    finally:
        released(live)
        live.stop()


def released(server: LiveServer) -> None:
    """Every live replica: no request holds KV, and its pool is consistent."""
    async def check() -> None:
        for member in server.engine.members:
            if member.state() == "ready":
                await member.wait_idle()
                stats = member.stats()
                assert stats.kv_blocks_in_use - stats.kv_blocks_pinned == 0, stats
                member.engine.check_integrity()

    server.call(check)


def chat(server: LiveServer, text: str, run: str | None = None, agent: str | None = None,
         status: int = 200):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3,
            "temperature": 0, "ignore_eos": True}
    if run is not None:
        body["kvrt"] = {"run": run, "agent": agent}
    reply = server.post("/v1/chat/completions", body)
    assert reply.status == status, reply.body
    return reply


def prompt_tokens(server: LiveServer) -> list[int]:
    """Each replica's own count of the prompt tokens it served."""
    return [member.stats().prompt_tokens for member in server.engine.members]


def test_every_call_of_a_run_lands_on_its_replica_and_the_next_run_on_the_other(server):
    first = start_run(server, "planner", "coder")
    before = prompt_tokens(server)
    for turn in range(3):
        for agent in ("planner", "coder"):
            chat(server, f"turn {turn} of {agent}: write the plan down", first, agent)
    grew = [after - b for after, b in zip(prompt_tokens(server), before, strict=True)]
    assert sorted(grew)[0] == 0 and sorted(grew)[1] > 0  # one replica served them all
    home = str(grew.index(max(grew)))
    assert server.request("GET", f"/v1/runs/{first}").json()["replicas"] == [home]
    second = start_run(server, "solo")
    chat(server, "a first question", second, "solo")
    assert server.request("GET", f"/v1/runs/{second}").json()["replicas"] == [
        str(1 - int(home))]
    for run in (first, second):
        assert server.request("DELETE", f"/v1/runs/{run}").status == 200


def test_a_round_runs_on_one_replica(server):
    run = start_run(server, "alice", "bob", "carol")
    before = prompt_tokens(server)
    body = {"shared": [{"role": "user", "content": "The bridge is closed; take the ferry."}],
            "agents": {name: {"messages": [{"role": "system", "content": f"You are {name}."}]}
                       for name in ("alice", "bob", "carol")},
            "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    reply = server.post(f"/v1/runs/{run}/rounds", body)
    assert reply.status == 200, reply.body
    grew = [after - b for after, b in zip(prompt_tokens(server), before, strict=True)]
    assert min(grew) == 0 and max(grew) == reply.json()["usage"]["prompt_tokens"]
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200


def test_calls_without_a_run_that_share_a_prefix_go_to_the_same_replica(server):
    system = "You are the release manager of a large project. " * 6
    chat(server, system + "First question.")
    before = prompt_tokens(server)
    for i in range(3):
        chat(server, system + f"Question number {i}.")
    grew = [after - b for after, b in zip(prompt_tokens(server), before, strict=True)]
    assert min(grew) == 0 and max(grew) > 0


def test_health_and_metrics_report_each_replica(server):
    run = start_run(server, "a")
    chat(server, "hello there", run, "a")
    health = server.request("GET", "/health").json()
    assert [(r["name"], r["state"]) for r in health["replicas"]] == [("0", "ready"),
                                                                   ("1", "ready")]
    assert sorted(r["agents"] for r in health["replicas"]) == [0, 1]
    families = {f.name: f for f in text_string_to_metric_families(
        server.request("GET", "/metrics").body.decode())}
    prompts = {s.labels["replica"]: s.value for s in families["kvrt:prompt_tokens"].samples}
    assert set(prompts) == {"0", "1"}
    assert sorted(prompts.values())[0] == 0 and sum(prompts.values()) == sum(
        prompt_tokens(server))
    up = {s.labels["replica"]: s.value for s in families["kvrt:replica_up"].samples}
    assert up == {"0": 1.0, "1": 1.0}
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200


def test_a_replica_that_goes_down_loses_its_runs_kv_and_nothing_else(server):
    run = start_run(server, "writer", "editor")
    chat(server, "draft the intro", run, "writer")
    home = int(server.request("GET", f"/v1/runs/{run}").json()["replicas"][0])
    server.call(server.engine.members[home].stop)  # the engine is gone, as a dead actor's
    health = server.request("GET", "/health").json()
    assert health["replicas"][home]["state"] == "down"
    # The run goes on, on the other replica; the daemon kept its graph and run.
    chat(server, "draft the outro", run, "writer")
    chat(server, "edit it", run, "editor")
    state = server.request("GET", f"/v1/runs/{run}").json()
    assert str(1 - home) in state["replicas"]
    assert {a["name"]: a["calls"] for a in state["agents"]} == {"writer": 2, "editor": 1}
    assert server.request("DELETE", f"/v1/runs/{run}").status == 200
    # With no replica left, calls get a retryable 503.
    server.call(server.engine.members[1 - home].stop)
    reply = chat(server, "anyone?", status=503)
    assert assert_error_shape(reply, 503)["code"] == "replica_unavailable"
    assert int(reply.headers["Retry-After"]) >= 1
