"""Runs the engine on its own thread and gives the asyncio side an async interface.

The event loop never runs torch. Commands (add, abort, notify, release_run) go to the engine
thread through a queue; outputs come back with `call_soon_threadsafe`, one asyncio.Queue per live
request. Once the thread is closing, the inbox is closed under a lock and drained, so no command
is ever left unanswered. While it has no work, the thread wakes at least every `_IDLE_WAIT_S` and
ticks the engine, so the policy's timers (pin expiries) run between calls too.

Before each step the thread aborts the requests past their `timeout_s` (RequestTimedOut). A step
that raises fails the requests of its batch (StepFailed) and the thread goes on; any other
failure of a step fails every live request. The loop side counts what waits for the engine
(`load`: queued requests and tokens, the drain rate) for the server's admission control.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Emitted, Engine, RunRelease
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.engine.protocol import (
    AgentEvent,
    AgentResidency,
    EngineError,
    EngineLoad,
    EngineStats,
    GenerateOutput,
    GenerateRequest,
    RequestTimedOut,
    RunEnded,
    StepFailed,
)
from kvrt.runtime.engine.queue_meter import QueueMeter

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05


class AsyncEngine:
    """Implements `EngineClient` (runtime/engine/protocol.py)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()  # orders "send" against "close and drain"
        self._inbox_closed = False
        self._streams: dict[str, asyncio.Queue[GenerateOutput | BaseException]] = {}
        self._queue = QueueMeter()  # touched on the loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._idle = threading.Event()

    @classmethod
    def create(cls, config: EngineConfig, served_model_name: str | None = None) -> AsyncEngine:
        """Loads the model and builds the engine (blocking: call it off the event loop)."""
        engine, checkpoint = build_engine(config)
        return cls(engine, served_model_name or checkpoint.name)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvrt-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stops the thread (failing what is live), then checks and logs that every request's
        KV was released and the pool is consistent."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._check_released()

    def _check_released(self) -> None:
        stats = self.engine.stats()
        held = stats.kv_blocks_in_use - stats.kv_blocks_pinned
        try:
            self.engine.check_integrity()
        except AssertionError as error:
            log.error("engine stopped; the KV pool is inconsistent: %s", error)
            return
        if held:
            log.error("engine stopped; %d KV blocks are still held by requests", held)
        else:
            log.info("engine stopped; all request KV released (%d blocks cached, %d pinned)",
                     stats.kv_blocks_cached, stats.kv_blocks_pinned)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def validate(self, request: GenerateRequest) -> None:
        self.engine.validate(request)  # reads only what never changes: safe off the thread

    def load(self) -> EngineLoad:
        queue = self._queue
        return EngineLoad(queue.requests, queue.tokens, len(self._streams), queue.drain_per_s())

    async def abort_all(self, error: EngineError) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._send("abort_all", (error, future)):
            return 0  # no engine thread: its shutdown failed whatever was live
        return await future

    def kv_residency(self, run: str) -> dict[str, AgentResidency]:
        return self.engine.kv_residency(run)  # the ledger locks: no trip to the engine thread

    def notify(self, event: AgentEvent) -> None:
        self._send("notify", event)  # with the engine down there is no policy left to tell

    async def release_run(self, run: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._send("release_run", (run, future)):
            if self._thread is not None:  # closing: let it finish before touching the engine
                await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            # No engine thread (never started, or gone): nobody else touches the engine now.
            self._ended(run, self.engine.release_run(run), future)
        return await future

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Waits until the engine thread has no work and has handled every command sent."""
        self._idle.clear()
        if not self._send("ping", None):
            return  # no engine thread: nothing is in flight
        await asyncio.get_running_loop().run_in_executor(None, self._idle.wait, timeout)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        if not self.is_alive():
            raise EngineError("the engine is not running")
        self.engine.validate(request)  # rejects before anything is queued
        stream: asyncio.Queue[GenerateOutput | BaseException] = asyncio.Queue()
        self._streams[request.request_id] = stream
        if not self._send("add", request):
            self._streams.pop(request.request_id, None)
            raise EngineError("the engine is not running")
        self._queue.enter(request.request_id, len(request.prompt_token_ids))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                failed = isinstance(item, BaseException)
                self._queue.leave(request.request_id, served=not failed)
                if failed:
                    finished = True  # the engine delivers an error only after dropping the request
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self._queue.leave(request.request_id, served=False)
            self._streams.pop(request.request_id, None)
            if not finished:  # the consumer went away (client disconnect): free the KV
                self._send("abort", request.request_id)

    def _send(self, kind: str, payload: Any) -> bool:
        """Queues a command for the engine thread; False once the thread is closing or gone."""
        with self._inbox_lock:
            if self._inbox_closed or not self.is_alive():
                return False
            self._inbox.put((kind, payload))
            return True

    # -- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._handle_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    for request_id in self.engine.expire():
                        self._deliver_error(request_id, RequestTimedOut(
                            "the request did not finish within the server's time limit "
                            "(queue time included) and was aborted"))
                    emitted = self._step()  # ticks the policy itself
                    if emitted:
                        self._loop_call(self._deliver, emitted)
                else:
                    self._tick()
        finally:  # stopping, or a bug escaped: no stream may wait forever
            self._shut_down()

    def _shut_down(self) -> None:
        """Fails what is in flight, answers what is queued, lets the KV moves land."""
        reason = "is shutting down" if self._stopping.is_set() else "thread failed"
        for request_id in self.engine.fail_all():
            self._deliver_error(request_id, EngineError(f"the engine {reason}"))
        self._close_inbox(EngineError(f"the engine {reason}"))
        self.engine.close()

    def _close_inbox(self, error: EngineError) -> None:
        """Answers the commands sent before the inbox closed: adds fail, releases still run,
        aborts find nothing left."""
        with self._inbox_lock:
            self._inbox_closed = True
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._deliver_error(payload.request_id, error)
            elif kind == "release_run":
                self._release_run(*payload)
            elif kind == "abort_all":  # the shutdown failed every live request already
                self._loop_call(_settle, payload[1], 0)

    def _handle_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
        if not self.engine.has_work():
            self._idle.set()

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            try:
                self.engine.add(payload)
            except Exception as error:  # a bad request must not take the engine thread down
                if not isinstance(error, EngineError):
                    log.exception("could not add request %s", payload.request_id)
                    error = EngineError(f"could not add the request: {error}")
                self._deliver_error(payload.request_id, error)
        elif kind == "abort":
            self.engine.abort(payload)
        elif kind == "notify":
            try:
                self.engine.notify(payload)
            except Exception:  # a policy's failure must not take the engine thread down
                log.exception("the policy failed on %s", payload)
        elif kind == "release_run":
            self._release_run(*payload)
        elif kind == "abort_all":
            error, future = payload
            aborted = self.engine.fail_all()
            for request_id in aborted:
                self._deliver_error(request_id, error)
            self._loop_call(_settle, future, len(aborted))

    def _tick(self) -> None:
        try:
            self.engine.tick()
        except Exception:
            log.exception("the policy failed on a tick")

    def _release_run(self, run: str, future: asyncio.Future[int]) -> None:
        try:
            release = self.engine.release_run(run)
        except Exception as error:  # a failed release must not take the engine thread down
            log.exception("could not release run %s", run)
            self._loop_call(_settle, future, EngineError(f"could not release run {run}: {error}"))
            return
        self._loop_call(self._ended, run, release, future)

    def _step(self) -> list[Emitted]:
        """One engine step; what it emitted, for the caller to deliver."""
        emitted: list[Emitted] = []
        try:
            emitted = self.engine.step()
        except StepFailed as failure:  # one bad batch must not take the engine down
            log.error("%s; aborted %s", failure, ", ".join(failure.request_ids),
                      exc_info=failure.__cause__)
            for request_id in failure.request_ids:
                self._deliver_error(request_id, failure)
        except Exception as error:  # before the batch ran (scheduling): nothing is known good
            log.exception("engine step failed; failing the requests in flight")
            for request_id in self.engine.fail_all():
                self._deliver_error(request_id, EngineError(f"engine step failed: {error}"))
        if not self.engine.has_work():
            self._idle.set()
        return emitted

    def _loop_call(self, fn, *args) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed under us during shutdown
            pass

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._loop_call(self._deliver, [(request_id, error)])

    def _deliver(self, emitted: list[Emitted] | list[tuple[str, BaseException]]) -> None:
        for request_id, item in emitted:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(item)

    def _ended(self, run: str, release: RunRelease, future: asyncio.Future[int]) -> None:
        """On the loop: the run's aborted streams end with RunEnded, then the caller resumes."""
        self._deliver([(rid, RunEnded(f"run {run} was ended")) for rid in release.aborted])
        _settle(future, release.freed_blocks)


def _settle(future: asyncio.Future[int], outcome: int | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
