"""`run_server(config)`: load the engine, serve the app on uvloop until SIGINT or SIGTERM, then
drain (runtime/server/app.py) and stop. A second signal interrupts a drain that takes too long."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine

from aiohttp import web

from kvrt.runtime.config import ServeConfig
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.app import create_app, drain
from kvrt.runtime.server.http_protocol import AppRunner

log = logging.getLogger(__name__)

# After the drain (app.drain: in-flight work got `limits.shutdown_timeout_s` to finish, the rest
# was aborted), handlers get this long to write their last bytes before they are cancelled.
SHUTDOWN_TIMEOUT_S = 5.0


def run_server(config: ServeConfig) -> None:
    # Imported here so that `kvrt --help` and the SDK never pay for torch.
    from kvrt.runtime.engine.async_engine import AsyncEngine
    from kvrt.runtime.graph.store import StateStore
    from kvrt.runtime.replicas.ray_cluster import import_ray, uses_ray

    if config.state_dir is not None:  # a bad state dir fails now, not after the model loaded
        StateStore.open(config.state_dir).close()
    if uses_ray(config):
        import_ray()  # not installed: a clear error before anything starts
        _serve_replicas(config)
        return
    log.info("loading model %s", config.engine.model or "(default SmolLM2-135M-Instruct)")
    engine = AsyncEngine.create(config.engine, config.served_model_name)  # no loop yet: may block
    _run(_serve(config, engine))


def _serve_replicas(config: ServeConfig) -> None:
    """Engine replicas on Ray behind this daemon: it serves as soon as it listens, and a call
    gets 503 with Retry-After until a replica is ready."""
    from kvrt.runtime.replicas.ray_cluster import RayCluster

    cluster = RayCluster(config)
    try:
        _run(_serve(config, cluster.replica_set(config)))
    finally:
        cluster.close()


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Starts `app` on host:port (0 = any free port); returns the runner and the base URL.

    Handlers are cancelled when their client disconnects, so that a non-streaming request
    whose client gave up is aborted in the engine instead of running to its end. Connections
    get the config's header timeout, and parser errors in OpenAI's shape (http_protocol.py).
    """
    header_timeout_s = app[app_keys.CONFIG].limits.header_timeout_s
    runner = AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                       keepalive_timeout=header_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"


async def _serve(config: ServeConfig, engine: app_keys.ManagedEngine) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, loop, stop, sig)
    app = create_app(config, engine)
    runner, url = await start_site(app, config.host, config.port)
    try:
        # The first line on stdout: scripts and tests wait for it (and read the port from it).
        print(f"kvrt ready: serving {engine.model_name} at {url}", flush=True)
        print(f"kvrt live view: {url}/ui", flush=True)
        await stop.wait()
        log.info("shutting down")
        await drain(app)  # still listening: new work gets 503 meanwhile
    finally:
        await runner.cleanup()  # stops the engine through the app's cleanup_ctx


def _on_signal(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    # A second signal gets the default behaviour, so a stuck shutdown can still be interrupted.
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(s)
    stop.set()


def _run(main: Coroutine[None, None, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop does not exist on Windows
        asyncio.run(main)
        return
    uvloop.run(main)
