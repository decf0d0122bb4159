"""Graphs and runs that outlive the daemon: one SQLite file in the state dir (`--state-dir`).

    table     row                                         written when
    --------  ------------------------------------------  ----------------------------------
    graphs    id, tenant, created, spec (GraphSpec JSON)  declared; deleted (with its runs)
    runs      id, graph_id, tenant, key, created, ended   started; ended (`ended`: unix s)
    learning  graph_id, stats (SavedLearning JSON)        each episode folded; deleted with
                                                          its graph

`learning` is what the graph's runs taught (runtime/graph/learning.py): transition counts,
per-agent and per-tool sums over folded episodes, learned tool durations. Agent activity and
events are not kept: they describe work in flight, which a restart ends (as do transitions
counted in an episode not yet folded). A run without `ended` when a daemon opens the file was
live when the last one stopped; the control plane brings it back as interrupted (see
ControlPlane).

Versions: 1 had no `learning`; opening a version-1 file adds the table and makes it 2.

Each write is one transaction, committed before the call returns, so a daemon killed at any
point loses no declared graph nor started run. The journal is WAL with synchronous=NORMAL: a
commit survives the process dying (a restart, the case that matters), not necessarily the
machine losing power. The file is locked for one daemon at a time (locking_mode=EXCLUSIVE).
Used from the server's event loop only (one thread at a time).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

import msgspec

from kvrt.runtime.config import ConfigError
from kvrt.sdk.protocol.control import GraphSpec, graph_spec_decoder

FILE_NAME = "kvrt-state.sqlite3"
SCHEMA_VERSION = 2
_MIGRATED = (1,)  # older versions this one upgrades in place (their tables are a subset)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS graphs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created INTEGER NOT NULL, spec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, graph_id TEXT NOT NULL, tenant TEXT NOT NULL, key TEXT,
    created INTEGER NOT NULL, ended INTEGER);
CREATE TABLE IF NOT EXISTS learning (graph_id TEXT PRIMARY KEY, stats BLOB NOT NULL);
"""


class StateError(ConfigError):
    """The state dir cannot be used: it cannot be created or written, its file is not a kvrt
    state file (or is corrupt), another daemon holds it, or another version wrote it."""


@dataclass(frozen=True, slots=True)
class SavedGraph:
    id: str
    tenant: str
    created: int  # unix seconds
    spec: GraphSpec  # as declared; validated again when loaded


@dataclass(frozen=True, slots=True)
class SavedRun:
    id: str
    graph_id: str
    tenant: str
    key: str | None
    created: int  # unix seconds


class SavedAgentMeans(msgspec.Struct, kw_only=True):
    name: str
    calls: int  # model calls started, summed over the folded episodes
    ended_calls: int
    ended_tokens: int  # output tokens of the ended calls
    tool_calls: list[tuple[str, int]]  # tool calls started, by tool


class SavedLearning(msgspec.Struct, kw_only=True):
    """One graph's learned statistics (runtime/graph/learning.py)."""

    episodes: int
    transitions: list[tuple[str, str, int]]  # from, to ("__start__", "__end__" too), count
    agents: list[SavedAgentMeans]
    tool_estimates: list[tuple[str, str, int, float]]  # agent, tool, observations, seconds


_learning_decoder = msgspec.json.Decoder(SavedLearning)


