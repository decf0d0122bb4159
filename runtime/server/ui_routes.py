"""The live view: GET /ui (one static page and its script, shipped as package data: no build
step) and GET /ui/state (the JSON snapshot it polls, runtime/server/ui_state.py).

The page polls /ui/state once a second rather than holding a Server-Sent Events stream: a
browser's EventSource cannot send an Authorization header, and the data is keyed (auth.py), so
an SSE stream would need the key in its URL, where logs and history keep it. A snapshot also
makes a missed poll cost nothing (the next one carries all of it, the pool's history
included) and holds no task per open page. The page and script hold no data and need no key;
the page asks for one (kept in the tab's sessionStorage) when /ui/state answers 401.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files

from aiohttp import web

from kvrt.runtime.server import app_keys
from kvrt.runtime.server.auth import is_operator, tenant_of
from kvrt.runtime.server.http_io import json_response
from kvrt.runtime.server.ui_pool import POOL_HISTORY, PoolHistory, pool_sampling
from kvrt.runtime.server.ui_state import ui_state

UI_FILES = web.AppKey("ui_files", dict)  # name -> (bytes, content type), read once at start
_STATIC = {"ui.html": "text/html", "ui.js": "text/javascript"}
# The page's own script and styles only; it fetches /ui/state from the same origin.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
            "style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'"}

routes = web.RouteTableDef()


def add_ui(app: web.Application) -> None:
    """Adds the live view's routes, its static files and the pool's sampling (call after the
    engine's cleanup_ctx is in: the sampling reads the engine)."""
    static = files("kvrt.runtime.server") / "static"
    app[UI_FILES] = {name: ((static / name).read_bytes(), kind) for name, kind in _STATIC.items()}
    app[POOL_HISTORY] = PoolHistory()
    app.add_routes(routes)
    app.cleanup_ctx.append(pool_sampling)


@routes.get("/ui")
async def page(request: web.Request) -> web.Response:
    return _static(request, "ui.html")


@routes.get("/ui/ui.js")
async def script(request: web.Request) -> web.Response:
    return _static(request, "ui.js")


@routes.get("/ui/state")
async def state(request: web.Request) -> web.Response:
    """The caller's snapshot: every tenant's for the operator, its own for a tenant."""
    app = request.app
    snapshot = ui_state(app[app_keys.CONTROL], app[app_keys.ENGINE], app[POOL_HISTORY],
                        asyncio.get_running_loop().time(), tenant_of(request),
                        is_operator(request))
    response = json_response(snapshot)
    response.headers["Cache-Control"] = "no-store"
    return response


def _static(request: web.Request, name: str) -> web.Response:
    body, kind = request.app[UI_FILES][name]
    return web.Response(body=body, content_type=kind, charset="utf-8", headers=_HEADERS)
