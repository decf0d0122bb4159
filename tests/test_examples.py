"""The examples run as a user runs them: each as a subprocess (`python examples/X.py --url ...`,
small budgets) against a live daemon on the tiny model under the `kvrt` policy with a host tier.
Checked: what each printed (its agents, its rounds or steps) and what the daemon recorded while
it ran (/metrics counters before and after, and the runs it left), not only that it exited 0."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kvrt.runtime.config import EngineConfig
from tests.server.live_server import LiveServer, live_server

ROOT = Path(__file__).parents[1]

# `kvrt` is the policy that reuses a round's shared text and decides where a waiting agent's KV
# goes; the host tier gives it somewhere to put it.
EXAMPLE_ENGINE = EngineConfig(kv_cache_memory=8 * 1024**2, host_cache_memory=16 * 1024**2,
                              max_model_len=1024, max_num_seqs=8, policy="kvrt")


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir: Callable[..., Path]) -> Iterator[LiveServer]:
    yield from live_server(tiny_checkpoint_dir("llama", 0), EXAMPLE_ENGINE)


@pytest.fixture(scope="module")
def lru_server(tiny_checkpoint_dir: Callable[..., Path]) -> Iterator[LiveServer]:
    """A daemon whose policy shows neither a round's reuse nor decisions at tool calls."""
    yield from live_server(tiny_checkpoint_dir("llama", 0), replace(EXAMPLE_ENGINE, policy="lru"))


