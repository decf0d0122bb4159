"""API keys and tenants: who is calling, checked before any handler runs.

With keys configured (`--api-key KEY[:TENANT]`, `--api-keys-file`), every endpoint but
`/health` (and `/metrics` with `--metrics-public`) needs `Authorization: Bearer KEY`; a missing
or unknown key is a 401 in OpenAI's error shape. The key's tenant is put on the request
(`tenant_of`): it salts every cache index (`request_salt`: a tenant never hits another's KV) and
owns the graphs and runs it declares (another tenant gets 404 for them, as for ids that do not
exist). Without keys, every caller is the default tenant.

Keys are compared in constant time (`hmac.compare_digest` against each configured key, all of
them every time), so the time a refusal takes says nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aiohttp import web

from kvrt.runtime.config import DEFAULT_TENANT, ServeConfig
from kvrt.runtime.server import app_keys
from kvrt.runtime.server.errors import APIError

# aiohttp 3.13+ types the keys of request storage (and warns on a str); older ones take a str.
_TENANT: Any = web.RequestKey("tenant", str) if hasattr(web, "RequestKey") else "kvrt.tenant"
_OPEN_PATHS = frozenset({"/health"})


def tenant_of(request: web.Request) -> str:
    return request.get(_TENANT, DEFAULT_TENANT)


def tenant_salt(tenant: str) -> bytes:
    """The cache salt of a tenant: distinct tenants never share a content key."""
    return hashlib.sha256(b"kvrt-tenant\0" + tenant.encode()).digest()


def request_salt(tenant: str, cache_salt: str | None = None) -> bytes:
    """The salt of a request's KV (`GenerateRequest.salt`): its tenant's, narrowed by the
    body's `cache_salt` if it sends one (only requests of the same tenant with the same
    cache_salt share KV). A body can split its tenant's cache, never reach another's."""
    salt = tenant_salt(tenant)
    if cache_salt is None:
        return salt
    return hashlib.sha256(b"kvrt-cache-salt\0" + salt + cache_salt.encode()).digest()


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    config: ServeConfig = request.app[app_keys.CONFIG]
    if config.api_keys and not _is_open(request.path, config):
        request[_TENANT] = _tenant_for(request.headers.get("Authorization", ""), config)
    return await handler(request)


def _is_open(path: str, config: ServeConfig) -> bool:
    return path in _OPEN_PATHS or (config.metrics_public and path == "/metrics")


def _tenant_for(header: str, config: ServeConfig) -> str:
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "this server needs an API key: send Authorization: Bearer KEY",
                       code="missing_api_key")
    try:
        given_bytes = given.strip().encode()
    except UnicodeEncodeError:  # a header that was not UTF-8 (kept as surrogates): no key
        raise APIError(401, "the API key is not valid", code="invalid_api_key") from None
    found = None
    for key, tenant in config.api_keys:  # every key, every time: constant time overall
        if hmac.compare_digest(given_bytes, key.encode()):
            found = tenant
    if found is None:
        raise APIError(401, "the API key is not valid", code="invalid_api_key")
    return found
