"""The client's plumbing: plain chat, connection failures and retries, the SDK's imports."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kvrt.sdk import Client, Graph, KvrtConnectionError, KvrtError, KvrtTimeoutError
from kvrt.sdk.chat import ChatStream, chat_body
from kvrt.sdk.errors import error_from_response
from kvrt.sdk.protocol.openai_api import ChatMessage
from tests.server.live_server import LiveServer


def test_plain_chat_and_stream(server: LiveServer) -> None:
    async def go() -> None:
        async with Client(server.url + "/") as client:
            messages = [{"role": "user", "content": "Hello there"}]
            reply = await client.chat(messages, max_tokens=3, temperature=0, ignore_eos=True)
            assert reply.usage.completion_tokens == 3 and reply.finish_reason == "length"
            stream = client.stream(messages, max_tokens=3, temperature=0, ignore_eos=True)
            assert "".join([d async for d in stream]) == stream.text == reply.content

    asyncio.run(go())


def test_a_request_error_from_chat(server: LiveServer) -> None:
    async def go() -> KvrtError:
        async with Client(server.url) as client:
            with pytest.raises(KvrtError) as caught:
                await client.chat([{"role": "user", "content": "hi"}], max_tokens=0)
            return caught.value

    error = asyncio.run(go())
    assert error.status == 400 and error.param == "max_tokens" and error.attempts == 1


def test_connection_failure_after_retries(closed_port: int) -> None:
    async def go() -> tuple[list[KvrtConnectionError], float]:
        errors = []
        start = time.perf_counter()
        async with Client(f"http://127.0.0.1:{closed_port}", retries=1, backoff=0.05) as client:
            for call in (client.list_graphs(), client.get_run("r")):  # idempotent: retried
                with pytest.raises(KvrtConnectionError) as caught:
                    await call
                errors.append(caught.value)
            elapsed = time.perf_counter() - start
            for call in (client.create_graph(Graph("g").agent("a")), client.start_run("g"),
                         client.chat([{"role": "user", "content": "hi"}])):  # sent once
                with pytest.raises(KvrtConnectionError) as caught:
                    await call
                errors.append(caught.value)
            with pytest.raises(KvrtConnectionError) as caught:
                async for _ in client.stream([{"role": "user", "content": "hi"}]):
                    pass
            errors.append(caught.value)
        return errors, elapsed

    errors, elapsed = asyncio.run(go())
    assert [e.attempts for e in errors] == [2, 2, 1, 1, 1, 1]
    assert all(e.status == 0 and e.code == "connection_error" for e in errors)
    assert all(isinstance(e, KvrtError) for e in errors)
    assert "after 2 attempts" in str(errors[0]) and str(closed_port) in str(errors[0])
    assert elapsed >= 2 * 0.05  # one backoff per retried call


def test_client_options_are_checked() -> None:
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1", retries=-1)
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1", timeout=0)


def test_chat_body_puts_the_system_prompt_first_once() -> None:
    user = {"role": "user", "content": "hi"}
    body = chat_body([user], max_tokens=5, temperature=None, extra={"seed": 1},
                     system="S", run="r", agent="a")
    assert body == {"seed": 1, "messages": [{"role": "system", "content": "S"}, user],
                    "max_tokens": 5, "kvrt": {"run": "r", "agent": "a"}}
    for own in ({"role": "system", "content": "mine"}, ChatMessage(role="developer", content="d")):
        assert chat_body([own, user], max_tokens=None, temperature=None, extra={},
                         system="S")["messages"] == [own, user]


def test_importing_the_sdk_needs_neither_torch_nor_the_runtime() -> None:
    code = ("import kvrt.sdk, kvrt.sdk.sync, sys; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "assert not [m for m in sys.modules if m.startswith(('kvrt.runtime', 'kvrt.kernels'))]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_error_event_mid_stream_raises() -> None:
    event = (b'{"error": {"message": "engine error: boom", "type": "server_error", '
             b'"param": null, "code": "engine_error"}}')
    with pytest.raises(KvrtError) as caught:
        ChatStream._chunk(event, 200)
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        500, "engine_error", "engine error: boom")


def test_an_error_answer_outside_the_error_shape() -> None:
    error = error_from_response(502, b"<html>Bad Gateway</html>", attempts=3)
    assert (error.status, error.code, error.message, error.attempts) == (
        502, None, "<html>Bad Gateway</html>", 3)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a daemon stuck)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes the handshakes; nothing ever reads or writes
        yield sock.getsockname()[1]


def test_a_timeout_is_told_from_a_connection_failure(silent_port: int, closed_port: int) -> None:
    async def go(port: int) -> list[KvrtError]:
        errors: list[KvrtError] = []
        async with Client(f"http://127.0.0.1:{port}", retries=1, backoff=0.01,
                          timeout=0.2) as client:
            for call in (client.list_graphs(), client.chat([{"role": "user", "content": "hi"}])):
                with pytest.raises(KvrtError) as caught:
                    await call
                errors.append(caught.value)
            with pytest.raises(KvrtError) as caught:
                async for _ in client.stream([{"role": "user", "content": "hi"}]):
                    pass
            errors.append(caught.value)
        return errors

    timeouts = asyncio.run(go(silent_port))
    assert [type(e) for e in timeouts] == [KvrtTimeoutError] * 3
    assert [e.attempts for e in timeouts] == [2, 1, 1]
    assert all(e.status == 0 and e.code == "timeout" for e in timeouts)
    assert str(timeouts[0]).startswith(f"[0 timeout] GET http://127.0.0.1:{silent_port}/v1/graphs")
    assert "timed out (after 2 attempts): nothing for 0.2 s" in str(timeouts[0])
    assert f"POST http://127.0.0.1:{silent_port}/v1/chat/completions timed out" in str(timeouts[2])
    failures = asyncio.run(go(closed_port))
    assert [type(e) for e in failures] == [KvrtConnectionError] * 3
    assert all(e.code == "connection_error" and "connection failed" in str(e) for e in failures)
    assert all(not isinstance(e, KvrtTimeoutError) for e in failures)
