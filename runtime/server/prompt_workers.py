"""Threads that build calls off the event loop: template rendering and tokenization.

Tokenizing a prompt of megabytes takes seconds, and rendering a round's thousands of prompts
as long; on the loop, that time is taken from every other client, /health included. Handlers
hand the building of their calls (model_calls.py: a chat call, a completion, all the calls of
a round in one job) to these threads and await it. What touches run state (contexts,
admission, submission) stays on the loop, and `build_calls` checks after the await that what
held before it still does: the server takes work, and the call's run is live.

Each thread holds its own copy of the tokenizer, made with the pool (with the app, before it
serves: a copy holds the GIL for ~0.1 s with SmolLM2's, which no call should cost the loop). A
Hugging Face fast tokenizer is one Rust object behind a RefCell: a call that borrows it mutably
(transformers resets truncation or padding before encoding when they differ from the call's)
while another thread encodes fails with "RuntimeError: Already borrowed". kvrt's own calls
borrow it only to read, but a copy per thread does not depend on that.

Tokenization in Rust releases the GIL, so the threads encode in parallel with the loop and
with each other; rendering a template is Python, and the loop gets the GIL back within the
switch interval (5 ms). Decoding a JSON body (msgspec) holds the GIL throughout, so a thread
would gain nothing: it stays on the loop (a 64 MiB text: 25 ms on an idle core, up to ~250 ms
on a loaded one; only another process could take that off the loop).
"""

from __future__ import annotations

import asyncio
import copy
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from kvrt.runtime.graph.runs import Run
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.admission import ADMISSION
from kvrt.runtime.server.openai_requests import ServedModel

T = TypeVar("T")

# Rendering shares the GIL, so threads past a few add memory (a tokenizer copy each), not speed.
MAX_THREADS = 4


@dataclass(frozen=True, slots=True)
class ThreadModel:
    """The served model as one worker thread sees it: the engine's name and context length,
    the thread's own tokenizer."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer


class PromptWorkers:
    """A pool of `threads` threads (default: one per core the process may use, at most
    MAX_THREADS) that run `build(model)` jobs; `close` waits for the jobs running."""

    def __init__(self, model: ServedModel, threads: int | None = None) -> None:
        self._model = model  # for a job run on the loop's own thread (kvrt sim's loop does)
        self._local = threading.local()
        self.threads = threads or min(len(os.sched_getaffinity(0)), MAX_THREADS)
        self._models: queue.SimpleQueue[ThreadModel] = queue.SimpleQueue()
        for _ in range(self.threads):
            self._models.put(_own_model(model))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kvrt-prompt",
                                        initializer=self._take, initargs=(self._models,))

    async def run(self, build: Callable[[ServedModel], T]) -> T:
        # run_in_executor, not a bare future: kvrt sim's loop stops its clock while it runs.
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._build, build)

    def close(self) -> None:
        """Waits for the jobs running, and lets go of the tokenizer copies: the threads' go
        with them, and those of threads never started (the pool starts one per job waiting,
        up to `threads`) leave the queue. The app may outlive its serving (aiohttp caches
        middleware chains by app), and with it this object."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        while not self._models.empty():
            self._models.get_nowait()

    def _take(self, models: queue.SimpleQueue[ThreadModel]) -> None:
        self._local.model = models.get_nowait()  # one a thread, as each starts

    def _build(self, build: Callable[[ServedModel], T]) -> T:
        return build(getattr(self._local, "model", self._model))


def _own_model(model: ServedModel) -> ThreadModel:
    tokenizer = model.tokenizer
    own = Tokenizer(copy.deepcopy(tokenizer.hf), tokenizer.eos_token_ids)
    return ThreadModel(model.model_name, model.max_model_len, own)


PROMPT_WORKERS = web.AppKey("prompt_workers", PromptWorkers)


async def build_calls(request: web.Request, build: Callable[[ServedModel], T],
                      run: Run | None) -> T:
    """`build(model)` run by the app's workers; then, back on the loop, a 503 if the server
    began draining meanwhile, or a 404 if `run` (the calls' run, if any) ended (as for a run
    that does not exist)."""
    built = await request.app[PROMPT_WORKERS].run(build)
    refusal = request.app[ADMISSION].unavailable()
    if refusal is not None:
        raise refusal
    if run is not None:
        request.app[app_keys.CONTROL].live_run(run.id, run.tenant)
    return built
