"""Makes docs/ui.png: the live view of a daemon (tiny model, `tokencake` with a host tier)
while a run's agents work, one in a tool call, one waiting, one generating.

    PYTHONSAFEPATH=1 PYTHONPATH=<pkg dir> python tests/server/ui_screenshot.py docs/ui.png

Not a test (no assertion): a picture for the README, made with the same Chromium as
tests/server/test_ui.py.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT))  # last: the root's kernels/ must not shadow the `kernels` package

from playwright.sync_api import sync_playwright  # noqa: E402

from kvrt.runtime.model.tiny import init_tiny  # noqa: E402
from tests.server.live_server import LiveServer, live_server, tokencake_engine  # noqa: E402
from tests.server.test_ui import CHROMIUM, FLAGS  # noqa: E402

GRAPH = {"name": "code-review", "agents": [
    {"name": "planner"}, {"name": "searcher", "tools": {"web_search": 8}},
    {"name": "coder", "tools": {"run_tests": 12}}, {"name": "writer"},
    {"name": "reviewer", "importance": 0.6}],
    "edges": [["planner", "searcher"], ["planner", "coder"], ["searcher", "writer"],
              ["coder", "writer"], ["writer", "reviewer"], ["reviewer", "writer"]]}


def call(server: LiveServer, run: str, agent: str, words: int, max_tokens: int = 4) -> None:
    body = {"messages": [{"role": "system", "content": f"You are the {agent}. " * words},
                         {"role": "user", "content": "Next step."}],
            "max_tokens": max_tokens, "ignore_eos": True, "kvrt": {"run": run, "agent": agent}}
    reply = server.post("/v1/chat/completions", body)
    assert reply.status == 200, reply.body


def event(server: LiveServer, run: str, **body: object) -> None:
    assert server.post(f"/v1/runs/{run}/events", body).status == 200


def play(server: LiveServer, run: str) -> None:
    """Some 40 s of work, so the pool's chart has a history."""
    for turn in range(8):
        for agent in ("planner", "searcher", "coder", "writer", "reviewer"):
            call(server, run, agent, 4 + 3 * turn)
        time.sleep(3)
    event(server, run, type="tool_call.started", agent="coder", tool="run_tests")
    time.sleep(2)
    event(server, run, type="tool_call.finished", agent="coder", tool="run_tests")
    event(server, run, type="tool_call.started", agent="searcher", tool="web_search")
    event(server, run, type="agent.waiting", agent="reviewer", reason="approval")
    event(server, run, type="agent.done", agent="planner")


def main(out: Path) -> None:
    model = init_tiny(Path("/tmp/kvrt-ui-shot/llama"), arch="llama", seed=0)
    fixture = live_server(model, tokencake_engine(model, pool_blocks=48))
    server = next(fixture)
    try:
        graph = server.post("/v1/graphs", GRAPH).json()["id"]
        run = server.post("/v1/runs", {"graph_id": graph}).json()["id"]
        play(server, run)
        shot = threading.Event()

        def keep_writing() -> None:  # a call is generating whenever the page looks
            while not shot.is_set():
                call(server, run, "writer", 8, 400)

        busy = threading.Thread(target=keep_writing)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(server.url + "/ui")
            busy.start()
            page.wait_for_function("() => [...document.querySelectorAll('.state')]"
                                   ".some(s => s.textContent === 'running')", timeout=20000)
            page.screenshot(path=str(out), full_page=True)
            shot.set()
            browser.close()
        busy.join()
    finally:
        next(fixture, None)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
