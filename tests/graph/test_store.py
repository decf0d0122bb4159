"""The state store under --state-dir, and the control plane brought back from it: graphs with
their ids and tenants, runs that were live as interrupted, and clear errors for a dir that
cannot be used."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from kvrt.runtime.config import ConfigError, ControlConfig, ServeConfig
from kvrt.runtime.engine.protocol import Attribution
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.runtime.graph.errors import Conflict, NotFound
from kvrt.runtime.graph.store import (
    FILE_NAME,
    SCHEMA_VERSION,
    SavedGraph,
    SavedLearning,
    SavedRun,
    StateError,
    StateStore,
)
from kvrt.sdk.protocol.control import (
    AgentDone,
    AgentSpec,
    GraphSpec,
    ToolCallFinished,
    ToolCallStarted,
)

SPEC = GraphSpec(name="pair", agents=[AgentSpec(name="a", tools={"search": 2.5}),
                                      AgentSpec(name="b")], edges=[("a", "b")])


def open_plane(state_dir: Path, max_live_runs: int = 4096) -> ControlPlane:
    config = ServeConfig(state_dir=str(state_dir), control=ControlConfig(
        max_live_runs=max_live_runs))
    return ControlPlane.open(config)


def test_the_store_keeps_graphs_and_runs_until_they_go(tmp_path: Path) -> None:
    store = StateStore.open(str(tmp_path / "state"))
    store.add_graph(SavedGraph("g1", "t", 100, SPEC))
    store.add_run(SavedRun("r1", "g1", "t", "thread-1", 101))
    store.add_run(SavedRun("r2", "g1", "t", None, 102))
    store.end_run("r2", 103)
    store.close()
    store = StateStore.open(str(tmp_path / "state"))
    assert store.graphs() == [SavedGraph("g1", "t", 100, SPEC)]
    assert store.open_runs() == [SavedRun("r1", "g1", "t", "thread-1", 101)]
    store.remove_graph("g1")
    assert store.graphs() == [] and store.open_runs() == []
    store.close()


def test_graphs_come_back_with_their_ids_and_tenants(tmp_path: Path) -> None:
    control = open_plane(tmp_path)
    mine = control.create_graph(SPEC, "a")
    theirs = control.create_graph(GraphSpec(name="solo", agents=[AgentSpec(name="x")]), "b")
    gone = control.create_graph(SPEC, "a")
    control.delete_graph(gone.id, "a")
    control.close()

    control = open_plane(tmp_path)
    assert [e.id for e in control.graphs("a")] == [mine.id]
    assert [e.id for e in control.graphs("b")] == [theirs.id]
    back = control.graph(mine.id, "a")
    assert (back.created, back.graph) == (mine.created, mine.graph)
    assert back.costs.estimates.seconds("a", "search") == 2.5
    with pytest.raises(NotFound):
        control.graph(mine.id, "b")  # still another tenant's
    with pytest.raises(NotFound):
        control.graph(gone.id, "a")
    control.close()


def test_live_runs_come_back_interrupted_and_ended_runs_not_at_all(tmp_path: Path) -> None:
    control = open_plane(tmp_path, max_live_runs=2)
    graph = control.create_graph(SPEC, "a")
    ended = control.start_run(graph.id, tenant="a")
    keyed = control.start_run(graph.id, "thread-7", tenant="a")
    control.end_run(ended.id, "a")
    plain = control.start_run(graph.id, tenant="a")
    control.close()  # `keyed` and `plain` are live when the daemon stops

    control = open_plane(tmp_path, max_live_runs=2)
    runs = control.runs(tenant="a")
    assert [(r.id, r.status, r.key) for r in runs] == [
        (keyed.id, "interrupted", "thread-7"), (plain.id, "interrupted", None)]
    assert control.run(keyed.id, "a").created == keyed.created
    with pytest.raises(NotFound):
        control.run(ended.id, "a")
    with pytest.raises(NotFound):
        control.run(keyed.id, "b")
    with pytest.raises(Conflict) as refused:
        control.live_run(keyed.id, "a")
    assert refused.value.code == "run_interrupted"
    with pytest.raises(Conflict):
        control.run(keyed.id, "a").apply(AgentDone(agent="a"))
    with pytest.raises(Conflict):
        control.agent_of(Attribution(keyed.id, "a"), "a")
    # Interrupted runs are not live: the limit of 2 still lets two new runs start, and the
    # key's next start begins a new run.
    assert control.live_run_count() == 0
    fresh = control.start_run(graph.id, "thread-7", tenant="a")
    assert fresh.id != keyed.id and fresh.status == "live"
    control.start_run(graph.id, tenant="a")
    with pytest.raises(Conflict):
        control.start_run(graph.id, tenant="a")
    with pytest.raises(Conflict) as in_use:
        control.delete_graph(graph.id, "a")
    assert in_use.value.code == "graph_in_use"
    assert control.end_run(keyed.id, "a").status == "interrupted"
    assert control.live_run_count() == 2
    control.close()

    control = open_plane(tmp_path)  # the ended one stays gone; the others are interrupted
    statuses = {r.id: r.status for r in control.runs(tenant="a")}
    assert keyed.id not in statuses and len(statuses) == 3
    assert statuses[plain.id] == statuses[fresh.id] == "interrupted"
    control.close()


def test_a_daemon_killed_without_closing_loses_nothing(tmp_path: Path) -> None:
    """The process dies right after the calls return (os._exit: no close, no cleanup)."""
    script = f"""
