"""The connection below the app, on raw sockets: a request head must come in within the header
timeout (a client that trickles its headers, or sends nothing, is cut off while the others are
served), and what aiohttp's parser refuses is answered in OpenAI's error shape."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kvrt.runtime.config import ServerLimits
from tests.server.live_server import LiveServer, live_server

HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, limits=ServerLimits(header_timeout_s=HEADER_TIMEOUT_S))


def connect(server: LiveServer) -> socket.socket:
    where = urlsplit(server.url)
    return socket.create_connection((where.hostname, where.port), timeout=30)


def read_all(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def read_response(conn: socket.socket) -> bytes:
    """One response of a keep-alive connection: its head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    return head


def closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_client_trickling_its_headers_is_cut_off_while_others_are_served(
        server: LiveServer) -> None:
    # A whole head, one byte every 0.05 s: about 4 s to send, four times the timeout.
    head = b"GET /health HTTP/1.1\r\nHost: kvrt\r\nX-Slow: " + b"s" * 40 + b"\r\n\r\n"
    served: list[int] = []

    def others() -> None:
        while len(served) < 5:
            served.append(server.request("GET", "/health").status)
            time.sleep(0.1)

    with connect(server) as conn:
        opened = time.monotonic()
        helper = threading.Thread(target=others)
        helper.start()
        sent = 0
        try:
            for byte in head:
                conn.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        cut = closed_by_server(conn)
        took = time.monotonic() - opened
        helper.join(30)
    assert cut and sent < len(head), f"the server waited for all {sent} bytes"
    # The timeout, plus slack for a loaded test machine; the whole head takes ~4 s to send.
    assert HEADER_TIMEOUT_S <= took < HEADER_TIMEOUT_S + 2.5, took
    assert served == [200] * 5


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(
        server: LiveServer) -> None:
    with connect(server) as conn:
        opened = time.monotonic()
        assert closed_by_server(conn)
        took = time.monotonic() - opened
    assert HEADER_TIMEOUT_S * 0.9 <= took < HEADER_TIMEOUT_S + 2.5, took


def test_a_keep_alive_connection_serves_requests_that_come_in_time(server: LiveServer) -> None:
    """The clock restarts at each response: a client that keeps asking keeps its connection."""
    request = b"GET /health HTTP/1.1\r\nHost: kvrt\r\n\r\n"
    with connect(server) as conn:
        for _ in range(4):
            conn.sendall(request)
            head = read_response(conn)
            assert head.startswith(b"HTTP/1.1 200"), head
            time.sleep(HEADER_TIMEOUT_S * 0.6)  # 2.4 s in all: past the timeout, in pieces


def test_only_the_head_is_timed_a_body_may_take_longer(server: LiveServer) -> None:
    """Once the head is in, the handler runs and the header timeout is out of the picture."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "ignore_eos": True, "temperature": 0}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: kvrt\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    with connect(server) as conn:
        conn.sendall(head)
        for piece in (body[:10], body[10:20], body[20:]):  # 3 s in all, thrice the timeout
            time.sleep(HEADER_TIMEOUT_S)
            conn.sendall(piece)
        response = read_all(conn)
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 2


MANY_HEADERS = b"".join(b"X-H%d: 1\r\n" % i for i in range(200))

# (id, raw request, error code, words of the message)
MALFORMED = [
    ("header-too-long", b"GET /health HTTP/1.1\r\nHost: kvrt\r\nX-Big: " + b"a" * 9000 +
     b"\r\n\r\n", "http_line_too_long", "8190 bytes"),
    ("url-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: kvrt\r\n\r\n",
     "http_line_too_long", "8190 bytes"),
    ("too-many-headers", b"GET /health HTTP/1.1\r\n" + MANY_HEADERS + b"\r\n",
     "bad_http_request", "Too many headers"),
    ("not-a-request-line", b"HELLO\r\n\r\n", "bad_request_line", "HELLO"),
    ("tls-on-the-http-port", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
     "bad_request_line", "HTTPS traffic"),
    ("bad-url", b"GET http://[::1 HTTP/1.1\r\nHost: kvrt\r\n\r\n", "invalid_url",
     "invalid URL http://[::1"),
    ("bad-http-version", b"GET /health HTTP/9.9\r\nHost: kvrt\r\n\r\n", "bad_request_line",
     "HTTP version"),
    ("bad-content-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: kvrt\r\n"
     b"Content-Length: ten\r\n\r\n", "bad_http_request", "Content-Length"),
    ("two-content-lengths", b"POST /v1/chat/completions HTTP/1.1\r\nHost: kvrt\r\n"
     b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", "bad_http_request", "Content-Length"),
    ("control-byte-in-a-header", b"GET /health HTTP/1.1\r\nHost: kvrt\r\nX-A: a\x01b\r\n\r\n",
     "bad_http_request", "header value"),
]


@pytest.mark.parametrize(("raw", "code", "words"), [case[1:] for case in MALFORMED],
                         ids=[case[0] for case in MALFORMED])
def test_what_the_parser_refuses_is_an_openai_error(server: LiveServer, raw: bytes, code: str,
                                                   words: str) -> None:
    with connect(server) as conn:
        conn.sendall(raw)
        response = read_all(conn)
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *headers = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[1] == "400", response[:300]
    assert "content-type: application/json" in [h.lower() for h in headers], head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code,
                                                              None)
    assert words in error["message"] and "\n" not in error["message"], error["message"]
    assert server.request("GET", "/health").status == 200  # and the server keeps serving
