"""`POST /v1/runs/{id}/rounds` on a live daemon (tiny model): each agent gets exactly the prompt
it would have built for a plain chat call, all generate, the run counts the round; a bad round
is refused whole, before anything runs, and the daemon keeps serving. `Run.round` in the SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.sdk import Client, Graph
from tests.server.live_server import LiveServer, assert_error_shape, live_server, start_run

SHARED = [{"role": "user",
           "content": "Alice said: the bridge is closed. Bob said: take the ferry."}]
OWN = {"alice": [{"role": "system", "content": "You are Alice, a careful engineer."}],
       "bob": [{"role": "system", "content": "You are Bob, who likes boats."},
               {"role": "user", "content": "Earlier you went fishing."}],
       "carol": []}
INSTRUCTION = [{"role": "user", "content": "Say what you do next."}]
CAROL_AFTER = [{"role": "user", "content": "Answer in one word."}]


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    config = EngineConfig(kv_cache_memory=8 * 1024**2, max_model_len=512, max_num_seqs=8)
    yield from live_server(tiny_model, config)


def round_body(**extra: Any) -> dict[str, Any]:
    agents = {name: {"messages": own} for name, own in OWN.items()}
    agents["carol"]["after"] = CAROL_AFTER
    return {"shared": SHARED, "agents": agents, "instruction": INSTRUCTION, "max_tokens": 4,
            "temperature": 0, "ignore_eos": True, **extra}


def chat(server: LiveServer, messages: list[dict[str, Any]]) -> dict[str, Any]:
    reply = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True})
    assert reply.status == 200, reply.body
    return reply.json()


def agent_states(server: LiveServer, run: str) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in server.request("GET", f"/v1/runs/{run}").json()["agents"]}


def test_each_agent_reads_its_own_messages_then_the_shared_then_its_instruction(server) -> None:
    run = start_run(server, "alice", "bob", "carol")
    reply = server.post(f"/v1/runs/{run}/rounds", round_body())
    assert reply.status == 200, reply.body
    result = reply.json()
    assert (result["run"], result["round"]) == (run, 1)
    assert list(result["agents"]) == ["alice", "bob", "carol"]
    for name, own in OWN.items():
        after = CAROL_AFTER if name == "carol" else INSTRUCTION
        alone = chat(server, [*own, *SHARED, *after])  # the same prompt as a plain call
        got = result["agents"][name]
        assert got["content"] == alone["choices"][0]["message"]["content"], name
        assert got["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"], name
        assert got["usage"]["completion_tokens"] == 4 and got["finish_reason"] == "length"
    total = result["usage"]
    assert total["prompt_tokens"] == sum(a["usage"]["prompt_tokens"]
                                         for a in result["agents"].values())
    assert total["completion_tokens"] == 12
    states = agent_states(server, run)
    assert all(states[n]["generated_tokens"] == 4 and states[n]["state"] == "idle" for n in OWN)
    again = server.post(f"/v1/runs/{run}/rounds", round_body())
    assert again.status == 200 and again.json()["round"] == 2
    second = again.json()["agents"]
    assert {n: a["content"] for n, a in second.items()} == {
        n: a["content"] for n, a in result["agents"].items()}
    # The same prompts again: each finds its whole prompt's full blocks in the prefix cache.
    assert all(a["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16 for a in second.values())
    server.engine.engine.check_integrity()


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"agents": {}}, 400, None),
    ({"shared": []}, 400, None),
    ({"stream": True}, 400, "stream"),
    ({"kvrt": {"run": "x", "agent": "alice"}}, 400, "kvrt"),
    ({"max_tokens": 0}, 400, None),
    ({"misspelt": 1}, 400, None),
    ({"agents": {"alice": {"messages": [], "later": []}}}, 400, None),
    ({"agents": {"alice": {}, "mallory": {}}}, 404, None),
    ({"agents": {"alice": {}, "bob": {"messages": [
        {"role": "user", "content": "word " * 600}]}}}, 400, "agents.bob"),
], ids=["no agents", "no shared", "stream", "kvrt", "max_tokens 0", "unknown field",
        "unknown agent field", "unknown agent", "too long for one agent"])
def test_a_bad_round_is_refused_whole_and_starts_nothing(server, change, status, param) -> None:
    run = start_run(server, "alice", "bob", "carol")
    reply = server.post(f"/v1/runs/{run}/rounds", round_body(**change))
    error = assert_error_shape(reply, status)
    if param is not None:
        assert error["param"] == param
    states = agent_states(server, run)
    assert all(s["requests"] == 0 and s["generated_tokens"] == 0 for s in states.values())
    assert server.stats().kv_blocks_in_use == 0
    assert server.post(f"/v1/runs/{run}/rounds", round_body()).status == 200  # still serving
    assert server.post("/v1/runs/run-nope/rounds", round_body()).status == 404


def test_each_call_carries_its_agents_priority_as_the_round_found_the_run(
        server, monkeypatch) -> None:
    graph = server.post("/v1/graphs", {"name": "prio", "edges": [["a", "b"]], "agents": [
        {"name": "a", "expected_output_tokens": 100}, {"name": "b", "expected_output_tokens": 10},
        {"name": "c", "expected_output_tokens": 50}]}).json()
    run = server.post("/v1/runs", {"graph_id": graph["id"]}).json()["id"]
    assert server.post(f"/v1/runs/{run}/events", {"type": "agent.done", "agent": "b"}).status == 200
    before = {name: state["priority"] for name, state in agent_states(server, run).items()}
    assert before == {"a": 1.0, "b": 0.0, "c": pytest.approx(0.5)}  # b's work is done
    sent: list[GenerateRequest] = []
    generate = server.engine.generate
    monkeypatch.setattr(server.engine, "generate", lambda r: sent.append(r) or generate(r))
    body = round_body() | {"agents": {name: {} for name in ("a", "b", "c")}}
    assert server.post(f"/v1/runs/{run}/rounds", body).status == 200
    # One snapshot for the whole round: b's call revives b, which lengthens the path beside c,
    # but no call of the round sees another's effect.
    got = {r.attribution.agent: r.attribution.priority for r in sent}
    assert got == pytest.approx(before, rel=5e-3)  # the run's state sends 3 digits


def test_the_sdk_round_puts_each_agents_declared_system_prompt_first(server) -> None:
    graph = Graph("town")
    graph.agent("alice", system="You are Alice, a careful engineer.")
    graph.agent("dave")

    async def go() -> tuple[Any, str, str]:
        async with Client(server.url) as client, \
                await client.start_run(await client.create_graph(graph)) as run:
            result = await run.round(SHARED, {"alice": [], "dave": {"messages": [], "after": [
                {"role": "user", "content": "Reply."}]}}, instruction=INSTRUCTION,
                max_tokens=4, temperature=0, ignore_eos=True)
            alice = await run.agent("alice").chat([*SHARED, *INSTRUCTION], max_tokens=4,
                                                   temperature=0, ignore_eos=True)
            dave = await run.agent("dave").chat(
                [*SHARED, {"role": "user", "content": "Reply."}], max_tokens=4, temperature=0,
                ignore_eos=True)
            return result, alice.content, dave.content

    result, alice, dave = asyncio.run(go())
    assert result.round == 1 and set(result.agents) == {"alice", "dave"}
    assert result.agents["alice"].content == alice and result.agents["dave"].content == dave
