"""`Client`: the async entry point of the SDK, one per daemon.

    async with Client("http://127.0.0.1:8400") as client:
        graph = await client.create_graph(g)
        async with await client.start_run(graph) as run:
            reply = await run.agent("planner").chat([{"role": "user", "content": "..."}])

Calls the daemon refuses raise KvrtError (status, code, message); a daemon that cannot be reached
raises KvrtConnectionError once the retries of an idempotent call are spent (see kvrt.sdk.http).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec

from kvrt.sdk.chat import ChatReply, ChatStream, Message, chat_body, complete
from kvrt.sdk.graph import Graph
from kvrt.sdk.http import Transport
from kvrt.sdk.protocol.control import (
    MAX_PAGE_LIMIT,
    Deleted,
    GraphInfo,
    GraphList,
    GraphSpec,
    RunInfo,
    RunList,
    RunSpec,
    RunState,
)
from kvrt.sdk.protocol.openai_api import Health
from kvrt.sdk.run import Run

T = TypeVar("T")
P = TypeVar("P", GraphList, RunList)

_graph_decoder = msgspec.json.Decoder(GraphInfo)
_health_decoder = msgspec.json.Decoder(Health)
_graph_list_decoder = msgspec.json.Decoder(GraphList)
_deleted_decoder = msgspec.json.Decoder(Deleted)
_run_decoder = msgspec.json.Decoder(RunInfo)
_run_state_decoder = msgspec.json.Decoder(RunState)
_run_list_decoder = msgspec.json.Decoder(RunList)


class Client:
    """A connection to one kvrt daemon.

    `timeout` bounds connecting and each wait for the daemon's next bytes (seconds); `retries`
    and `backoff` govern idempotent calls only (GET, DELETE, events): after a connection failure
    or a 503 they are sent again up to `retries` more times, waiting `backoff`, 2x, 4x... seconds.
    `headers` go with every request; `api_key`, for a daemon started with keys, is sent as
    `Authorization: Bearer KEY` (its tenant then owns the graphs and runs made here).
    Use it as an async context manager, or call `close()` when done.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8400",
        *,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.1,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self._headers = dict(headers or {})
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._transport = Transport(
            base_url, timeout=timeout, retries=retries, backoff=backoff, headers=self._headers
        )

    @property
    def base_url(self) -> str:
        return self._transport.base_url

    @property
    def headers(self) -> dict[str, str]:
        """The headers sent with every request (a copy), for code that must reach the same
        daemon another way (the LangGraph adapter's calls from synchronous code)."""
        return dict(self._headers)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    # ---- graphs --------------------------------------------------------------------------

    async def health(self) -> Health:
        """GET /health: the daemon is ready (else KvrtError 503, its code saying why), and the
        KV policy and host tier it serves with."""
        return await self._get("/health", _health_decoder)

    async def create_graph(self, graph: Graph | GraphSpec) -> GraphInfo:
        spec = graph.spec() if isinstance(graph, Graph) else graph
        return await self._transport.request(
            "POST", "/v1/graphs", _graph_decoder, body=spec, idempotent=False
        )

    async def get_graph(self, graph_id: str) -> GraphInfo:
        return await self._get(f"/v1/graphs/{_q(graph_id)}", _graph_decoder)

    async def list_graphs(self) -> list[GraphInfo]:
        """Every graph of the caller's, in creation order (fetched a page at a time)."""
        return [g for page in await self._pages("/v1/graphs", {}, _graph_list_decoder)
                for g in page.data]

    async def delete_graph(self, graph: GraphInfo | str) -> Deleted:
        """Deletes a graph; KvrtError 409 `graph_in_use` while it has live runs."""
        return await self._transport.request(
            "DELETE", f"/v1/graphs/{_q(_graph_id(graph))}", _deleted_decoder, idempotent=True
        )

    # ---- runs ----------------------------------------------------------------------------

    async def start_run(self, graph: GraphInfo | str, key: str | None = None) -> Run:
        """Starts a run of `graph` (a GraphInfo, or a graph id: its GraphInfo is then fetched,
        for the agents' system prompts). With a `key` (a thread id, say), the graph's live run
        of that key is returned if there is one: a key names one run until that run is closed."""
        graph_id = _graph_id(graph)
        info = await self._transport.request(
            "POST", "/v1/runs", _run_decoder, body=RunSpec(graph_id=graph_id, key=key),
            idempotent=False,
        )
        if not isinstance(graph, GraphInfo):
            graph = await self.get_graph(graph_id)
        return Run(self._transport, info, graph)

    async def get_run(self, run_id: str) -> Run:
        """A handle to a run that already exists (started by this process or another)."""
        state = await self._get(f"/v1/runs/{_q(run_id)}", _run_state_decoder)
        return Run(self._transport, state, await self.get_graph(state.graph_id))

    def run(self, info: RunInfo | RunState, graph: GraphInfo) -> Run:
        """A handle to a run known already (from `list_runs`, say), made without a call."""
        if info.graph_id != graph.id:
            raise ValueError(f"run {info.id} is of graph {info.graph_id}, not {graph.id}")
        return Run(self._transport, info, graph)

    async def list_runs(self, graph_id: str | None = None, key: str | None = None
                        ) -> list[RunInfo]:
        """The caller's runs, of one graph and/or one key if given, in creation order (fetched
        a page at a time): live ones, and those a daemon restart interrupted (`status`
        "interrupted": end them with DELETE)."""
        filters = {name: value for name, value in (("graph_id", graph_id), ("key", key))
                   if value is not None}
        return [r for page in await self._pages("/v1/runs", filters, _run_list_decoder)
                for r in page.data]

    # ---- model calls without attribution -------------------------------------------------

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **extra: Any,
    ) -> ChatReply:
        """A chat completion that belongs to no run (see Run.agent for attributed calls)."""
        body = chat_body(messages, max_tokens=max_tokens, temperature=temperature, extra=extra)
        return await complete(self._transport, body)

    def stream(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **extra: Any,
    ) -> ChatStream:
        body = chat_body(messages, max_tokens=max_tokens, temperature=temperature, extra=extra)
        return ChatStream(self._transport, body)

    async def _get(self, path: str, decoder: msgspec.json.Decoder[T]) -> T:
        return await self._transport.request("GET", path, decoder, idempotent=True)

    async def _pages(self, path: str, filters: dict[str, str],
                     decoder: msgspec.json.Decoder[P]) -> list[P]:
        """Every page of a listing, each after the last id of the one before. Items created
        meanwhile may come at the end; none that lives throughout is missed or repeated."""
        pages: list[P] = []
        query: dict[str, str | int] = {**filters, "limit": MAX_PAGE_LIMIT}
        while not pages or pages[-1].has_more:
            pages.append(await self._get(f"{path}?{urlencode(query)}", decoder))
            query["after"] = pages[-1].last_id or ""
        return pages

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"


def _graph_id(graph: GraphInfo | str) -> str:
    return graph.id if isinstance(graph, GraphInfo) else graph


def _q(part: str) -> str:
    return quote(part, safe="")
