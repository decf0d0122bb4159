"""The live view (GET /ui) in a real headless Chromium (Debian's /usr/bin/chromium, driven by
playwright; `make test` installs it): it shows a live run's agents, follows a tool call
without a reload, draws the critical path and the KV pool; /ui/state keeps tenants apart."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import (
    LiveServer,
    Reply,
    assert_error_shape,
    live_server,
    wait_released,
)

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TTL = EngineConfig(kv_cache_memory=4 * 1024**2, max_model_len=256, max_num_seqs=8, policy="ttl")
GRAPH = {"name": "research", "agents": [{"name": "planner"},
                                        {"name": "searcher", "tools": {"search": 20}},
                                        {"name": "writer"}, {"name": "critic"}],
         "edges": [["planner", "searcher"], ["searcher", "writer"], ["planner", "critic"]]}
KEY_A, KEY_B, ADMIN = "sk-ui-tenant-a", "sk-ui-tenant-b", "sk-ui-admin"


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, TTL)


@pytest.fixture(scope="module")
def keyed(tiny_model: Path) -> Iterator[LiveServer]:
    yield from live_server(tiny_model, api_keys=((KEY_A, "a"), (KEY_B, "b")),
                           admin_keys=(ADMIN,))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium with a fresh profile; one page per test (`page` below)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=str(CHROMIUM),
            headless=True, args=FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def request(server: LiveServer, method: str, path: str, **kw: Any) -> Reply:
    """server.request off this thread: playwright's sync API runs an event loop on it, and
    LiveServer.request runs its own (asyncio.run refuses to nest)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(server.request, method, path, **kw).result()


def post(server: LiveServer, path: str, body: Any, **kw: Any) -> Reply:
    return request(server, "POST", path, json_body=body, **kw)


def open_view(browser: Any, server: LiveServer) -> Any:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/ui")
    page.errors = errors
    return page


def declare_and_start(server: LiveServer, headers: dict[str, str] | None = None) -> str:
    graph = post(server, "/v1/graphs", GRAPH, headers=headers)
    assert graph.status == 201, graph.body
    run = post(server, "/v1/runs", {"graph_id": graph.json()["id"]}, headers=headers)
    assert run.status == 201, run.body
    return run.json()["id"]


def call_as(server: LiveServer, run: str, agent: str) -> None:
    body = {"messages": [{"role": "system", "content": f"You are the {agent}. " * 12},
                         {"role": "user", "content": "Go on."}],
            "max_tokens": 2, "kvrt": {"run": run, "agent": agent}}
    reply = post(server, "/v1/chat/completions", body)
    assert reply.status == 200, reply.body


def state_of(page: Any, run: str, agent: str) -> str:
    return page.inner_text(f'tr[data-run="{run}"][data-agent="{agent}"] .state')


def test_the_page_follows_a_live_run(server: LiveServer, browser: Any) -> None:
    run = declare_and_start(server)
    call_as(server, run, "searcher")
    page = open_view(browser, server)
    page.wait_for_selector(f'tr[data-run="{run}"][data-agent="critic"]')
    rows = page.eval_on_selector_all(f'tr[data-run="{run}"]', "rs => rs.map(r => r.dataset.agent)")
    assert rows == ["planner", "searcher", "writer", "critic"]
    assert state_of(page, run, "searcher") == "idle"
    # Its KV is on the device: the residency cell says how many blocks, as the API does.
    agents = request(server, "GET", f"/v1/runs/{run}").json()["agents"]
    device = agents[1]["kv"]["device_blocks"]
    assert device > 0
    assert f"device {device}" in page.inner_text('tr[data-agent="searcher"] .kv-cell')
    # The graph's critical path (planner -> searcher -> writer: the tool makes it longest).
    crit = page.eval_on_selector_all(
        '.graph g.node rect[stroke="var(--crit)"]',
        "rs => rs.map(r => r.parentNode.dataset.agent)")
    assert crit == ["planner", "searcher", "writer"]

    page.evaluate("window.sameDocument = true")
    event = {"type": "tool_call.started", "agent": "searcher", "tool": "search"}
    assert post(server, f"/v1/runs/{run}/events", event).status == 200
    page.wait_for_function(
        "([run, agent]) => document.querySelector(`tr[data-run='${run}'][data-agent='${agent}']"
        " .state`).textContent === 'in tool call: search'", arg=[run, "searcher"], timeout=5000)
    assert page.evaluate("window.sameDocument") is True  # no reload: the poll redrew it
    assert state_of(page, run, "planner") == "idle"
    # The policy (ttl) pinned the agent's KV at its tool call, and the view lists it.
    page.wait_for_function("() => [...document.querySelectorAll('#decisions tr')].some(r => "
                           "r.textContent.includes('pin') && r.textContent.includes('searcher'))",
                           timeout=5000)
    # The pool chart has samples, with the pinned blocks drawn.
    page.wait_for_function("() => document.querySelectorAll('#pool path').length >= 3")
    assert "pinned" in page.inner_text("#pool-note")
    assert page.errors == []
    page.close()

    assert request(server, "DELETE", f"/v1/runs/{run}").status == 200
    wait_released(server)


def test_a_tenant_sees_its_own_and_the_operator_sees_all(keyed: LiveServer) -> None:
    a, b = ({"Authorization": f"Bearer {key}"} for key in (KEY_A, KEY_B))
    run_a, run_b = declare_and_start(keyed, a), declare_and_start(keyed, b)
    assert request(keyed, "GET", "/ui").status == 200  # the page: no data, no key
    assert_error_shape(request(keyed, "GET", "/ui/state"), 401)
    assert_error_shape(request(keyed, "GET", "/ui/state",
                                     headers={"Authorization": "Bearer nope"}), 401)
    mine = request(keyed, "GET", "/ui/state", headers=a).json()
    assert (mine["view"], mine["tenant"], mine["pool"]) == ("tenant", "a", None)
    assert [r["id"] for r in mine["runs"]] == [run_a] and mine["run_tenants"] == {}
    assert len(mine["graphs"]) == 1
    everything = request(keyed, "GET", "/ui/state",
                               headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert everything["view"] == "operator" and everything["pool"]["total_blocks"] > 0
    assert everything["run_tenants"] == {run_a: "a", run_b: "b"}
    for run, headers in ((run_a, a), (run_b, b)):
        assert request(keyed, "DELETE", f"/v1/runs/{run}", headers=headers).status == 200


def test_the_page_asks_for_a_key_and_shows_that_tenants_runs(keyed: LiveServer,
                                                            browser: Any) -> None:
    a = {"Authorization": f"Bearer {KEY_A}"}
    run_a = declare_and_start(keyed, a)
    run_b = declare_and_start(keyed, {"Authorization": f"Bearer {KEY_B}"})
    page = open_view(browser, keyed)
    page.wait_for_selector("#key-section:not([hidden])")
    page.fill("#key", KEY_A)
    page.click("#key-form button")
    page.wait_for_selector(f'div.run[data-run="{run_a}"]')
    assert page.inner_text("#view") == "tenant a"
    assert page.query_selector(f'div.run[data-run="{run_b}"]') is None
    assert page.is_hidden("#pool-section")  # the pool is every tenant's
    page.close()
    for run, key in ((run_a, KEY_A), (run_b, KEY_B)):
        reply = request(keyed, "DELETE", f"/v1/runs/{run}",
                              headers={"Authorization": f"Bearer {key}"})
        assert reply.status == 200
