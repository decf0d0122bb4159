"""`KvrtChatModel`: LangChain's OpenAI chat model pointed at a kvrt daemon, attributing each
call made inside a registered graph to its thread's run and its node's agent.

Attribution rides in the OpenAI body's `kvrt` extension (`{"kvrt": {"run", "agent"}}`, sent
through `extra_body`); everything else (messages, tools, streaming, usage) is ChatOpenAI's.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import ensure_config
from langchain_openai import ChatOpenAI
from pydantic import PrivateAttr

from kvrt.sdk.langgraph.context import NodeCall, in_config, locate
from kvrt.sdk.langgraph.threads import ENDED_CODES

DEFAULT_BASE_URL = "http://127.0.0.1:8400"
# `model=None` sends no model name, which the daemon takes as the model it serves; LangChain
# needs some name for tracing, and this one says what it means.
SERVED_MODEL = "kvrt-served-model"
# The openai client refuses to start without a key and would otherwise read OPENAI_API_KEY,
# sending a real OpenAI key to the daemon; a daemon without keys ignores this one.
NO_KEY = "kvrt-no-key"

RunManager = CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None


class KvrtChatModel(ChatOpenAI):
    """A chat model served by the kvrt daemon at `base_url` (with or without `/v1`).

    `model=None` is the daemon's served model; `api_key=None` suits a daemon without keys.
    Other keyword arguments are ChatOpenAI's. Inside a graph returned by `register`, every call
    (invoke, ainvoke, stream, astream, with or without bound tools) is attributed to the run of
    its LangGraph thread and the agent of its node; elsewhere calls are plain.
    """

    # The event loop the async client's connections belong to (see _async_client_for_loop).
    _client_loop: weakref.ref[asyncio.AbstractEventLoop] | None = PrivateAttr(default=None)

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        api_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        options: dict[str, Any] = {
            # The daemon serves chat completions only, not OpenAI's Responses API.
            "use_responses_api": False,
            # ChatOpenAI asks for usage in streams only from api.openai.com; the daemon has it.
            "stream_usage": True,
            **kwargs,
        }
        super().__init__(base_url=openai_base_url(base_url), model=model or SERVED_MODEL,
                         max_tokens=max_tokens, temperature=temperature,
                         api_key=api_key or NO_KEY, **options)

    @property
    def _llm_type(self) -> str:
        return "kvrt-chat"

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None,
                             **kwargs: Any) -> dict[str, Any]:
        payload = super()._get_request_payload(input_, stop=stop, **kwargs)
        if self.model_name == SERVED_MODEL:
            payload["model"] = None
        return payload

    # Each entry point LangChain calls places the call, then leaves the rest to ChatOpenAI.
    # A call refused because the daemon ended its thread's run by itself (idle past its
    # timeout, a restart) or no longer knows it is placed again, in a new run of the thread,
    # once (threads.ENDED_CODES).

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        placed = self._placed_sync(run_manager, kwargs)
        try:
            return super()._generate(messages, stop, run_manager, **placed)
        except openai.APIStatusError as exc:
            if not _forget_ended_run(exc, run_manager, placed):
                raise
        return super()._generate(messages, stop, run_manager,
                                 **self._placed_sync(run_manager, kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        placed = await self._placed_async(run_manager, kwargs)
        try:
            return await super()._agenerate(messages, stop, run_manager, **placed)
        except openai.APIStatusError as exc:
            if not _forget_ended_run(exc, run_manager, placed):
                raise
        return await super()._agenerate(messages, stop, run_manager,
                                        **await self._placed_async(run_manager, kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        placed = self._placed_sync(run_manager, kwargs)
        streamed = False
        try:
            for chunk in super()._stream(messages, stop, run_manager, **placed):
                streamed = True
                yield chunk
            return
        except openai.APIStatusError as exc:
            if streamed or not _forget_ended_run(exc, run_manager, placed):
                raise
        yield from super()._stream(messages, stop, run_manager,
                                   **self._placed_sync(run_manager, kwargs))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        placed = await self._placed_async(run_manager, kwargs)
        streamed = False
        try:
            async for chunk in super()._astream(messages, stop, run_manager, **placed):
                streamed = True
                yield chunk
            return
        except openai.APIStatusError as exc:
            if streamed or not _forget_ended_run(exc, run_manager, placed):
                raise
        async for chunk in super()._astream(messages, stop, run_manager,
                                            **await self._placed_async(run_manager, kwargs)):
            yield chunk

    def _placed_sync(self, run_manager: RunManager, kwargs: dict[str, Any]) -> dict[str, Any]:
        call = _placed(run_manager)
        if call is None:
            return kwargs
        call.binding.lifecycle.saw(call.thread, call.agent)
        return self._attributed(kwargs, call.binding.runs.run_sync(call.thread).id, call)

    async def _placed_async(self, run_manager: RunManager, kwargs: dict[str, Any]
                            ) -> dict[str, Any]:
        self._async_client_for_loop()
        call = _placed(run_manager)
        if call is None:
            return kwargs
        call.binding.lifecycle.saw(call.thread, call.agent)
        return self._attributed(kwargs, (await call.binding.runs.run(call.thread)).id, call)

    def _async_client_for_loop(self) -> None:
        """Gives the async client an HTTP connection pool of the running loop's own.

        ChatOpenAI shares one async pool per base URL across the process, and pooled connections
        belong to the loop that opened them: after a first `asyncio.run` ends, the next one's
        calls fail with "Event loop is closed". A user's own `http_async_client` is left alone.
        (The model is not meant to be used from two event loops at the same moment.)"""
        loop = asyncio.get_running_loop()
        if self._client_loop is not None and self._client_loop() is loop:
            return
        if self.http_async_client is None:
            self.root_async_client = self.root_async_client.copy(
                http_client=openai.DefaultAsyncHttpxClient())
            self.async_client = self.root_async_client.chat.completions
        self._client_loop = weakref.ref(loop)

    def _attributed(self, kwargs: dict[str, Any], run_id: str, call: NodeCall
                    ) -> dict[str, Any]:
        """`kwargs` with the attribution added to the body's extras (the model's own
        `extra_body` and the call's are kept: a call's `extra_body` would replace the model's)."""
        extra = {**(self.extra_body or {}), **(kwargs.get("extra_body") or {}),
                 "kvrt": {"run": run_id, "agent": call.agent}}
        return {**kwargs, "extra_body": extra}


def _forget_ended_run(exc: openai.APIStatusError, run_manager: RunManager,
                      placed: dict[str, Any]) -> bool:
    """Whether `exc` refused a placed call because the daemon ended its run by itself; if so,
    the thread forgets that run, so that placing the call again starts a new one."""
    attributed = (placed.get("extra_body") or {}).get("kvrt")
    call = _placed(run_manager)
    if exc.code not in ENDED_CODES or attributed is None or call is None:
        return False
    call.binding.runs.forget(call.thread, attributed["run"])
    return True


def _placed(run_manager: RunManager) -> NodeCall | None:
    """Where the call runs, from its callback manager (which carries the run config's metadata
    and handlers), or from the run config itself when called without one."""
    if run_manager is not None:
        return locate(run_manager.metadata, run_manager.handlers)
    return locate(*in_config(ensure_config()))


def openai_base_url(base_url: str) -> str:
    """The daemon's URL as the openai client wants it: ending in /v1."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"
