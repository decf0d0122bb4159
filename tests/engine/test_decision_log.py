"""The ring of recent decisions: what each records, bounded, and read while written."""

from __future__ import annotations

import threading

from kvrt.runtime.engine.decision_log import DecisionLog, DecisionRecord
from kvrt.runtime.policy.decisions import Backup, Offload, Pin, Retain, Upload


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_decision_is_recorded_as_it_passes() -> None:
    clock = Clock()
    log = DecisionLog(clock)
    seen, decisions = [], [Pin(("r", "a")), Upload(("r", "b"), due=102.5),
                           Retain(("r", "a"), 5), Backup((1, 2, 3))]
    for decision in log.recording(decisions, "tool_call.started"):
        seen.append((decision, len(log.recent().records)))  # recorded before carried out
        clock.now += 1
    assert seen == [(d, i + 1) for i, d in enumerate(decisions)]
    recent = log.recent()
    assert recent.now == 104.0
    assert recent.records == (
        DecisionRecord(100.0, "pin", "tool_call.started", "r", "a", ""),
        DecisionRecord(101.0, "upload", "tool_call.started", "r", "b", "due in 1.50 s"),
        DecisionRecord(102.0, "retain", "tool_call.started", "r", "a", "level 5"),
        DecisionRecord(103.0, "backup", "tool_call.started", None, None, "3 blocks"),
    )


def test_the_ring_keeps_the_last_ones() -> None:
    log = DecisionLog(Clock(), capacity=3)
    list(log.recording([Offload(("r", f"a{i}")) for i in range(5)], "step"))
    assert [r.agent for r in log.recent().records] == ["a2", "a3", "a4"]


def test_reading_while_the_engine_writes() -> None:
    log = DecisionLog(Clock(), capacity=64)
    done = threading.Event()

    def write() -> None:
        for _ in range(20):
            list(log.recording([Pin(("r", "a"))] * 500, "step"))
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not done.is_set():
        assert len(log.recent().records) <= 64  # a copy, never a deque mutated mid-read
    writer.join()
