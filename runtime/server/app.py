"""The aiohttp application: `create_app(config, engine)`, and `drain(app)`.

The app owns the engine's lifetime: its cleanup_ctx starts the engine on the app's loop (the
engine thread hands outputs back to that loop), then opens the doors (runtime/server/admission.py)
and, on shutdown, stops the engine. Shutdown drains first: `kvrt serve` calls `drain` while still
listening, so new work gets 503 meanwhile; `on_shutdown` calls it again (a no-op by then) for
anyone who runs `runner.cleanup()` alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from kvrt.runtime.config import ServeConfig
from kvrt.runtime.engine.protocol import ShuttingDown
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.admission import ADMISSION, Admission, admission_middleware
from kvrt.runtime.server.auth import auth_middleware
from kvrt.runtime.server.body_rate import BODY_RATE, BodyRate
from kvrt.runtime.server.control_routes import routes as control_routes
from kvrt.runtime.server.errors import error_middleware
from kvrt.runtime.server.grammars import GRAMMARS, Grammars
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.runtime.server.openai_routes import routes as openai_routes
from kvrt.runtime.server.openapi import openapi_json
from kvrt.runtime.server.priority_sync import PRIORITY_SYNC, PrioritySync
from kvrt.runtime.server.prompt_workers import PROMPT_WORKERS, PromptWorkers
from kvrt.runtime.server.round_routes import routes as round_routes
from kvrt.runtime.server.run_expiry import run_expiry
from kvrt.runtime.server.tool_parsers import make_tool_parser
from kvrt.runtime.server.ui_routes import add_ui

log = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.02


def create_app(config: ServeConfig, engine: app_keys.ManagedEngine) -> web.Application:
    # Errors outermost: an auth refusal is an error in OpenAI's shape too.
    app = web.Application(middlewares=[error_middleware, auth_middleware, admission_middleware],
                          client_max_size=config.limits.max_body_bytes)
    shared = len({tenant for _, tenant in config.api_keys}) > 1  # several tenants to protect
    app[ADMISSION] = Admission(config.limits, shared=shared)
    app[BODY_RATE] = BodyRate(config.limits, shared=shared)
    app[app_keys.CONFIG] = config
    app[app_keys.ENGINE] = engine
    app[PRIORITY_SYNC] = PrioritySync(engine)
    app[PROMPT_WORKERS] = PromptWorkers(engine)
    app[GRAMMARS] = Grammars(engine)  # structured output's compiler, built on first use
    app[app_keys.METRICS] = ServerMetrics(engine.model_name)
    app[app_keys.CONTROL] = ControlPlane.open(config, clock=_loop_time)  # on --state-dir, if any
    app[app_keys.STARTED_AT] = int(time.time())
    app[app_keys.OPENAPI_JSON] = openapi_json(_kvrt_version())
    app[app_keys.TOOL_PARSER] = make_tool_parser(config.tool_call_parser)  # a bad name fails here
    app.add_routes(openai_routes)
    app.add_routes(control_routes)
    app.add_routes(round_routes)
    app.cleanup_ctx.append(_engine_lifetime)
    app.cleanup_ctx.append(run_expiry)  # inside the engine's lifetime: it releases KV
    add_ui(app)  # GET /ui, the live view (its pool sampling reads the engine: after it)
    app.on_shutdown.append(drain)
    app.on_cleanup.append(_close_control)
    app.on_cleanup.append(_close_prompt_workers)
    return app


async def _close_prompt_workers(app: web.Application) -> None:
    # Off the loop: a call being built (a long prompt's tokenization) may take seconds to end.
    await asyncio.get_running_loop().run_in_executor(None, app[PROMPT_WORKERS].close)


async def _close_control(app: web.Application) -> None:
    app[app_keys.CONTROL].close()


async def drain(app: web.Application) -> int:
    """Stops taking new work (503), lets the engine's calls in flight finish within the
    shutdown timeout, then aborts the rest: each ends with ShuttingDown (a 503, or an error
    event in a stream). Returns how many were aborted."""
    engine, admission = app[app_keys.ENGINE], app[ADMISSION]
    admission.begin_drain()
    timeout = app[app_keys.CONFIG].limits.shutdown_timeout_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if engine.load().in_flight:
        log.info("draining: %d requests in flight, %g s to finish", engine.load().in_flight,
                 timeout)
    while engine.load().in_flight and loop.time() < deadline:
        await asyncio.sleep(_DRAIN_POLL_S)
    aborted = await engine.abort_all(ShuttingDown(
        f"the server is shutting down and the request did not finish within {timeout:g} s"))
    if aborted:
        log.warning("shutdown: aborted %d requests still in flight after %g s", aborted, timeout)
    return aborted


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    engine = app[app_keys.ENGINE]
    await engine.start()
    # What exists now (the model, the tokenizer, the imported modules: ~400k objects) lives as
    # long as the daemon; frozen, a full collection skips it: ~25 ms instead of ~250 ms of the
    # loop's time, taken while serving.
    gc.collect()
    gc.freeze()
    app[ADMISSION].open()
    try:
        yield
    finally:
        app[ADMISSION].begin_drain()
        await engine.stop()  # logs whether every request's KV was released
        gc.unfreeze()


def _loop_time() -> float:
    """The serving loop's clock, which tool durations are measured on: time.monotonic on a real
    loop, simulated time under `kvrt sim`. The control plane is used from the loop only."""
    return asyncio.get_running_loop().time()


def _kvrt_version() -> str:
    try:
        return version("kvrt")
    except PackageNotFoundError:
        return "0.0.0"