import os
from kvrt.runtime.config import ServeConfig
from kvrt.runtime.graph.control_plane import ControlPlane
from kvrt.sdk.protocol.control import AgentSpec, GraphSpec
control = ControlPlane.open(ServeConfig(state_dir={str(tmp_path)!r}))
graph = control.create_graph(GraphSpec(name="g", agents=[AgentSpec(name="a")]), "t")
run = control.start_run(graph.id, tenant="t")
print(graph.id, run.id, flush=True)
os._exit(0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    graph_id, run_id = done.stdout.split()
    control = open_plane(tmp_path)
    assert [e.id for e in control.graphs("t")] == [graph_id]
    assert control.run(run_id, "t").status == "interrupted"
    control.close()


def test_without_a_state_dir_nothing_is_written(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a stray relative path would land
    control = ControlPlane.open(ServeConfig())
    control.start_run(control.create_graph(SPEC).id)
    control.close()
    assert list(tmp_path.iterdir()) == []
    assert ControlPlane.open(ServeConfig()).graphs() == []


def test_a_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"not a database " * 100)
    with pytest.raises(StateError, match="not a database.*not a kvrt state file"):
        open_plane(tmp_path)


def test_a_state_dir_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot create the state dir"):
        open_plane(tmp_path / "file" / "state")
    (tmp_path / "dir" / FILE_NAME).mkdir(parents=True)  # where the file should be
    with pytest.raises(StateError, match="cannot open the state file"):
        open_plane(tmp_path / "dir")


def test_a_state_dir_in_use_by_another_daemon_is_refused(tmp_path: Path) -> None:
    first = open_plane(tmp_path)
    with pytest.raises(StateError, match="another kvrt daemon"):
        open_plane(tmp_path)
    first.close()
    open_plane(tmp_path).close()  # free again


def test_a_state_file_of_another_version_or_with_a_bad_graph_is_refused(tmp_path: Path) -> None:
    open_plane(tmp_path / "v").close()
    db = sqlite3.connect(tmp_path / "v" / FILE_NAME)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StateError, match="schema version 99"):
        open_plane(tmp_path / "v")
    control = open_plane(tmp_path / "g")
    graph = control.create_graph(SPEC, "a")
    control.close()
    db = sqlite3.connect(tmp_path / "g" / FILE_NAME)
    db.execute("UPDATE graphs SET spec = ? WHERE id = ?", (b'{"name": 1}', graph.id))
    db.commit()
    db.close()
    with pytest.raises(StateError, match=f"graph {graph.id}"):
        open_plane(tmp_path / "g")
    assert issubclass(StateError, ConfigError)  # `kvrt serve` shows it as one line


# ---- learned statistics ----------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS graphs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created INTEGER NOT NULL, spec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, graph_id TEXT NOT NULL, tenant TEXT NOT NULL, key TEXT,
    created INTEGER NOT NULL, ended INTEGER);
