"""Schemathesis against a live tiny daemon: the schema is the daemon's own `/openapi.json`, and
every operation in it is fuzzed (positive and negative bodies, parameters, headers). No answer
may be a 5xx, and every answer must conform to the schema: its status is one the operation
declares, its content type too, and its body validates against that status's schema.

The daemon is fuzzed twice: as it starts by default (no keys), and tight: a tenant's key
(sent with every case), an operator key, and quotas so small that the fuzzing passes them (two
graphs, two runs, 8 KiB of declarations, a queue of two, runs idle for a second expire), so
the quota refusals (429, 413), expired runs (409) and the operator's /metrics (403 to a
tenant) must be documented too.

Generated requests are kept cheap: generation is capped at 4 tokens (`max_tokens`), and the
path ids are either what schemathesis made up (404s) or a live graph and run made beforehand,
so the control plane is fuzzed past its lookups too. Afterwards the daemon still answers a
chat, nothing holds KV, and the pool's integrity holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.content_keywords import SseValidator

from kvrt.runtime.config import ControlConfig, ServerLimits
from tests.server.live_server import LiveServer, good_chat, listed, live_server

MAX_TOKENS = 4
EXAMPLES = 12  # per operation and mode (positive, negative)
CONFIG = schemathesis.Config.from_dict({
    # The fuzzing phase only (the coverage phase's boundary cases are many per operation), in
    # both modes: schema-valid data and data that breaks it. Examples per operation per mode.
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"mode": "all"},
    "request-timeout": 30,
})
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


TENANT_KEY, ADMIN_KEY = "fuzzing-tenant-key", "fuzzing-admin-key"
TIGHT = {
    "api_keys": ((TENANT_KEY, "fuzzer"), ("other-tenant-key", "other")),
    "admin_keys": (ADMIN_KEY,),
    "limits": ServerLimits(max_queued_requests=2),
    "control": ControlConfig(max_graphs_per_tenant=2, max_runs_per_tenant=2,
                             max_graph_bytes_per_tenant=8 * 1024, run_idle_timeout_s=1.0),
}


@pytest.fixture(scope="module", params=["default", "tight"])
def server(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, **(TIGHT if request.param == "tight" else {}))


@pytest.fixture(scope="module")
def auth(server: LiveServer) -> dict[str, str]:
    """The headers every request of the fuzzing carries: the tenant's key, if keys are set."""
    return {"Authorization": f"Bearer {TENANT_KEY}"} if server.config.api_keys else {}


@pytest.fixture(scope="module")
def live_ids(server: LiveServer, auth: dict[str, str]) -> dict[str, str]:
    graph = server.post("/v1/graphs", {"name": "fuzz", "agents": [
        {"name": "planner", "tools": {"search": 1.0}}, {"name": "writer"}],
        "edges": [["planner", "writer"]]}, headers=auth)
    assert graph.status == 201, graph.body
    run = server.post("/v1/runs", {"graph_id": graph.json()["id"]}, headers=auth)
    assert run.status == 201, run.body
    return {"graph_id": graph.json()["id"], "run_id": run.json()["id"]}


@pytest.fixture(scope="module")
def api(server: LiveServer, auth: dict[str, str]) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=CONFIG,
                                           headers=dict(auth))
    schema.config.update(base_url=server.url)
    return schema


GENERATING = ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/runs/{run_id}/rounds")
PROMPT = [{"role": "user", "content": "Hello there"}]


def _cheap(case: schemathesis.Case) -> schemathesis.Case:
    """Generation stays short: at most MAX_TOKENS tokens, whatever was drawn."""
    body = case.body
    if isinstance(body, dict) and case.operation.label in GENERATING:
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[field] = MAX_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
    return case


