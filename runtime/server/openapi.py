"""GET /openapi.json, generated from the same Structs the routes decode and encode."""

from __future__ import annotations

from typing import Any

import msgspec

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
    schemas, components = msgspec.json.schema_components(SCHEMA_TYPES, ref_template=_REF)
    ref = dict(zip(SCHEMA_TYPES, schemas))
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
            "/v1/models": {"get": {"summary": "The served model",
                                   "responses": {"200": _body("Model list", ref[ModelList])}}},
            "/health": {"get": {"summary": "200 while the engine is alive, 503 otherwise",
                                "responses": {"200": _body("Alive", ref[Health]), **errors}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (kvrt:*)", "responses": {
                "200": {"description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
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
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {
                "description": "The result; with `stream: true`, server-sent events each "
                               "carrying one chunk, then `data: [DONE]`",
                "content": {"application/json": {"schema": response},
                            "text/event-stream": {"schema": chunk}},
            },
            **errors,
        },
    }}


def _body(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_json(version: str) -> bytes:
    return msgspec.json.encode(build_openapi(version))