"""  # the schema text of version 1, as kvrt wrote it before the `learning` table


def teach(control: ControlPlane, now: list[float], graph_id: str) -> None:
    """One episode: a calls its model (12 tokens) and its search (2 s), then b; both done."""
    run = control.start_run(graph_id, tenant="a")
    call = run.submit_call(0, "r1")
    call.produced(12)
    call.ended()
    run.apply(ToolCallStarted(agent="a", tool="search"))
    now[0] += 2.0
    run.apply(ToolCallFinished(agent="a", tool="search"))
    run.submit_call(1, "r2").ended()
    run.apply(AgentDone(agent="a"))
    run.apply(AgentDone(agent="b"))
    control.end_run(run.id, "a")


def test_what_runs_taught_survives_a_restart(tmp_path: Path) -> None:
    now = [0.0]
    config = ServeConfig(state_dir=str(tmp_path))
    control = ControlPlane.open(config, clock=lambda: now[0])
    graph = control.create_graph(SPEC, "a")
    teach(control, now, graph.id)
    teach(control, now, graph.id)
    before = graph.learned
    saved = before.saved()
    control.close()

    control = ControlPlane.open(config, clock=lambda: now[0])
    back = control.graph(graph.id, "a")
    after = back.learned
    assert after.saved() == saved
    # By hand: 2 episodes, each (start, a), (a, b), (b, end); a made 1 call of 12 tokens and
    # 1 search per episode, b 1 call of 0 tokens; every search took 2 s.
    assert after.episodes == 2
    assert after.counts == {(-1, 0): 2, (0, 1): 2, (1, -2): 2}
    assert (after.agents[0].calls, after.agents[0].ended_tokens) == (2, 24)
    assert after.agents[0].tool_calls == {"search": 2}
    assert back.costs.estimates.seconds("a", "search") == 2.0
    [(key, estimate)] = back.costs.estimates.items()
    assert key == ("a", "search") and estimate.observations == 2 and estimate.declared == 2.5
    assert back.criticality() == graph.criticality()
    control.delete_graph(graph.id, "a")
    control.close()
    store = StateStore.open(str(tmp_path))
    assert store.learning() == {}  # deleted with its graph
    store.close()


def test_a_version_1_state_file_is_upgraded_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / FILE_NAME)
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO graphs VALUES (?, ?, ?, ?)",
               ("g1", "t", 100, msgspec.json.encode(SPEC)))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = StateStore.open(str(tmp_path))
    assert store.graphs() == [SavedGraph("g1", "t", 100, SPEC)]
    assert store.learning() == {}
    learning = SavedLearning(episodes=1, transitions=[("__start__", "a", 1)], agents=[],
                             tool_estimates=[("a", "search", 1, 3.0)])
    store.save_learning("g1", learning)
    store.close()
    db = sqlite3.connect(tmp_path / FILE_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    # Made without auto_vacuum, it was vacuumed into the incremental mode once at its open.
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    db.close()
    store = StateStore.open(str(tmp_path))
    assert store.learning() == {"g1": learning}
    store.close()


def _file_bytes(state_dir: Path) -> int:
    """The state file and its write-ahead log together: what the store takes on disk."""
    return sum(p.stat().st_size for p in state_dir.glob(FILE_NAME + "*"))


def test_the_state_file_shrinks_after_deletes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = StateStore.open(str(state))
    big = GraphSpec(name="big", agents=[AgentSpec(name=f"agent-{i}", system="x" * 2000)
                                        for i in range(40)])
    for i in range(60):  # ~5 MB of declarations
        store.add_graph(SavedGraph(f"g{i}", "t", 100, big))
    store.close()
    full = _file_bytes(state)
    store = StateStore.open(str(state))
    for i in range(60):
        store.remove_graph(f"g{i}")
    store.close()
    assert full > 4_000_000 and _file_bytes(state) < full / 10, (full, _file_bytes(state))
    store = StateStore.open(str(state))  # and it still reads and writes
    store.add_graph(SavedGraph("g", "t", 100, SPEC))
    assert [g.id for g in store.graphs()] == ["g"]
    store.close()
