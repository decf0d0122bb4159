"""The aiohttp AppKeys of what the app holds (aiohttp checks the type of each at `app[KEY]`).
API keys, the other kind, are auth.py's."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from kvrt.runtime.config import ServeConfig
from kvrt.runtime.engine.protocol import EngineClient
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.server.metrics import ServerMetrics
from kvrt.runtime.server.tool_parsers import ToolParser


class ManagedEngine(EngineClient, Protocol):
    """An engine the app starts and stops with itself (in its cleanup_ctx)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ENGINE = web.AppKey("engine", ManagedEngine)
CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", ServerMetrics)
CONTROL = web.AppKey("control", ControlPlane)  # graphs and live runs
STARTED_AT = web.AppKey("started_at", int)  # unix seconds; the model card's `created`
OPENAPI_JSON = web.AppKey("openapi_json", bytes)  # built once from the Structs
TOOL_PARSER = web.AppKey("tool_parser", ToolParser)  # stateless: a reply's state is its stream
