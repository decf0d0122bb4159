"""Drives one engine request for a handler: timing, metrics, and the promise to close.

The engine frees a request's KV when its output iterator is closed early, so every path out of
a handler (finished, client gone, handler cancelled, write failed, error) must close it:
`observed_outputs()` closes the engine's iterator in its `finally`, and handlers hold
`observed_outputs()` itself in `contextlib.aclosing`, which runs that `finally` even when the
handler is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Protocol

from kvrt.runtime.engine.protocol import EngineClient, GenerateOutput, GenerateRequest
from kvrt.runtime.server.errors import APIError
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.sdk.protocol.openai_api import PromptTokensDetails, Usage


class CallObserver(Protocol):
    """Follows one model call (the control plane's view of an agent's call)."""

    def produced(self, tokens: int) -> None: ...

    def ended(self) -> None: ...


async def observed_outputs(
    engine: EngineClient, request: GenerateRequest, metrics: ServerMetrics, arrival: float,
    observer: CallObserver | None = None,
) -> AsyncIterator[GenerateOutput]:
    """The engine's outputs for `request`, observed into `metrics` and `observer`. `arrival` is
    the `time.perf_counter()` at which the HTTP request came in."""
    outputs = engine.generate(request)
    first = True
    completion: dict[int, int] = {}  # tokens of each choice that ended (n > 1: several)
    try:
        async for output in outputs:
            now = time.perf_counter()
            if first:
                metrics.observe_first_token(now - arrival)
                first = False
            if output.finish_reason is not None:
                completion[output.index] = output.completion_tokens
            # "abort" is the engine's answer to our own close; it is no success to count. A
            # call of n choices ends with its last, its tokens summed over them.
            if (output.finish_reason is not None and output.finish_reason != "abort"
                    and len(completion) == request.params.n):
                metrics.observe_finish(now - arrival, replace(
                    output, completion_tokens=sum(completion.values())))
            if observer is not None:
                observer.produced(len(output.token_ids))
            yield output
    finally:
        if observer is not None:
            observer.ended()
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


async def collect(
    engine: EngineClient, request: GenerateRequest, metrics: ServerMetrics, arrival: float,
    observer: CallObserver | None = None,
) -> tuple[str, GenerateOutput]:
    """Runs the request to its end: its whole text and its last output."""
    texts: list[str] = []
    last: GenerateOutput | None = None
    async with aclosing(observed_outputs(engine, request, metrics, arrival, observer)) as outputs:
        async for last in outputs:
            texts.append(last.text)
    if last is None:
        raise APIError(500, "the engine returned no output", code="engine_error")
    return "".join(texts), last


def usage_of(output: GenerateOutput) -> Usage:
    return Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=output.cached_tokens),
    )
