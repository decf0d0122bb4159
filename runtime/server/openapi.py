"""GET /openapi.json, generated from the same Structs the routes decode and encode."""

from __future__ import annotations

from typing import Any

import msgspec

from kvrt.sdk.protocol import control, rounds
from kvrt.sdk.protocol.errors import ErrorResponse
from kvrt.sdk.protocol.openai_api import (
    SCHEMA_TYPES,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Health,
    ModelList,
)

_REF = "#/components/schemas/{name}"


def build_openapi(version: str) -> dict[str, Any]:
    types = (*SCHEMA_TYPES, *control.SCHEMA_TYPES, *rounds.SCHEMA_TYPES)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    ref = dict(zip(types, schemas))
    errors = {"default": _body("An error, in OpenAI's shape.", ref[ErrorResponse])}
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvrt", "version": version,
                 "description": "KV-cache runtime for multi-agent LLM serving."},
        "paths": {
            "/v1/chat/completions": _generate_op(
                "Chat completion", ref[ChatCompletionRequest], ref[ChatCompletion],
                ref[ChatCompletionChunk], errors),
            "/v1/completions": _generate_op(
                "Text completion", ref[CompletionRequest], ref[Completion], ref[Completion],
                errors),
            "/v1/models": {"get": {"summary": "The served model", "responses": {
                "200": _body("Model list", ref[ModelList]), **errors}}},
            "/health": {"get": {"summary": "200 when ready; 503 while starting or draining, or "
                                           "with the engine down",
                                "responses": {"200": _body("Alive", ref[Health]), **errors}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (kvrt:*); with keys set, the "
                                            "operator's (--admin-key): 403 to a tenant's key",
                                 "responses": {
                "200": {"description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **errors}}},
            **_control_paths(ref, errors),
        },
        "components": {"schemas": components},
    }


def _generate_op(summary: str, request: dict, response: dict, chunk: dict, errors: dict) -> dict:
    return {"post": {
        "summary": summary,
        "parameters": [
            {"name": "X-Kvrt-Run", "in": "header", "required": False, "schema": {"type": "string"}},
            {"name": "X-Kvrt-Agent", "in": "header", "required": False,
             "schema": {"type": "string"}},
            # A session's key, as the body's prompt_cache_key (server/implicit_runs.py).
            {"name": "X-Session-Id", "in": "header", "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {
                "description": "The result; with `stream: true`, server-sent events each "
                               "carrying one chunk, then `data: [DONE]`",
                "content": {"application/json": {"schema": response},
                            "text/event-stream": {"schema": _sse_event(chunk)}},
            },
            **errors,
        },
    }}


def _sse_event(chunk: dict) -> dict:
    """One server-sent event of a stream (OpenAPI 3.1 describes each event: its `data` is a
    string): a JSON chunk, or the closing `[DONE]`."""
    return {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": chunk}}}}


def _with_response(spec: dict, status: str, response: dict) -> dict:
    spec["responses"][status] = response
    return spec


def _control_paths(ref: dict, errors: dict) -> dict:
    def op(summary: str, ok: str, response: type, request: type | None = None,
           params: tuple[str, ...] = ()) -> dict:
        spec: dict[str, Any] = {"summary": summary,
                                "responses": {ok: _body(summary, ref[response]), **errors}}
        if request is not None:
            spec["requestBody"] = {"required": True,
                                   "content": {"application/json": {"schema": ref[request]}}}
        if params:
            spec["parameters"] = [{"name": p, "in": "path", "required": True,
                                   "schema": {"type": "string"}} for p in params]
        return spec

    graph, run = ("graph_id",), ("run_id",)
    return {
        "/v1/graphs": {
            "post": op("Declare an agent graph", "201", control.GraphInfo, control.GraphSpec),
            "get": {**op("List graphs, a page in creation order", "200", control.GraphList),
                    "parameters": _page_params()}},
        "/v1/graphs/{graph_id}": {
            "get": op("A graph, with its critical path and priorities", "200",
                      control.GraphInfo, params=graph),
            "delete": op("Delete a graph without live runs", "200", control.Deleted,
                         params=graph)},
        "/v1/runs": {
            "post": _with_response(
                op("Start a run of a graph", "201", control.RunInfo, control.RunSpec), "200",
                _body("The live run of the graph with the given key", ref[control.RunInfo])),
            "get": {**op("List live, interrupted and expired runs, a page in creation order",
                         "200",
                         control.RunList), "parameters": [
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                for name in ("graph_id", "key")] + _page_params()}},
        "/v1/runs/{run_id}": {
            "get": op("A run's agents: state, priority, KV residency", "200", control.RunState,
                      params=run),
            "delete": op("End a run and release its KV", "200", control.RunClosed, params=run)},
        "/v1/runs/{run_id}/events": {
            "post": op("Report a tool call or an agent's end (idempotent)", "200",
                       control.EventAck, control.Event, params=run)},
        "/v1/runs/{run_id}/rounds": {
            "post": op("Run one All-Gather round: every agent reads the shared messages and "
                       "generates", "200", rounds.RoundResult, rounds.RoundRequest,
                       params=run)},
    }


def _page_params() -> list[dict]:
    """A listing's `limit` and `after` (runtime/server/control_routes.py)."""
    limit = {"type": "integer", "minimum": 1, "maximum": control.MAX_PAGE_LIMIT,
             "default": control.DEFAULT_PAGE_LIMIT}
    return [{"name": "limit", "in": "query", "required": False, "schema": limit},
            {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "list the items after this id (one deleted since too)"}]


def _body(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_json(version: str) -> bytes:
    return msgspec.json.encode(build_openapi(version))
