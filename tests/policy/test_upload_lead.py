"""`tokencake`'s predictive upload starts early enough to land before the predicted return:
its lead covers the copy, the margin and two of the engine's tick intervals, measured from the
on_step calls (a fake clock over a KV manager with a host tier and a real mover)."""

from __future__ import annotations

import pytest
import torch

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import HostSpec, KVManager
from kvrt.runtime.kv.tiers.mover import BlockMover
from kvrt.runtime.policy.config import TokencakeConfig
from kvrt.runtime.policy.decisions import Upload
from kvrt.runtime.policy.tokencake import TICK_WINDOW, TokencakePolicy

CODER, OTHER = ("run-a", "coder"), ("run-a", "other")
BLOCKS, BLOCK = 8, 4
# 2 blocks of 256 bytes at 1 MB/s, plus 10 ms: the upload's copy takes 10.512 ms.
COPY_S = 0.01 + 2 * 256 / 1e6


def setup(timed: bool) -> tuple[TokencakePolicy, KVManager]:
    """The coder holds 2 cached blocks; another agent's 6 cached ones fill the pool."""
    shape = (1, 2, BLOCK, 1, 8)  # layers, K/V, rows, heads, dim: 256 bytes a block
    mover = BlockMover(torch.randn((BLOCKS, *shape)), torch.zeros((BLOCKS, *shape)))
    kv = KVManager(BLOCKS, BLOCK, host=HostSpec(BLOCKS, mover))
    for owner, start, count in ((CODER, 1, 9), (OTHER, 100, 6 * BLOCK)):
        table = BlockTable(BLOCK, owner=owner)
        tokens = list(range(start, start + count))
        kv.grow(table, count)
        kv.key_full_blocks(table, tokens, count, b"")
        kv.free(table)
    config = TokencakeConfig(prior_bandwidth=1e6, copy_latency_s=0.01, upload_lead_s=0.05,
                             timed_upload_lead=timed)
    return TokencakePolicy(config), kv


def _ticks_until_upload(policy: TokencakePolicy, kv: KVManager, every_s: float
                        ) -> tuple[float, list]:
    """on_step every `every_s` from 100.0 (the tool starts at the first tick, predicted to
    take 10 s) until the policy uploads; returns that tick's time and its uploads."""
    now = 100.0
    carry_out(kv, policy.on_step(kv, now))
    carry_out(kv, policy.on_event(AgentEvent("tool_call.started", *CODER, 10.0), kv, now))
    assert policy.decisions == {"offload": 1} and kv.host is not None
    kv.host.wait()
    for tick in range(1, 1000):
        now = 100.0 + tick * every_s
        decisions = list(policy.on_step(kv, now))
        carry_out(kv, decisions)
        uploads = [d for d in decisions if isinstance(d, Upload)]  # not its retention levels
        if uploads:
            return now, uploads
    raise AssertionError("no upload")


@pytest.mark.parametrize("every_s", [0.05, 0.2])
def test_the_upload_starts_two_ticks_earlier_than_the_copy_and_margin_need(every_s) -> None:
    policy, kv = setup(timed=True)
    at, decisions = _ticks_until_upload(policy, kv, every_s)
    # Due back at 110.0: the copy and the margin alone would start it at 109.939488; with
    # two tick intervals besides, at the first tick at or after 109.939488 - 2 x every_s.
    first = {0.05: 109.85, 0.2: 109.6}[every_s]
    assert at == pytest.approx(first)
    assert decisions == [Upload(CODER, due=110.0)]  # timed against the predicted return
    assert policy.tick_lead_s() == pytest.approx(2 * every_s)
    assert kv.host is not None and kv.host.in_flight()
    kv.host.wait()
    kv.check_integrity()


def test_without_the_timed_lead_the_upload_starts_at_the_first_tick_past_copy_and_margin() -> None:
    policy, kv = setup(timed=False)
    at, decisions = _ticks_until_upload(policy, kv, 0.2)
    assert at == pytest.approx(110.0)  # the tick at the predicted return: too late to land
    assert decisions == [Upload(CODER, due=110.0)] and policy.tick_lead_s() == 0.0
    assert kv.host is not None
    kv.host.wait()


def test_the_lead_follows_the_longest_recent_tick() -> None:
    """One long step (a second between ticks) counts until TICK_WINDOW ticks have passed."""
    policy, kv = setup(timed=True)  # nothing offloaded: only the clock matters
    assert policy.tick_lead_s() == 0.0  # nothing measured yet
    now = 0.0
    for interval in (0.05, 1.0, *[0.05] * (TICK_WINDOW - 1)):
        now += interval
        assert list(policy.on_step(kv, now)) == []
    assert policy.tick_lead_s() == pytest.approx(2.0)
    assert list(policy.on_step(kv, now + 0.05)) == []  # the long one leaves the window
    assert policy.tick_lead_s() == pytest.approx(0.1)


def test_an_upload_the_tools_finish_asks_for_is_not_timed() -> None:
    policy, kv = setup(timed=True)
    carry_out(kv, policy.on_event(AgentEvent("tool_call.started", *CODER, 10.0), kv, 100.0))
    assert kv.host is not None
    kv.host.wait()
    decisions = list(policy.on_event(AgentEvent("tool_call.finished", *CODER), kv, 102.0))
    assert [d for d in decisions if isinstance(d, Upload)] == [Upload(CODER, due=None)]
    carry_out(kv, decisions)
    kv.host.wait()

