"""The aiohttp application: `create_app(config, engine)`.

The app owns the engine's lifetime: its cleanup_ctx starts the engine on the app's loop (the
engine thread hands outputs back to that loop) and stops it on shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from kvrt.runtime.config import ServeConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.server import keys
from kvrt.runtime.server.auth import auth_middleware
from kvrt.runtime.server.control_routes import routes as control_routes
from kvrt.runtime.server.errors import error_middleware
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.runtime.server.openai_routes import routes as openai_routes
from kvrt.runtime.server.openapi import openapi_json
from kvrt.runtime.server.round_routes import routes as round_routes


def create_app(config: ServeConfig, engine: keys.ManagedEngine) -> web.Application:
    # Errors outermost: an auth refusal is an error in OpenAI's shape too.
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=config.limits.max_body_bytes)
    app[keys.CONFIG] = config
    app[keys.ENGINE] = engine
    app[keys.METRICS] = ServerMetrics()
    app[keys.CONTROL] = ControlPlane(config.control, clock=_loop_time)
    app[keys.STARTED_AT] = int(time.time())
    app[keys.OPENAPI_JSON] = openapi_json(_kvrt_version())
    app.add_routes(openai_routes)
    app.add_routes(control_routes)
    app.add_routes(round_routes)
    app.cleanup_ctx.append(_engine_lifetime)
    return app


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    engine = app[keys.ENGINE]
    await engine.start()
    try:
        yield
    finally:
        await engine.stop()


def _loop_time() -> float:
    """The serving loop's clock, which tool durations are measured on: time.monotonic on a real
    loop, simulated time under `kvrt sim`. The control plane is used from the loop only."""
    return asyncio.get_running_loop().time()


def _kvrt_version() -> str:
    try:
        return version("kvrt")
    except PackageNotFoundError:
        return "0.0.0"
