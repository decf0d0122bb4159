"""API keys and tenants: who is calling, checked before any handler runs.

With keys configured (`--api-key KEY[:TENANT]`, `--api-keys-file`), every endpoint but
`/health` and `/metrics` needs `Authorization: Bearer KEY`; a missing or unknown key is a 401
in OpenAI's error shape. The key's tenant is put on the request (`tenant_of`): it salts every
cache index (`request_salt`: a tenant never hits another's KV) and owns the graphs and runs it
declares (another tenant gets 404 for them, as for ids that do not exist). Without keys, every
caller is the default tenant.

/metrics is the operator's, since its figures are every tenant's (a tenant reading the
server's cache hits learns about the others' traffic):

    keys set          | the caller sends       | /metrics answers
    ------------------+------------------------+-------------------------------------------
    none at all       | anything               | 200, no per-tenant figures (one tenant)
    tenant or admin   | an admin key           | 200, per-tenant figures (`tenant` label)
    tenant or admin   | a tenant key           | 403 (or, --metrics-public, as no key)
    tenant or admin   | no key, an unknown one | 401 (or, --metrics-public, 200 without
                      |                        |      per-tenant figures)

An admin key (`--admin-key`) is no tenant's: on the model API it gets 403.

The live view (GET /ui and its script) holds no data and is open; its data, /ui/state, is
every tenant's for an admin key, a tenant's own for its key (runtime/server/ui_state.py):

    keys set          | the caller sends       | /ui/state answers
    ------------------+------------------------+-------------------------------------------
    none at all       | anything               | everything (one tenant: the operator's view)
    admin keys only   | no key                 | the default tenant's view (the API is open)
    tenant or admin   | an admin key           | everything, each run with its tenant
    tenant or admin   | a tenant key           | that tenant's graphs, runs and decisions
    tenant or admin   | an unknown key         | 401 (and no key, with tenant keys: 401)

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
_OPERATOR: Any = web.RequestKey("operator", bool) if hasattr(web, "RequestKey") else "kvrt.op"
_OPEN_PATHS = frozenset({"/health", "/ui", "/ui/ui.js"})  # the view's page and script: no data
_METRICS_PATH = "/metrics"
_UI_STATE_PATH = "/ui/state"
_ADMIN = "(admin)"  # what an admin key maps to in place of a tenant: no tenant has "("


def tenant_of(request: web.Request) -> str:
    return request.get(_TENANT, DEFAULT_TENANT)


def is_operator(request: web.Request) -> bool:
    """Whether the caller may see every tenant's figures (only /metrics and /ui/state look)."""
    return request.get(_OPERATOR, False)


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
    header = request.headers.get("Authorization", "")
    if request.path == _METRICS_PATH:
        request[_OPERATOR] = _metrics_caller(header, config)
    elif request.path == _UI_STATE_PATH:
        request[_TENANT], request[_OPERATOR] = _ui_caller(header, config)
    elif config.api_keys and request.path not in _OPEN_PATHS:
        owner = _owner_of(header, config)
        if owner == _ADMIN:
            raise APIError(403, "an admin key opens /metrics only; the model and control API "
                           "take a tenant's key", code="admin_key_not_a_tenant_key")
        request[_TENANT] = owner
    # The figures the request's calls add to /metrics are its tenant's.
    with request.app[app_keys.METRICS].attributed_to(tenant_of(request)):
        return await handler(request)


def _metrics_caller(header: str, config: ServeConfig) -> bool:
    """Whether a /metrics caller is the operator; raises 401 or 403 for one who may not read
    it at all (see the table above)."""
    if not config.api_keys and not config.admin_keys:
        return False
    try:
        owner = _owner_of(header, config)
    except APIError:
        if config.metrics_public:
            return False
        raise
    if owner == _ADMIN:
        return True
    if config.metrics_public:
        return False
    raise APIError(403, "/metrics shows every tenant's figures: it takes an admin key "
                   "(--admin-key), not a tenant's", code="admin_key_required")


def _ui_caller(header: str, config: ServeConfig) -> tuple[str, bool]:
    """The tenant whose view /ui/state shows and whether it is the operator's (see above)."""
    if not config.api_keys and not config.admin_keys:
        return DEFAULT_TENANT, True
    if not config.api_keys and not header:
        return DEFAULT_TENANT, False
    owner = _owner_of(header, config)
    return (DEFAULT_TENANT, True) if owner == _ADMIN else (owner, False)


def _owner_of(header: str, config: ServeConfig) -> str:
    """The tenant of the bearer key in `header`, or `_ADMIN`; 401 for no key or an unknown
    one."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "this server needs an API key: send Authorization: Bearer KEY",
                       code="missing_api_key")
    try:
        given_bytes = given.strip().encode()
    except UnicodeEncodeError:  # a header that was not UTF-8 (kept as surrogates): no key
        raise APIError(401, "the API key is not valid", code="invalid_api_key") from None
    found: str | None = None
    owners = [*config.api_keys, *((key, _ADMIN) for key in config.admin_keys)]
    for key, owner in owners:  # every key, every time: constant time overall
        if hmac.compare_digest(given_bytes, key.encode()):
            found = owner
    if found is None:
        raise APIError(401, "the API key is not valid", code="invalid_api_key")
    return found