class StateStore:
    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, state_dir: str) -> StateStore:
        """Creates the dir and the file if need be, checks them and takes the lock; raises
        StateError with the reason if any of that fails."""
        path = os.path.join(state_dir, FILE_NAME)
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state dir {state_dir}: {exc}") from None
        try:
            db = sqlite3.connect(path, timeout=0, isolation_level=None,
                                 check_same_thread=False)  # the loop's thread, not the opener's
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state file {path}: {exc}") from None
        try:
            _prepare(db, path)
        except sqlite3.Error as exc:
            db.close()
            raise StateError(f"cannot use the state file {path}: {_why(exc)}") from None
        except StateError:
            db.close()
            raise
        return cls(db, path)

    def close(self) -> None:
        self._db.close()

    # -- reading (at startup) ---------------------------------------------------------------

    def graphs(self) -> list[SavedGraph]:
        """Every graph, in the order they were declared."""
        rows = self._read("SELECT id, tenant, created, spec FROM graphs ORDER BY rowid")
        graphs = []
        for graph_id, tenant, created, spec in rows:
            try:
                decoded = graph_spec_decoder.decode(spec)
            except msgspec.DecodeError as exc:  # ValidationError included
                raise StateError(f"graph {graph_id} in {self.path} cannot be read: {exc}"
                                 ) from None
            graphs.append(SavedGraph(graph_id, tenant, created, decoded))
        return graphs

    def learning(self) -> dict[str, SavedLearning]:
        """Every graph's learned statistics, by graph id (graphs no run taught are absent)."""
        saved = {}
        for graph_id, stats in self._read("SELECT graph_id, stats FROM learning"):
            try:
                saved[graph_id] = _learning_decoder.decode(stats)
            except msgspec.DecodeError as exc:
                raise StateError(f"the statistics of graph {graph_id} in {self.path} cannot "
                                 f"be read: {exc}") from None
        return saved

    def open_runs(self) -> list[SavedRun]:
        """The runs not ended, in the order they were started."""
        rows = self._read("SELECT id, graph_id, tenant, key, created FROM runs "
                          "WHERE ended IS NULL ORDER BY rowid")
        return [SavedRun(*row) for row in rows]

    # -- writing (as things change) -----------------------------------------------------------

    def add_graph(self, graph: SavedGraph) -> None:
        self._db.execute("INSERT INTO graphs VALUES (?, ?, ?, ?)",
                         (graph.id, graph.tenant, graph.created,
                          msgspec.json.encode(graph.spec)))

    def remove_graph(self, graph_id: str) -> None:
        """Deletes the graph and every run of it (all ended: the control plane deletes a graph
        only once it has no run)."""
        with self._db:  # one transaction: committed, or rolled back on an error
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM runs WHERE graph_id = ?", (graph_id,))
            self._db.execute("DELETE FROM learning WHERE graph_id = ?", (graph_id,))
            self._db.execute("DELETE FROM graphs WHERE id = ?", (graph_id,))
        # The freed pages leave the file. The pragma frees one page per step, and execute()
        # steps once: executescript runs it to the end.
        self._db.executescript("PRAGMA incremental_vacuum;")

    def save_learning(self, graph_id: str, learning: SavedLearning) -> None:
        self._db.execute("INSERT OR REPLACE INTO learning VALUES (?, ?)",
                         (graph_id, msgspec.json.encode(learning)))

    def add_run(self, run: SavedRun) -> None:
        self._db.execute("INSERT INTO runs (id, graph_id, tenant, key, created) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (run.id, run.graph_id, run.tenant, run.key, run.created))

    def end_run(self, run_id: str, ended: int) -> None:
        self._db.execute("UPDATE runs SET ended = ? WHERE id = ?", (ended, run_id))

    def _read(self, query: str) -> list[tuple]:
        try:
            return self._db.execute(query).fetchall()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state file {self.path}: {_why(exc)}") from None


_INCREMENTAL_VACUUM = 2  # PRAGMA auto_vacuum's value for INCREMENTAL


def _prepare(db: sqlite3.Connection, path: str) -> None:
    """Locks the file, checks its version, and creates the tables of a new one (or those an
    older version lacks). The first statement that reads the file fails on one that is not
    SQLite."""
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION, *_MIGRATED):
        raise StateError(f"the state file {path} has schema version {version}; this "
                         f"kvrt reads version {SCHEMA_VERSION} and upgrades "
                         f"{', '.join(map(str, _MIGRATED))} (use another --state-dir)")
    if db.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL_VACUUM:
        # So that a deleted graph's pages go back to the file system (remove_graph), not stay
        # in the file for ever. A new file takes the mode as it is created; an older one by one
        # VACUUM, once.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if db.execute("PRAGMA page_count").fetchone()[0] > 0:
            db.execute("VACUUM")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    with db:  # one transaction: committed, or rolled back on an error
        db.execute("BEGIN IMMEDIATE")  # a write: takes the exclusive lock, or fails at once
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _why(exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text:
        return f"{text} (is another kvrt daemon using this state dir?)"
    if "not a database" in text or "malformed" in text:
        return f"{text} (not a kvrt state file, or corrupt; move it away or use another dir)"
    return text
