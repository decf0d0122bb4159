"""The SDK's exceptions: one type for every error the daemon answers, and two subclasses for
no answer: KvrtConnectionError (the daemon could not be reached, or the connection broke) and
KvrtTimeoutError (the daemon went quiet longer than the client's `timeout`). Catch both, or
KvrtError, for "no answer came back".

The daemon's errors come in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`);
`KvrtError` carries those fields and the HTTP status, so callers branch on `status` and `code`
(`"graph_not_found"`, `"graph_in_use"`, `"tool_not_started"`, ...) rather than on messages.
"""

from __future__ import annotations

import msgspec

from kvrt.sdk.protocol.errors import ErrorBody, ErrorResponse

# A mid-stream error event has no HTTP status of its own (the response began with 200); it gets
# the status its `type` stands for in the daemon's error mapping.
_STATUS_OF_TYPE = {"server_error": 500, "service_unavailable": 503}

_error_decoder = msgspec.json.Decoder(ErrorResponse)


class KvrtError(Exception):
    """The daemon refused a call. `status` is the HTTP status (0 when no answer came back),
    `code` the daemon's machine-readable code (may be None), `attempts` how many times the call
    was sent (more than 1 only for idempotent calls that were retried)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type
        self.attempts = attempts

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        param = f" (param {self.param})" if self.param else ""
        return f"[{self.status}{code}] {self.message}{param}"


class KvrtConnectionError(KvrtError):
    """The daemon could not be reached (refused, unknown host), or the connection broke before
    an answer came back (after the retries an idempotent call gets). `status` is 0, `code`
    "connection_error"; the message names the call, its URL and the cause."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(0, message, code="connection_error", attempts=attempts)


class KvrtTimeoutError(KvrtError):
    """The daemon was reached, or being connected to, but sent nothing for longer than the
    client's `timeout` (after the retries an idempotent call gets): a daemon overloaded or
    stuck, or a call queued longer than the client waits. `status` is 0, `code` "timeout";
    the message names the call, its URL and the timeout."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(0, message, code="timeout", attempts=attempts)


def error_from_body(body: ErrorBody, status: int, *, attempts: int = 1) -> KvrtError:
    return KvrtError(status, body.message, code=body.code, param=body.param, type=body.type,
                     attempts=attempts)


def error_from_response(status: int, raw: bytes, *, attempts: int = 1) -> KvrtError:
    """The KvrtError for a non-2xx answer; a body not in the error shape (a proxy's HTML page,
    say) still gives one, with the start of the body as its message."""
    try:
        return error_from_body(_error_decoder.decode(raw).error, status, attempts=attempts)
    except msgspec.DecodeError:
        text = raw[:500].decode(errors="replace").strip() or f"HTTP {status}"
        return KvrtError(status, text, attempts=attempts)


def error_from_event(body: ErrorBody) -> KvrtError:
    """The KvrtError for an error event inside an SSE stream."""
    return error_from_body(body, _STATUS_OF_TYPE.get(body.type, 400))