def run_example(name: str, server: LiveServer, *flags: str) -> list[str]:
    """Runs examples/`name` to completion; returns its printed lines."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--url", server.url,
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def metrics(server: LiveServer) -> Counter[str]:
    """Every /metrics sample, by name and labels (the model's label dropped)."""
    samples: Counter[str] = Counter()
    for line in server.request("GET", "/metrics").body.decode().splitlines():
        if not line.startswith("#"):
            sample, value = line.rsplit(" ", 1)
            samples[re.sub(r'model_name="[^"]*",?', "", sample).replace(",}", "}")
                    .replace("{}", "")] = float(value)
    return samples


def counted(before: Counter[str], after: Counter[str], prefix: str) -> dict[str, float]:
    """What the samples starting with `prefix` grew by while the example ran."""
    return {k[len(prefix):]: after[k] - before[k] for k in after
            if k.startswith(prefix) and after[k] != before[k]}


def assert_cleaned_up(server: LiveServer, graph: str) -> None:
    """The example ended its run (its KV freed) and deleted its graph."""
    assert server.request("GET", "/v1/runs").json()["data"] == []
    assert graph not in {g["name"] for g in server.request("GET", "/v1/graphs").json()["data"]}
    assert server.stats().kv_blocks_in_use == 0


def test_town_rounds(server: LiveServer) -> None:
    before = metrics(server)
    lines = run_example("town_rounds.py", server, "--rounds", "2", "--agents", "4",
                        "--max-tokens", "6")
    after = metrics(server)

    names = ["mara", "tomas", "ines", "ravi"]
    for number in (1, 2):  # each round: its header, then every agent's words in order
        start = lines.index(f"--- round {number} ---")
        assert [line.split("> ", 1)[0] for line in lines[start + 1:start + 5]] == names
    assert lines.index("--- round 1 ---") < lines.index("--- round 2 ---")

    [compression] = [float(m[1]) for line in lines
                     if (m := re.fullmatch(r"segment KV compression: ([\d.]+)x", line))]
    shared = {m[1]: (int(m[2]), int(m[3])) for line in lines
              if (m := re.fullmatch(r"\s*(\w+): (\d+) of (\d+) shared tokens read in .*", line))}
    assert list(shared) == names
    assert not [line for line in lines if line.startswith("note:")]  # the policy shows it
    assert len({total for _, total in shared.values()}) == 1  # all read the same shared text
    # Each round one agent computes the shared text (the master), the other three read it.
    assert sum(reused > 0 for reused, _ in shared.values()) >= 3
    assert compression > 1.5

    # The daemon counted the same reuse: what a call read in place is what admission found
    # plus the recomputed rows the diff encode let go after.
    grew = counted(before, after, "kvrt:segment_")
    assert (grew["reused_tokens_total"] + grew.get("dropped_tokens_total", 0)
            == sum(reused for reused, _ in shared.values()))
    assert grew["tokens_total"] == sum(total for _, total in shared.values())
    assert sum(counted(before, after, "kvrt:request_success_total").values()) == 8  # 2 x 4
    assert_cleaned_up(server, "town")


def test_tool_agents(server: LiveServer) -> None:
    before = metrics(server)
    lines = run_example("tool_agents.py", server, "--steps", "2", "--tool-seconds", "0.2",
                        "--max-tokens", "6")
    after = metrics(server)

    for worker in ("worker_a", "worker_b"):
        assert sum(line.startswith(f"{worker}> ") for line in lines) == 2
        logs = [line.split(": ", 1)[1] for line in lines
                if line.startswith(f"{worker} ran the tests: ")]
        assert logs[0].startswith("FAILED") and logs[1] == "42 passed"
        # The estimate is learned from the two observed waits: at least the 0.2 s slept, a
        # little more on a loaded machine (the daemon times the events, not the sleep).
        [learned] = [line for line in lines if line.startswith(f"{worker} run_tests: ")]
        calls, estimate = learned.removeprefix(f"{worker} run_tests: ").split(", estimate ")
        assert calls == "2 calls" and 0.2 <= float(estimate.removesuffix(" s")) < 0.6
    assert sum(line.startswith("reviewer> ") for line in lines) == 1

    start = lines.index("KV decisions at the last tool call:")
    decisions = dict(line.strip().split(": ", 1) for line in lines[start + 1:start + 4])
    assert decisions["reviewer"] == "none"  # it called no tool
    # The daemon's policy decided at each of the 4 tool calls (besides releasing reservations
    # as priorities moved); the run state showed its last.
    grew = counted(before, after, "kvrt:kv_tier_decisions_total")
    assert sum(n for decision, n in grew.items() if "release:" not in decision) == 4
    assert {f'{{decision="{decisions[w]}"}}' for w in ("worker_a", "worker_b")} <= set(grew)
    assert counted(before, after, "kvrt:control_events_total") == {
        '{type="tool_call.started"}': 4, '{type="tool_call.finished"}': 4,
        '{type="agent.done"}': 3}
    # Per worker: a call before each of its 2 tool calls and a last one; then the reviewer's.
    assert sum(counted(before, after, "kvrt:request_success_total").values()) == 7
    assert_cleaned_up(server, "tool-agents")


def test_langgraph_research(server: LiveServer) -> None:
    before = metrics(server)
    lines = run_example("langgraph_research.py", server, "--researchers", "2",
                        "--search-seconds", "0.2", "--max-tokens", "6", "--thread", "smoke")
    after = metrics(server)

    [topics] = [line.removeprefix("planner> topics: ").split(", ") for line in lines
                if line.startswith("planner> topics: ")]
    assert len(set(topics)) == 2
    notes = [line.removeprefix("researcher> ") for line in lines
             if line.startswith("researcher> ")]
    assert sorted(note.split(": ", 1)[0] for note in notes) == sorted(topics)  # one per Send
    assert sum(line.startswith("writer> ") for line in lines) == 1

    # The run state the example printed: the thread's run, its agents the graph's nodes.
    assert any(re.fullmatch(r"run run-\w+ of thread smoke:", line) for line in lines)
    agents = {m[1]: (int(m[2]), int(m[3])) for line in lines if (m := re.fullmatch(
        r"\s*(\w+): (\d+) model calls, (\d+) tool calls, \d+ tokens generated", line))}
    assert list(agents) == ["planner", "researcher", "writer"]
    assert agents["planner"] == agents["writer"] == (1, 0)
    # Both researchers are the one agent; their searches overlap and are two calls.
    assert agents["researcher"] == (2, 2)

    # The daemon heard each search start and finish from the adapter's callbacks, and each
    # agent's done when the thread's invocation ended.
    assert counted(before, after, "kvrt:control_events_total") == {
        '{type="tool_call.started"}': 2, '{type="tool_call.finished"}': 2,
        '{type="agent.done"}': 3}
    assert sum(counted(before, after, "kvrt:request_success_total").values()) == 4
    # The graph `register` declared from the LangGraph builder stays; the thread's run ended.
    [graph] = [g for g in server.request("GET", "/v1/graphs").json()["data"]
               if g["name"] == "research"]
    assert [a["name"] for a in graph["agents"]] == ["planner", "researcher", "writer"]
    assert graph["agents"][1]["tools"] == {"search": 0.2}
    assert [(e["from"], e["to"]) for e in graph["edges"]] == [("planner", "researcher"),
                                                              ("researcher", "writer")]
    assert graph["critical_path"] == ["planner", "researcher", "writer"]
    assert graph["live_runs"] == 0
    assert server.request("GET", "/v1/runs?key=smoke").json()["data"] == []
    assert server.stats().kv_blocks_in_use == 0


def test_langgraph_react(server: LiveServer) -> None:
    before = metrics(server)
    lines = run_example("langgraph_react.py", server)
    after = metrics(server)
    assert lines[0].startswith("answer> ")
    # The tiny model writes no tool call: one model call, then the invocation ends, and the
    # adapter reports the one agent (the model node; `tools` is no agent) done.
    [agent] = [line for line in lines[1:] if ":" in line]
    # (The host holds write-through copies of its blocks: this daemon's policy is `kvrt`.)
    assert re.fullmatch(r"agent: done, 1 model calls, 0 tool calls, KV \d+ blocks on the device, "
                        r"\d+ on the host", agent), agent
    assert counted(before, after, "kvrt:control_events_total") == {'{type="agent.done"}': 1}
    [graph] = [g for g in server.request("GET", "/v1/graphs").json()["data"]
               if g["name"] == "react"]
    assert [a["name"] for a in graph["agents"]] == ["agent"]
    assert graph["agents"][0]["tools"] == {"search": 2.0}
    assert [(e["from"], e["to"]) for e in graph["edges"]] == [("agent", "agent")]
    assert server.request("GET", "/v1/runs").json()["data"] == []


@pytest.mark.parametrize(("example", "flags", "command"), [
    ("town_rounds.py", ("--rounds", "1", "--agents", "2", "--max-tokens", "2"),
     "kvrt serve --policy kvrt"),
    ("tool_agents.py", ("--steps", "1", "--tool-seconds", "0.05", "--max-tokens", "2"),
     "kvrt serve --policy tokencake --host-cache-memory 2GiB")])
def test_an_example_says_when_the_policy_cannot_show_it(lru_server: LiveServer, example: str,
                                                        flags: tuple[str, ...],
                                                        command: str) -> None:
    lines = run_example(example, lru_server, *flags)
    assert lines[0].startswith("note: this daemon runs the `lru` policy"), lines[0]
    assert lines[1].strip() == command  # the note's command, as a user would paste it
    assert lru_server.stats().kv_blocks_in_use == 0
