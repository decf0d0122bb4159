"""One LangGraph thread is one kvrt run: the live runs of one registered graph, by thread.

A thread's run is started by its first model call or tool event, as `POST /v1/runs {graph_id,
key: thread}`: the daemon returns the graph's live run of that key if there is one, so nodes of
one thread that start at once (or other processes) all get the same run. Runs are cached here
and closed only when asked (`close`): a thread may be resumed later. A run the daemon ended
by itself (`run_expired`: idle past `--run-idle-timeout`; `run_interrupted`: a restart) or no
longer knows (`run_not_found`) is forgotten when a call or event of the thread is refused for
it, and the thread goes on in a new run of its key (`ENDED_CODES`; the model's calls retry
the same way, model.py).

Calls come from async code (on the application's loop, through the SDK's `Client`) and from
synchronous code (a sync node, a sync `invoke`, LangChain's sync callbacks, possibly while
blocking that loop), which cannot wait on the loop: those go over a small blocking HTTP
client of their own.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx
import msgspec

from kvrt.sdk.client import Client
from kvrt.sdk.errors import (
    KvrtConnectionError,
    KvrtError,
    KvrtTimeoutError,
    error_from_response,
)
from kvrt.sdk.protocol.control import (
    MAX_PAGE_LIMIT,
    Event,
    EventAck,
    GraphInfo,
    GraphList,
    GraphSpec,
    RunClosed,
    RunInfo,
    RunList,
    RunSpec,
)
from kvrt.sdk.run import Run

T = TypeVar("T")
P = TypeVar("P", GraphList, RunList)

_SYNC_TIMEOUT = 30.0  # seconds; control-plane calls answer in milliseconds
# The codes of a remembered run the daemon ended by itself (409: idle past its timeout, or
# interrupted by a restart) or no longer knows (404: forgotten after its expiry, ended by
# another process, a daemon without a state dir restarted): the thread starts a new one.
ENDED_CODES = frozenset({"run_expired", "run_interrupted", "run_not_found"})


class SyncHttp:
    """The daemon's control plane from synchronous code: a blocking client of its own, opened
    on first use."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        self.base_url, self.headers = base_url, headers
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: Any, kind: type[T]) -> T:
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(base_url=self.base_url, headers=self.headers,
                                          timeout=_SYNC_TIMEOUT)
            http = self._http
        content = None if body is None else msgspec.json.encode(body)
        try:
            reply = http.request(method, path, content=content,
                                 headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            raise KvrtTimeoutError(f"{method} {self.base_url}{path} timed out: nothing for "
                                   f"{_SYNC_TIMEOUT:g} s ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise KvrtConnectionError(f"{method} {self.base_url}{path}: connection failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
        if not 200 <= reply.status_code < 300:
            raise error_from_response(reply.status_code, reply.content)
        return msgspec.json.decode(reply.content, type=kind)

    def pages(self, path: str, filters: dict[str, str], kind: type[P]) -> list[P]:
        """Every page of a listing (as the async Client's list calls fetch them)."""
        pages: list[P] = []
        query: dict[str, str | int] = {**filters, "limit": MAX_PAGE_LIMIT}
        while not pages or pages[-1].has_more:
            pages.append(self.request("GET", f"{path}?{urlencode(query)}", None, kind))
            query["after"] = pages[-1].last_id or ""
        return pages

    def declared(self, spec: GraphSpec, same: Any) -> GraphInfo:
        """The graph on the daemon that `same(spec, info)` finds, else a new one."""
        graphs = (info for page in self.pages("/v1/graphs", {}, GraphList) for info in page.data)
        found = next((info for info in graphs if same(spec, info)), None)
        return found or self.request("POST", "/v1/graphs", spec, GraphInfo)

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()


class ThreadRuns:
    def __init__(self, client: Client, graph: GraphInfo, http: SyncHttp | None = None) -> None:
        self.client = client
        self.graph = graph
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()  # sync callers run on worker threads
        self.http = http or SyncHttp(client.base_url, client.headers)

    def threads(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    async def run(self, thread: str) -> Run:
        """The thread's run, started if it has none (async callers)."""
        run = self._runs.get(thread)
        if run is None:
            run = self._remember(thread, await self.client.start_run(self.graph, key=thread))
        return run

    def run_sync(self, thread: str) -> Run:
        """The thread's run, started if it has none (synchronous callers)."""
        run = self._runs.get(thread)
        if run is None:
            spec = RunSpec(graph_id=self.graph.id, key=thread)
            info = self.http.request("POST", "/v1/runs", spec, RunInfo)
            run = self._remember(thread, self.client.run(info, self.graph))
        return run

    def forget(self, thread: str, run_id: str) -> None:
        """The daemon ended the thread's run `run_id`: the thread's next call starts a new
        one (a newer run already remembered for the thread is kept)."""
        with self._lock:
            if (run := self._runs.get(thread)) is not None and run.id == run_id:
                del self._runs[thread]

    def send_sync(self, thread: str, event: Event) -> Run:
        """Sends the event to the thread's run (started if it has none, again if the daemon
        ended it by itself); returns the run it went to."""
        run = self.run_sync(thread)
        try:
            self.event_sync(run, event)
        except KvrtError as exc:
            if exc.code not in ENDED_CODES:
                raise
            self.forget(thread, run.id)
            run = self.run_sync(thread)
            self.event_sync(run, event)
        return run

    def event_sync(self, run: Run, event: Event) -> EventAck:
        """Sends one event from synchronous code (with a fresh id, as `Run.event` does)."""
        event = msgspec.structs.replace(event, id=event.id or uuid.uuid4().hex)
        return self.http.request("POST", f"/v1/runs/{quote(run.id, safe='')}/events", event,
                                 EventAck)

    async def close(self, thread: str) -> RunClosed | None:
        """Ends the thread's live run, if it has one (known here or found on the daemon)."""
        with self._lock:
            run = self._runs.pop(thread, None)
        if run is not None:
            try:
                return await run.close()
            except KvrtError as exc:  # gone already: the thread may have another run
                if exc.code not in ENDED_CODES:
                    raise
        found = await self.client.list_runs(self.graph.id, key=thread)
        # Runs a daemon restart interrupted keep their key too; the thread's is the live one.
        live = [info for info in found if info.status == "live"]
        if not live:
            return None
        return await self.client.run(live[0], self.graph).close()

    def close_sync(self, thread: str) -> RunClosed | None:
        """`close` from synchronous code."""
        with self._lock:
            run = self._runs.pop(thread, None)
        if run is not None:
            try:
                return self._delete_sync(run.id)
            except KvrtError as exc:  # gone already: the thread may have another run
                if exc.code not in ENDED_CODES:
                    raise
        pages = self.http.pages("/v1/runs", {"graph_id": self.graph.id, "key": thread}, RunList)
        live = [info for page in pages for info in page.data if info.status == "live"]
        if not live:
            return None
        return self._delete_sync(live[0].id)

    def _delete_sync(self, run_id: str) -> RunClosed:
        return self.http.request("DELETE", f"/v1/runs/{quote(run_id, safe='')}", None,
                                 RunClosed)

    def close_http(self) -> None:
        self.http.close()

    def _remember(self, thread: str, run: Run) -> Run:
        with self._lock:  # the first answer wins; any other is the same run (same key)
            return self._runs.setdefault(thread, run)
