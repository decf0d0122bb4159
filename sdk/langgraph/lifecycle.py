"""`Lifecycle`: a thread's invocations as agent events: done when an invocation ends, waiting
while an interrupt holds it, resumed when it is invoked again.

    the graph's root run (one invocation of a thread)   events sent, for the thread's run
    --------------------------------------------------  ------------------------------------
    starts, with agents waiting since the last one      agent.resumed for each
    ends after an interrupt (a node raised              agent.waiting {reason: "interrupt"}
      GraphInterrupt: `interrupt()`)                    for each interrupted agent, and each
                                                        agent heard of since its last done
    ends otherwise (finished, or failed)                agent.done for each agent the
                                                        daemon heard of since its last done

An interrupt is told by the node run that raised GraphInterrupt (GraphWatch records it; the
root run itself ends normally, with `__interrupt__` in its output). The thread waits for a
person, so every agent it ran since their last done waits too: their KV idles as long (a
review node that interrupts holds none; the draft it reviews does). The graph goes on after
the resume, and their done comes when it ends. An interrupt before or after a node
(`interrupt_before=`/`interrupt_after=` at compile) raises in no node, so it ends the
invocation as a finish does; a thread resumed in another process than the one it was
interrupted in sends no agent.resumed (the daemon ends the wait at the agent's next model call
anyway).

`register` gives this handler to the graph's root callback manager only, not to the managers
its nodes inherit: it hears the root run's start and end, a few events per invocation, and
none of the many chain events inside. Like KvrtCallbacks it is synchronous (a worker thread
from `ainvoke`, inline from `invoke`), and LangChain waits for it, so the events are sent
before `ainvoke` returns.
"""

from __future__ import annotations

import threading
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from kvrt.sdk.langgraph.context import run_key
from kvrt.sdk.langgraph.threads import ThreadRuns
from kvrt.sdk.langgraph.watch import GraphWatch
from kvrt.sdk.protocol.control import AgentDone, AgentResumed, AgentWaiting, Event


class Lifecycle(BaseCallbackHandler):
    ignore_llm = True
    ignore_chat_model = True
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True
    ignore_agent = True

    def __init__(self, runs: ThreadRuns, watch: GraphWatch) -> None:
        self.runs = runs
        self.watch = watch
        self._active: dict[str, set[str]] = {}  # thread -> agents heard of since their done
        self._waiting: dict[str, set[str]] = {}  # thread -> agents waiting on an interrupt
        self._roots: dict[UUID, str] = {}  # root run -> thread
        self._lock = threading.Lock()

    def saw(self, thread: str, agent: str) -> None:
        """An agent of the thread made a model call or a tool call."""
        with self._lock:
            self._active.setdefault(thread, set()).add(agent)

    def forget(self, thread: str) -> None:
        """The thread's run was closed: what is known of it ends with it."""
        with self._lock:
            self._active.pop(thread, None)
            self._waiting.pop(thread, None)

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, *, run_id: UUID,
                       metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        thread = (metadata or {}).get("thread_id")
        if thread is None:
            return
        thread = run_key(thread)
        with self._lock:
            self._roots[run_id] = thread
            waiting = self._waiting.pop(thread, set())
        self._send(thread, [AgentResumed(agent=agent) for agent in sorted(waiting)])

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(run_id)

    def _ended(self, run_id: UUID) -> None:
        with self._lock:
            thread = self._roots.pop(run_id, None)
        if thread is None:
            return
        interrupted = self.watch.take_interrupted(thread)
        waiting: set[str] = set()
        with self._lock:
            if interrupted:
                # The whole thread waits for the person, and so does the KV of each agent it
                # ran (a draft's, say, when the interrupt is in a review node of its own).
                active = self._active.setdefault(thread, set())
                active.update(interrupted)  # they ran: done, with the rest, at the end
                waiting = set(active)
                self._waiting.setdefault(thread, set()).update(waiting)
                done: set[str] = set()
            else:
                done = self._active.pop(thread, set())
        events: list[Event] = [AgentWaiting(agent=agent, reason="interrupt")
                               for agent in sorted(waiting)]
        self._send(thread, events + [AgentDone(agent=agent) for agent in sorted(done)])

    def _send(self, thread: str, events: list[Event]) -> None:
        for event in events:
            self.runs.send_sync(thread, event)
