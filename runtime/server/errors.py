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

from kvrt.runtime.engine.protocol import EngineError, RequestRejected, RunEnded
from kvrt.runtime.graph.errors import Conflict, GraphError, NotFound
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
    500: "server_error",
    503: "service_unavailable",
}

# msgspec ends its messages with "- at `$.messages[0].role`"; the path is the `param`.
_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP status it gets."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

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
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        match = _MSGSPEC_PATH.search(text)
        param = match.group(1) if match else None
        return bad_request(text, param=param or None)
    if isinstance(exc, msgspec.DecodeError):
        return bad_request(f"request body is not valid JSON: {exc}", code="invalid_json")
    if isinstance(exc, GraphError):
        return bad_request(str(exc), param=exc.param, code="invalid_graph")
    if isinstance(exc, NotFound):
        return APIError(404, str(exc), code=f"{exc.kind}_not_found")
    if isinstance(exc, Conflict):
        return APIError(409, str(exc), code=exc.code)
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), code="request_rejected")
    if isinstance(exc, RunEnded):
        return APIError(409, str(exc), code="run_ended")
    if isinstance(exc, EngineError):
        return APIError(500, f"engine error: {exc}", code="engine_error")
    if isinstance(exc, web.HTTPException):
        return APIError(exc.status, exc.text or exc.reason or "")
    return APIError(500, "internal server error; see the server log", code="internal_error")


def error_response(error: APIError) -> web.Response:
    return web.Response(
        status=error.status,
        body=msgspec.json.encode(error.body()),
        content_type="application/json",
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
        if error.status >= 500:
            log.exception("%s %s failed", request.method, request.path)
        return error_response(error)
