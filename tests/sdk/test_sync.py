"""The blocking facade (kvrt.sdk.sync) against the real daemon."""

from __future__ import annotations

import pytest

from kvrt.sdk import Graph, KvrtError
from kvrt.sdk.sync import Client
from tests.server.live_server import LiveServer

QUESTION = [{"role": "user", "content": "What is a KV cache?"}]


def test_sync_client_end_to_end(server: LiveServer) -> None:
    with Client(server.url, retries=1) as client:
        graph = client.create_graph(
            Graph("sync").agent("a", "You answer.").agent("b", tools={"t": 0.1}).edge("a", "b"))
        assert graph.id in [g.id for g in client.list_graphs()]
        with client.start_run(graph) as run:
            assert run.graph_id == graph.id and run.agent("a").system == "You answer."
            reply = run.agent("a").chat(QUESTION, max_tokens=3, temperature=0, ignore_eos=True)
            assert reply.usage.completion_tokens == 3
            with run.agent("a").stream(QUESTION, max_tokens=3, temperature=0,
                                       ignore_eos=True) as stream:
                assert "".join(stream) == stream.text == reply.content
            assert stream.finish_reason == "length" and stream.usage is not None

            b = run.agent("b")
            with b.tool_call("t") as ack:
                assert ack.state == "tool_call"
                assert client.get_run(run.id).state().agents[1].state == "tool_call"
            with pytest.raises(RuntimeError, match="tool broke"), b.tool_call("t"):
                raise RuntimeError("tool broke")
            state = run.state()
            assert [a.state for a in state.agents] == ["idle", "idle"]
            assert state.event_count == 4
            result = run.round(QUESTION, {"a": [], "b": {"after": QUESTION}}, max_tokens=2,
                               temperature=0, ignore_eos=True)
            assert result.round == 1 and result.usage.completion_tokens == 4
            assert b.done().state == "done"
            assert run.id in [r.id for r in client.list_runs(graph.id)]
        with pytest.raises(KvrtError) as caught:
            run.state()
        assert caught.value.code == "run_not_found"
        assert client.delete_graph(graph).deleted
        with pytest.raises(KvrtError) as caught:
            client.get_graph(graph.id)
        assert caught.value.status == 404
    client.close()  # closing twice is fine
