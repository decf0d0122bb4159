"""The HTTP transport under the SDK: one aiohttp session, JSON in and out through msgspec, the
daemon's error shape turned into KvrtError, and retries for the calls that are safe to repeat.

Retry rule: a call marked idempotent (GET, DELETE, run events, which carry an `id` the daemon
deduplicates) is sent again after a connection failure, a timeout or a 503, with exponential
backoff (`backoff`, then twice that, ...), at most `retries` more times. Anything else (creating
a graph or a run, a chat call) is sent exactly once: repeating it could do the work twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
import msgspec

from kvrt.sdk.errors import KvrtConnectionError, KvrtError, KvrtTimeoutError, error_from_response

T = TypeVar("T")

# What counts as "no answer came back": the connection failed, broke, or went quiet too long.
TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)
_JSON = {"Content-Type": "application/json"}
# aiohttp 3.10+ tells a connect timeout from a read timeout; before, both are ServerTimeoutError.
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())


class Transport:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        retries: int,
        backoff: float,
        headers: Mapping[str, str] | None,
    ) -> None:
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError("retries and backoff must be >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        # `timeout` bounds connecting and each wait for the next bytes, not a whole response:
        # a long stream is fine as long as tokens keep coming.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None
        self._encoder = msgspec.json.Encoder()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[T],
        *,
        body: Any = None,
        idempotent: bool,
    ) -> T:
        """Sends one call and decodes its 2xx answer with `decoder`; raises KvrtError for an error
        answer, KvrtTimeoutError or KvrtConnectionError when none came back."""
        data = None if body is None else self._encoder.encode(body)
        attempts = 1 + (self.retries if idempotent else 0)
        failure: BaseException | None = None
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 2))
            try:
                async with self.session().request(
                    method, self.base_url + path, data=data, headers=_JSON if data else None
                ) as resp:
                    status, raw = resp.status, await resp.read()
            except TRANSPORT_ERRORS as exc:
                failure = exc
                continue
            if status == 503 and attempt < attempts:
                continue
            if not 200 <= status < 300:
                raise error_from_response(status, raw, attempts=attempt)
            return decode(decoder, raw, status, attempt)
        raise no_answer(method, self.base_url + path, failure, attempts, self.timeout)

    @asynccontextmanager
    async def stream(self, path: str, body: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """POSTs `body` once and yields the open 2xx response (an error answer raises)."""
        url = self.base_url + path
        try:
            async with self.session().post(
                url, data=self._encoder.encode(body), headers=_JSON
            ) as resp:
                if not 200 <= resp.status < 300:
                    raise error_from_response(resp.status, await resp.read())
                yield resp
        except TRANSPORT_ERRORS as exc:
            raise no_answer("POST", url, exc, 1, self.timeout) from exc


def decode(decoder: msgspec.json.Decoder[T], raw: bytes, status: int, attempts: int = 1) -> T:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise KvrtError(status, f"unexpected answer from the daemon: {exc}",
                        code="invalid_response", attempts=attempts) from exc


def no_answer(method: str, url: str, failure: BaseException | None, attempts: int,
              timeout: float) -> KvrtError:
    """The error for a call that got no answer: KvrtTimeoutError when the last try timed out
    (aiohttp's connect and read timeouts are TimeoutErrors), else KvrtConnectionError."""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    error: KvrtError
    if isinstance(failure, TimeoutError):
        what = ("connecting" if isinstance(failure, _CONNECT_TIMEOUT)
                else "waiting for the daemon's answer")
        error = KvrtTimeoutError(f"{method} {url} timed out{tries}: nothing for {timeout:g} s "
                                 f"while {what} (the client's `timeout`)", attempts=attempts)
    else:
        reason = f"{type(failure).__name__}: {failure}" if failure is not None else "no answer"
        error = KvrtConnectionError(f"{method} {url}: connection failed{tries}: {reason}",
                                    attempts=attempts)
    error.__cause__ = failure
    return error
