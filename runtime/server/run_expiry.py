"""Ends abandoned runs: the app's sweeper for `--run-idle-timeout`.

A client that starts a run and goes away without DELETE would hold the run's KV, its slot in
`--max-live-runs` and in its tenant's quota, for ever. About once a second (more often only
for timeouts under 4 s) the sweeper asks the control plane which live runs were idle past the
timeout (ControlPlane.idle_runs), ends them as "expired" (ControlPlane.expire), then releases
each one's KV as DELETE /v1/runs/{id} does: the priority sync forgets it, the engine releases
it. What fails is logged, and the next sweep tries again. A session's implicit run
(implicit_runs.py) expires the same way: an OpenAI client never ends its conversations, so
this is how their KV is given back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from kvrt.runtime.server import app_keys
from kvrt.runtime.server.background import in_background
from kvrt.runtime.server.priority_sync import PRIORITY_SYNC

log = logging.getLogger(__name__)

_MAX_PERIOD_S = 1.0


async def run_expiry(app: web.Application) -> AsyncIterator[None]:
    """The app's cleanup_ctx: sweeps while the engine runs (append it after the engine's)."""
    timeout = app[app_keys.CONFIG].control.run_idle_timeout_s
    if not timeout:
        yield
        return
    async with in_background(_sweep_forever(app, min(_MAX_PERIOD_S, timeout / 4)),
                             "kvrt-run-expiry"):
        yield


async def _sweep_forever(app: web.Application, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            await sweep(app)
        except Exception:  # noqa: BLE001 - the sweeper outlives one failed sweep
            log.exception("expiring idle runs failed; retrying at the next sweep")


async def sweep(app: web.Application) -> None:
    """Expires the idle runs now, then releases their KV. A run whose end cannot be written to
    the state store stays live (it is tried again at the next sweep); the others expire."""
    control, engine, sync = app[app_keys.CONTROL], app[app_keys.ENGINE], app[PRIORITY_SYNC]
    control.forget_expired()
    expired = []
    for run in control.idle_runs():  # all expired before the first await: none revives
        try:
            control.expire(run)
        except Exception:  # noqa: BLE001 - one run's failed write must not keep the others
            log.exception("cannot expire idle run %s; retrying at the next sweep", run.id)
            continue
        expired.append(run)
    for run in expired:
        sync.forget(run)
        released = await engine.release_run(run.id)
        log.info("%srun %s of tenant %s expired after %g s idle; %d KV blocks released",
                 "implicit " if run.implicit else "", run.id, run.tenant,
                 control.config.run_idle_timeout_s, released)