def _deeper(live_ids: dict[str, str]):
    """Half the cases stay as drawn. The other half reach past the first refusal: path ids
    become the live graph's or run's (not for DELETE: the run must live through the test), and
    a chat keeps its drawn sampling fields with a prompt the model can serve."""

    def choose(case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
        def put(deeper: bool) -> schemathesis.Case:
            if not deeper:
                return case
            params = case.path_parameters or {}
            if params and case.method.upper() != "DELETE":
                case.path_parameters = {**params, **{name: live_ids[name] for name in params
                                                     if name in live_ids}}
            if case.operation.label == GENERATING[0] and isinstance(case.body, dict):
                case.body = {**case.body, "messages": PROMPT}
                case.body.pop("kvrt", None)
            return case

        return st.booleans().map(put)

    return choose


def test_every_operation_answers_by_its_schema_and_never_with_a_5xx(
        api: schemathesis.BaseSchema, live_ids: dict[str, str], auth: dict[str, str]) -> None:
    operations = [result.ok() for result in api.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/runs/{run_id}/events",
            "POST /v1/runs/{run_id}/rounds", "DELETE /v1/graphs/{graph_id}"} <= labels
    calls: dict[str, int] = {}
    statuses: set[tuple[str, int]] = set()
    for operation in operations:
        # Negative data needs something to break: a body (a string id in a path, query or
        # header stays a string, whatever is drawn).
        negatable = bool(operation.body)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if negatable else 1]:
            strategy = operation.as_strategy(mode).flatmap(_deeper(live_ids)).map(_cheap)

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case: schemathesis.Case) -> None:
                # a copy: schemathesis writes into the headers it is given
                response = case.call_and_validate(checks=CHECKS, headers=dict(auth))
                calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
                statuses.add((case.operation.label, response.status_code))

            try:
                fuzz()
            except Exception as exc:
                raise AssertionError(f"fuzzing {operation.label} ({mode.value}) failed") from exc
    assert set(calls) == labels, "an operation was never called"
    if auth:  # the tight daemon: the fuzzing went past the graph quota and the tenant's key
        assert ("POST /v1/graphs", 429) in statuses
        assert ("GET /metrics", 403) in statuses


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", good_chat(stream=True)),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": MAX_TOKENS, "stream": True}),
])
def test_a_stream_conforms_to_its_documented_events(server: LiveServer, auth: dict[str, str],
                                                    path: str, body: dict) -> None:
    """Each server-sent event of a stream validates against the event schema /openapi.json
    documents, as schemathesis checks it (the fuzzing reaches a successful stream only now
    and then): `data` a JSON chunk of the documented schema, or the closing `[DONE]`."""
    doc = server.request("GET", "/openapi.json", headers=auth).json()
    components = doc["components"]["schemas"]

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(components[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    media = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    validator = SseValidator(inline(media["schema"]), jsonschema_rs.Draft202012Validator)
    payloads = server.stream(path, body, headers=auth)
    assert payloads[-1] == "[DONE]" and len(payloads) >= 3
    with validator.with_deserializer(lambda _media_type, text: json.loads(text)):
        for payload in payloads:
            data = payload if payload == "[DONE]" else json.dumps(payload)
            validator.validate({"data": data, "event": "message"})
        chunk = next(p for p in payloads if p != "[DONE]")
        with pytest.raises(jsonschema_rs.ValidationError):  # the chunk's schema is enforced
            validator.validate({"data": json.dumps({**chunk, "choices": "none"})})


def test_after_the_fuzzing_the_daemon_serves_and_holds_no_kv(server: LiveServer,
                                                             auth: dict[str, str]) -> None:
    """Runs after the fuzzing (module order): every stream and run it left is gone."""
    reply = server.post("/v1/chat/completions", good_chat(), headers=auth)
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] >= 1
    for run in listed(server, "/v1/runs", headers=auth):
        assert server.request("DELETE", f"/v1/runs/{run['id']}", headers=auth).status == 200
    deadline = time.monotonic() + 10
    while (stats := server.stats()).running or stats.waiting or stats.kv_blocks_in_use:
        assert time.monotonic() < deadline, f"KV still in use after the fuzzing: {stats}"
        time.sleep(0.05)
    assert stats.kv_blocks_in_use == 0 and stats.kv_blocks_pinned == 0
    server.call(server.engine.wait_idle)
    server.call(_check_integrity(server))


def _check_integrity(server: LiveServer):
    async def check() -> None:
        server.engine.engine.check_integrity()

    return check
