"""Reading JSON bodies and writing msgspec-encoded responses, shared by every route table."""

from __future__ import annotations

import msgspec
from aiohttp import web

from kvrt.runtime.server.auth import tenant_of
from kvrt.runtime.server.body_rate import BODY_RATE
from kvrt.runtime.server.errors import APIError

_encoder = msgspec.json.Encoder()


async def read_json(request: web.Request) -> bytes:
    """The body, to be decoded, once its tenant's body rate admits it (body_rate.py)."""
    # A missing Content-Type is taken as JSON (bare clients); a different one is refused.
    if request.headers.get("Content-Type"):
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, got {ctype!r}")
    rate, tenant = request.app[BODY_RATE], tenant_of(request)
    if request.content_length is not None:  # refused before it is even read
        rate.charge(tenant, request.content_length)
        return await request.read()
    body = await request.read()  # chunked: counted once read, before it is decoded
    rate.charge(tenant, len(body))
    return body


def json_response(value: object, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(value), status=status,
                        content_type="application/json")
