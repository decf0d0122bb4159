"""The HTTP connection itself, below the app: how long a request's head may take, and the
errors aiohttp's parser answers before any middleware runs, in OpenAI's shape.

A request's line and headers must be in within `limits.header_timeout_s` of the connection's
opening or of its previous response. aiohttp's keep-alive timer is that clock already: it starts
at the connection's opening and at each response's end, is not pushed back by bytes that
arrive, and closes the connection if no whole request head has been parsed when it fires. So
the header timeout is aiohttp's `keepalive_timeout` (an idle keep-alive connection is closed
after as long), and a client that sends nothing, or its headers a byte at a time, loses the
connection without holding a handler: none runs before the head is whole.

A request the parser refuses (a line or header past 8190 bytes, too many headers, a bad request
line, a bad Content-Length) never reaches the app, so the error middleware cannot shape it:
aiohttp answers from `RequestHandler.handle_error` in plain text, and offers no hook for it
(aio-libs/aiohttp#3287). `JSONErrorRequestHandler` overrides that one method.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from kvrt.runtime.server.errors import APIError, error_response

_CODES: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "http_line_too_long"),
    (BadStatusLine, "bad_request_line"),  # a bad method or version, or TLS on this HTTP port
    (InvalidURLError, "invalid_url"),
)


class JSONErrorRequestHandler(RequestHandler):
    """aiohttp's connection protocol, answering its own errors in OpenAI's shape."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own logs, and raises if a response was already begun; its reply is unused.
        super().handle_error(request, status, exc, message)
        response = error_response(_api_error(status, exc, message))
        response.force_close()  # as aiohttp's: after a broken request, nothing is framed
        return response


def _api_error(status: int, exc: BaseException | None, message: str | None) -> APIError:
    if status >= 500:
        return APIError(status, "internal server error; see the server log",
                        code="internal_error")
    code = next((code for kind, code in _CODES if isinstance(exc, kind)), "bad_http_request")
    text = exc.message if isinstance(exc, HttpProcessingError) else message
    # The parser's messages span lines, with a caret under the bad byte: one line is kept.
    lines = [line.strip() for line in (text or "malformed").splitlines()]
    text = " ".join(line for line in lines if line.strip("^ "))
    if isinstance(exc, InvalidURLError):  # its message is the URL alone
        text = f"invalid URL {text}"
    return APIError(status, f"the HTTP request could not be read: {text}", code=code)


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return JSONErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections use `JSONErrorRequestHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler, with no way to name the
        # protocol class; `_Server` differs from it only in the protocol it makes.
        server.__class__ = _Server
        return server
