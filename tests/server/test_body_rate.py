"""With several tenants, each may send only so many bytes of request bodies a second
(`--max-body-rate-per-tenant`): a tenant streaming large bodies gets 429 body_rate_exceeded
before they are decoded, while another tenant's bodies pass; a single-tenant server has no
such limit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvrt.runtime.config import ServerLimits
from tests.server.live_server import LiveServer, assert_error_shape, good_chat, live_server

KEY_A, KEY_B = "key-of-tenant-a", "key-of-tenant-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_body_bytes_per_s_per_tenant=8 * 1024)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, api_keys=((KEY_A, "a"), (KEY_B, "b")), limits=LIMITS)


@pytest.fixture(scope="module")
def alone(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, api_keys=((KEY_A, "a"),), limits=LIMITS)


def large_chat() -> dict:
    """A body of some 40 KiB: more than 4 s of the rate, within the size limit."""
    return good_chat(messages=[{"role": "system", "content": "x " * 20_000},
                               {"role": "user", "content": "Hello"}])


def test_past_its_body_rate_a_tenant_waits_and_the_other_does_not(server: LiveServer) -> None:
    first = server.post("/v1/chat/completions", large_chat(), headers=A)
    assert first.status != 429, first.body  # the burst holds a whole body
    refused = server.post("/v1/chat/completions", large_chat(), headers=A)
    error = assert_error_shape(refused, 429)
    assert (error["code"], error["param"]) == ("body_rate_exceeded", "max_body_rate_per_tenant")
    # 24 KiB of the 64 KiB burst are left: the 16 KiB more come at 8 KiB a second
    assert int(refused.headers["Retry-After"]) == 2
    assert server.post("/v1/chat/completions", large_chat(), headers=B).status != 429
    assert server.post("/v1/chat/completions", good_chat(), headers=B).status == 200


def test_one_tenant_alone_has_no_body_rate(alone: LiveServer) -> None:
    for _ in range(3):
        assert alone.post("/v1/chat/completions", large_chat(), headers=A).status != 429
