"""A tool that never reports its finish does not hold KV forever: `tokencake` (and `kvrt`) end a
reservation at a deadline derived from the tool's prediction (tool_deadline_factor x predicted,
at least tool_deadline_min_s), and `ttl`'s pin expires on its own, finish or not. A fake clock:
the `now` handed to the hooks."""

from __future__ import annotations

import pytest

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.protocol import AgentEvent, Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.policy.config import TokencakeConfig, TTLConfig
from kvrt.runtime.policy.tokencake import TokencakePolicy
from kvrt.runtime.policy.ttl import TTLPolicy

TTL = TTLConfig()

CODER = ("run-a", "coder")
CONFIG = TokencakeConfig(retention="pins", tool_deadline_factor=3.0, tool_deadline_min_s=10.0)


def kv_with_cached_blocks() -> KVManager:
    """The coder's KV: blocks 0 and 1, cached (no host tier)."""
    kv = KVManager(num_blocks=8, block_size=4)
    table = BlockTable(4, owner=CODER)
    kv.grow(table, 8)
    kv.key_full_blocks(table, list(range(8)), 8, b"")
    kv.free(table)
    return kv


def finished_call(priority: float = 1.0) -> Sequence:
    request = GenerateRequest("r", [1, 2, 3], SamplingParams(),
                              attribution=Attribution(*CODER, priority=priority))
    return Sequence(request, BlockTable(4, owner=CODER), arrival=0.0)


def event(kind: str, predicted_s: float | None = None) -> AgentEvent:
    return AgentEvent(kind, *CODER, predicted_s)  # type: ignore[arg-type]


def reserved_at(now: float) -> tuple[TokencakePolicy, KVManager]:
    """A critical-path call of the coder finished at `now`: its KV is reserved."""
    policy, kv = TokencakePolicy(CONFIG), kv_with_cached_blocks()
    carry_out(kv, policy.on_step(kv, now))
    carry_out(kv, policy.on_finish(finished_call(), kv))
    assert kv.is_pinned(CODER) and kv.num_pinned() == 2
    return policy, kv


@pytest.mark.parametrize(("predicted_s", "lasts_s"), [
    (20.0, 60.0),  # 3 x 20 s
    (1.0, 10.0),  # 3 s is under the floor
    (None, 10.0),  # no prediction: the floor
])
def test_a_reservation_across_a_tool_ends_at_its_deadline(predicted_s, lasts_s) -> None:
    policy, kv = reserved_at(100.0)
    carry_out(kv, policy.on_event(event("tool_call.started", predicted_s), kv, now=101.0))
    assert policy.decisions == {"keep:no_host_tier": 1} and kv.is_pinned(CODER)
    carry_out(kv, policy.on_step(kv, now=101.0 + lasts_s - 0.01))
    assert kv.is_pinned(CODER)  # not yet
    carry_out(kv, policy.on_step(kv, now=101.0 + lasts_s))
    assert not kv.is_pinned(CODER) and kv.num_pinned() == 0
    assert policy.decisions["release:deadline"] == 1
    assert policy.kv_decisions_of("run-a") == {"coder": "release:deadline"}
    assert CODER not in policy.reserved and CODER not in policy.deadlines
    assert kv.pool.usage().cached == 2  # let go, merely evictable again
    kv.check_integrity()


def test_a_tool_that_reports_its_finish_gets_the_floor_from_then_on() -> None:
    policy, kv = reserved_at(100.0)
    carry_out(kv, policy.on_event(event("tool_call.started", 20.0), kv, now=101.0))
    carry_out(kv, policy.on_event(event("tool_call.finished"), kv, now=105.0))
    carry_out(kv, policy.on_step(kv, now=114.9))
    assert kv.is_pinned(CODER)
    carry_out(kv, policy.on_step(kv, now=115.0))  # the next call never came
    assert not kv.is_pinned(CODER)


def test_a_reservation_after_a_call_ends_at_the_floor_without_any_event() -> None:
    policy, kv = reserved_at(100.0)
    carry_out(kv, policy.on_step(kv, now=109.9))
    assert kv.is_pinned(CODER)
    carry_out(kv, policy.on_step(kv, now=110.0))
    assert not kv.is_pinned(CODER) and policy.decisions == {"release:deadline": 1}


def test_the_next_call_ends_the_deadline_with_the_reservation() -> None:
    policy, kv = reserved_at(100.0)
    carry_out(kv, policy.on_event(event("tool_call.started", 1.0), kv, now=101.0))
    carry_out(kv, policy.on_admit(finished_call(), kv))  # its next call came in time
    assert not kv.is_pinned(CODER) and not policy.deadlines
    carry_out(kv, policy.on_step(kv, now=1000.0))
    assert "release:deadline" not in policy.decisions


def test_a_lent_reservation_is_not_reclaimed_past_its_deadline() -> None:
    policy, kv = reserved_at(100.0)
    # Running calls take the pool: the reservation is lent to them.
    running = BlockTable(4, owner=("run-a", "other"))
    kv.grow(running, 24)
    carry_out(kv, policy.on_step(kv, now=101.0))
    assert CODER in policy.lent and not kv.is_pinned(CODER)
    kv.free(running)
    carry_out(kv, policy.on_step(kv, now=110.0))  # room again, but past the deadline: not reclaimed
    assert CODER not in policy.lent and not kv.is_pinned(CODER)
    assert policy.decisions == {"release:deadline": 1}
    kv.check_integrity()


def test_ttl_lets_a_pin_go_at_its_expiry_whether_or_not_the_tool_finishes() -> None:
    policy, kv = TTLPolicy(), kv_with_cached_blocks()
    # A tool that never ends.
    carry_out(kv, policy.on_event(event("tool_call.started", 1000.0), kv, now=0.0))
    assert kv.is_pinned(CODER)
    carry_out(kv, policy.on_step(kv, now=TTL.max_s - 0.01))
    assert kv.is_pinned(CODER)
    carry_out(kv, policy.on_step(kv, now=TTL.max_s))
    assert not kv.is_pinned(CODER) and not policy.expiries
    kv.check_integrity()


def test_the_deadline_config_is_validated() -> None:
    with pytest.raises(ValueError):
        TokencakeConfig(tool_deadline_factor=0.5)
    with pytest.raises(ValueError):
        TokencakeConfig(tool_deadline_min_s=0)
