"""The engine side of AsyncEngine: commands in, steps, outputs out.

A driver runs the worker (runtime/engine/async_engine.py's ThreadDriver on the engine thread;
kvrt sim's on its simulated-time loop), never two calls at once. Commands (add, abort, notify,
set_priorities, set_outlook, release_run, abort_all, sample_shared_text, ping) come from the
event loop through `send` (and `landed` from the KV mover's thread, to wake a driver waiting on
it); outputs, errors and run releases go back to the loop through its `LoopSide`, thread-safely.
Once the worker shuts down the inbox is closed under a lock and drained, so no command is ever
left unanswered.

`step` aborts the requests past their `timeout_s` first (RequestTimedOut). A step whose batch
raises fails the requests that fail alone (StepFailed, Engine._isolate), delivers its
batch-mates' outputs, and the worker goes on; any other failure of a step fails every live
request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Protocol, TypeAlias

from kvrt.runtime.engine.engine import Emitted, Engine, RunRelease
from kvrt.runtime.engine.protocol import EngineError, GenerateOutput, RequestTimedOut, StepFailed

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # a driver ticks an idle engine at least this often (the policy's timers)

Delivery: TypeAlias = list[Emitted] | list[tuple[str, GenerateOutput | BaseException]]


class LoopSide(Protocol):
    """What the worker hands back to the event loop (called on the loop)."""

    def deliver(self, items: Delivery) -> None: ...  # each request's next output, or its error

    def ended(self, run: str, release: RunRelease, future: asyncio.Future[int]) -> None: ...


class EngineWorker:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, side: LoopSide) -> None:
        self.engine, self.loop, self.side = engine, loop, side
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()  # orders "send" against "close and drain"
        self._inbox_closed = False
        self.idle = threading.Event()  # set once it has no work and every command is handled
        self.stopping = threading.Event()

    # -- the loop's side ---------------------------------------------------------------------

    def send(self, kind: str, payload: Any) -> bool:
        """Queues a command; False once the worker is closing."""
        with self._inbox_lock:
            if self._inbox_closed:
                return False
            self._inbox.put((kind, payload))
            return True

    def has_commands(self) -> bool:
        return not self._inbox.empty()

    # -- the driver's side -------------------------------------------------------------------

    def handle_commands(self, block: bool) -> None:
        """Applies every queued command (waiting up to IDLE_WAIT_S for one if `block`)."""
        try:
            command = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
        if not self.engine.has_work():
            self.idle.set()

    def step(self) -> list[Emitted]:
        """Expires the requests past their time, runs one engine step (the policy ticks first);
        returns what it emitted, for the driver to deliver."""
        for request_id in self.engine.expire():
            self._deliver_error(request_id, RequestTimedOut(
                "the request did not finish within the server's time limit "
                "(queue time included) and was aborted"))
        emitted: list[Emitted] = []
        try:
            emitted = self.engine.step()
        except StepFailed as failure:  # one bad request must not take the engine down
            log.error("%s; aborted %s", failure, ", ".join(failure.request_ids),
                      exc_info=failure.__cause__)
            for request_id in failure.request_ids:
                self._deliver_error(request_id, failure)
            emitted = failure.emitted  # its batch-mates' outputs
        except Exception as error:  # before the batch ran (scheduling): nothing is known good
            log.exception("engine step failed; failing the requests in flight")
            for request_id in self.engine.fail_all():
                self._deliver_error(request_id, EngineError(f"engine step failed: {error}"))
        if not self.engine.has_work():
            self.idle.set()
        return emitted

    def wait_for_landing(self) -> None:
        """Sleeps until a KV move lands or a command comes (at most IDLE_WAIT_S): for a step
        that ran nothing because its work waits on moves in flight."""
        self.engine.on_next_landing(lambda: self.send("landed", None))
        self.handle_commands(block=True)

    def tick(self) -> None:
        try:
            self.engine.tick()
        except Exception:
            log.exception("the policy failed on a tick")

    def post(self, emitted: list[Emitted]) -> None:
        """Delivers a step's outputs from any thread."""
        if emitted:
            self._loop_call(self.side.deliver, emitted)

    def shut_down(self) -> None:
        """Fails what is in flight, answers what is queued, lets the KV moves land."""
        reason = "is shutting down" if self.stopping.is_set() else "thread failed"
        for request_id in self.engine.fail_all():
            self._deliver_error(request_id, EngineError(f"the engine {reason}"))
        self._close_inbox(EngineError(f"the engine {reason}"))
        self.engine.close()

    # -- internals ---------------------------------------------------------------------------

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
                self.release_run(*payload)
            elif kind == "abort_all":  # the shutdown failed every live request already
                self._loop_call(settle, payload[1], 0)

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            try:
                self.engine.add(payload)
            except EngineError as error:
                self._deliver_error(payload.request_id, error)
            except Exception as error:  # a bad request must not take the engine thread down
                log.exception("could not add request %s", payload.request_id)
                self._deliver_error(payload.request_id,
                                    EngineError(f"could not add the request: {error}"))
        elif kind == "abort":
            self.engine.abort(payload)
        elif kind == "notify":
            try:
                self.engine.notify(payload)
            except Exception:  # a policy's failure must not take the engine thread down
                log.exception("the policy failed on %s", payload)
        elif kind == "set_priorities":
            try:
                self.engine.set_priorities(*payload)
            except Exception:  # a policy's failure must not take the engine thread down
                log.exception("the policy failed on the priorities of run %s", payload[0])
        elif kind == "set_outlook":
            try:
                self.engine.set_outlook(*payload)
            except Exception:  # a policy's failure must not take the engine thread down
                log.exception("the policy failed on the outlook of run %s", payload[0])
        elif kind == "release_run":
            self.release_run(*payload)
        elif kind == "sample_shared_text":
            try:
                self.engine.sample_shared_text()
            except Exception:  # a measurement must not take the engine thread down
                log.exception("could not sample the blocks held for shared text")
        elif kind == "abort_all":
            failure, future = payload
            aborted = self.engine.fail_all()
            for request_id in aborted:
                self._deliver_error(request_id, failure)
            self._loop_call(settle, future, len(aborted))

    def release_run(self, run: str, future: asyncio.Future[int]) -> None:
        try:
            release = self.engine.release_run(run)
        except Exception as error:  # a failed release must not take the engine thread down
            log.exception("could not release run %s", run)
            self._loop_call(settle, future, EngineError(f"could not release run {run}: {error}"))
            return
        self._loop_call(self.side.ended, run, release, future)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._loop_call(self.side.deliver, [(request_id, error)])

    def _loop_call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed under us during shutdown
            pass


def settle(future: asyncio.Future[int], outcome: int | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
