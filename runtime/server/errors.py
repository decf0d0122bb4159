"""Domain errors -> HTTP, at the edge only, in OpenAI's error shape.

Handlers raise `APIError` (or let msgspec / the engine raise theirs); one middleware turns every
failure into `{"error": {"message", "type", "param", "code"}}` with the right status, so a bad
request never takes the server down and clients (the `openai` library included) parse it.
"""

from __future__ import annotations

import logging
import re

import msgspec
from aiohttp import web

from kvrt.runtime.engine.protocol import (
    EngineError,
    ReplicaUnavailable,
    RequestRejected,
    RequestTimedOut,
    RunEnded,
    ShuttingDown,
)
from kvrt.runtime.graph.errors import Conflict, GraphError, NotFound, QuotaExceeded
from kvrt.sdk.protocol.errors import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

# OpenAI's `type` strings by status; clients key their exception classes on the status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "server_error",
}

# msgspec ends its messages with "- at `$.messages[0].role`"; the path is the `param`.
_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_DECODING_TOO_DEEP = re.compile(r"while (deserializing an object|decoding a JSON)")


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP status it gets. `retry_after_s`, for
    a 429 or a 503, becomes the Retry-After header (whole seconds)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def is_fault(self) -> bool:
        """A failure of the server's own (worth a traceback in the log), not a refusal it meant:
        503 (starting, draining) and 504 (time limit) are answers, not faults."""
        return self.status == 500

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            ErrorBody(self.message, _TYPES.get(self.status, "invalid_request_error"),
                      self.param, self.code)
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> APIError:
    """Maps any failure to the APIError a client sees. Unknown errors are a 500 without
    internals in the message (they are logged with the traceback instead)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        # A round's calls run in a task group, which wraps the first failure (the calls it
        # cancelled add nothing): the client gets what that failure gets on the chat route.
        return from_exception(exc.exceptions[0])
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        match = _MSGSPEC_PATH.search(text)
        param = match.group(1) if match else None
        return bad_request(text, param=param or None)
    if isinstance(exc, msgspec.DecodeError):
        return bad_request(f"request body is not valid JSON: {exc}", code="invalid_json")
    if isinstance(exc, RecursionError) and _DECODING_TOO_DEEP.search(str(exc)):
        # msgspec's and json's decoders give up on deep nesting with a RecursionError; any
        # other RecursionError is a bug, and stays a 500.
        return bad_request("the JSON nests too deeply to be read", code="invalid_json")
    if isinstance(exc, GraphError):
        return bad_request(str(exc), param=exc.param, code="invalid_graph")
    if isinstance(exc, NotFound):
        return APIError(404, str(exc), code=f"{exc.kind}_not_found")
    if isinstance(exc, Conflict):
        return APIError(409, str(exc), code=exc.code)
    if isinstance(exc, QuotaExceeded):
        # No Retry-After: what it holds is freed by its own deletes, not by waiting.
        return APIError(413 if exc.too_large else 429, str(exc), param=exc.quota,
                        code="quota_exceeded")
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), code="request_rejected")
    if isinstance(exc, RunEnded):
        return APIError(409, str(exc), code="run_ended")
    if isinstance(exc, RequestTimedOut):
        # Not 408, which says the client was too slow to send its request: this one arrived
        # whole, and the server ran out of the time it allows a request.
        return APIError(504, str(exc), code="request_timeout")
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), code="shutting_down", retry_after_s=1)
    if isinstance(exc, ReplicaUnavailable):
        return APIError(503, str(exc), code="replica_unavailable",
                        retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineError):
        return APIError(500, f"engine error: {exc}", code="engine_error")
    if isinstance(exc, web.HTTPException):
        return APIError(exc.status, exc.text or exc.reason or "")
    return APIError(500, "internal server error; see the server log", code="internal_error")


def error_response(error: APIError) -> web.Response:
    headers = {} if error.retry_after_s is None else {"Retry-After": str(error.retry_after_s)}
    return web.Response(
        status=error.status,
        body=msgspec.json.encode(error.body()),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(APIError(404, f"no such route: {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path}; use {allowed}"
        return error_response(APIError(405, message))
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        return error_response(from_exception(exc))
    except Exception as exc:
        error = from_exception(exc)
        if error.is_fault():
            log.exception("%s %s failed", request.method, request.path)
        return error_response(error)
