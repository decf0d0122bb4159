"""A tool starts right after the call that asked for it, while `tokencake`'s write-through is
still copying that call's last blocks to the host: those blocks are busy, not cached. The
decision on the agent's KV waits for the copies to land and is then made on the tool's time
left, instead of "keep:nothing_cached" on KV that was about to be idle. A gated mover makes
the copies land when the test says."""

from __future__ import annotations

from concurrent.futures import Future

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.protocol import AgentEvent
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import HostSpec, KVManager
from kvrt.runtime.kv.tiers.moves import Move
from kvrt.runtime.policy.config import TokencakeConfig
from kvrt.runtime.policy.tokencake import TokencakePolicy

CODER = ("run-a", "coder")
# Every tool long enough, the pool always under pressure, copies priced at 1 s a block.
CONFIG = TokencakeConfig(pressure_free_fraction=1.0, offload_margin=1.0, copy_latency_s=0.0,
                         prior_bandwidth=1.0, upload_lead_s=0.0)


class GatedMover:
    """Copies nothing; each move's future is done when the test opens the gate."""

    block_bytes, bytes_moved, seconds = 1, 0, 0.0

    def __init__(self) -> None:
        self.waiting: list[Future[None]] = []

    def start(self, move: Move) -> Future[None]:
        future: Future[None] = Future()
        self.waiting.append(future)
        return future

    def open(self) -> None:
        for future in self.waiting:
            future.set_result(None)
        self.waiting.clear()

    def close(self) -> None:
        self.open()


def call_ended_while_backing_up() -> tuple[KVManager, GatedMover, TokencakePolicy]:
    """The coder's call computed 2 full blocks; the policy backed them up (write-through), and
    the call ended before the copies landed."""
    mover = GatedMover()
    kv = KVManager(num_blocks=8, block_size=4, host=HostSpec(8, mover))
    policy = TokencakePolicy(CONFIG)
    table = BlockTable(4, owner=CODER)
    kv.grow(table, 8)
    keyed = kv.key_full_blocks(table, list(range(1, 9)), 8, b"")
    carry_out(kv, policy.on_keyed(keyed, kv))
    kv.free(table)
    assert (kv.cached_blocks(CODER), kv.settling_blocks(CODER)) == (0, 2)
    return kv, mover, policy


def test_the_decision_waits_for_the_write_through_then_offloads() -> None:
    kv, mover, policy = call_ended_while_backing_up()
    carry_out(kv, policy.on_event(AgentEvent("tool_call.started", *CODER, 10.0), kv, 100.0))
    assert policy.decisions == {} and kv.offloaded_blocks(CODER) == 0  # not decided yet
    carry_out(kv, policy.on_step(kv, 100.5))  # the copies are still running
    assert policy.decisions == {}
    mover.open()
    kv.finish_moves()
    assert (kv.cached_blocks(CODER), kv.settling_blocks(CODER)) == (2, 0)
    carry_out(kv, policy.on_step(kv, 101.0))
    assert policy.decisions == {"offload": 1}
    assert kv.offloaded_blocks(CODER) == 2  # the host had both already: no copy
    # Back for the predicted return, 100 + 10, less the 2 s upload: from the tool's start.
    assert policy.away[CODER] == 108.0
    kv.check_integrity()


def test_a_tool_that_is_over_before_the_copies_land_is_never_decided() -> None:
    kv, mover, policy = call_ended_while_backing_up()
    carry_out(kv, policy.on_event(AgentEvent("tool_call.started", *CODER, 10.0), kv, 100.0))
    carry_out(kv, policy.on_event(AgentEvent("tool_call.finished", *CODER), kv, 100.2))
    mover.open()
    kv.finish_moves()
    carry_out(kv, policy.on_step(kv, 101.0))
    assert policy.decisions == {} and kv.offloaded_blocks(CODER) == 0
    kv.check_integrity()


def test_what_is_left_of_the_tool_decides_once_the_copies_land() -> None:
    """5 s predicted, 2 blocks: a 4 s round trip. Decided 1.5 s after the start, 3.5 s are
    left: too short now, though the whole 5 s would not have been."""
    kv, mover, policy = call_ended_while_backing_up()
    carry_out(kv, policy.on_event(AgentEvent("tool_call.started", *CODER, 5.0), kv, 100.0))
    mover.open()
    kv.finish_moves()
    carry_out(kv, policy.on_step(kv, 101.5))
    assert policy.decisions == {"keep:short_tool": 1} and kv.offloaded_blocks(CODER) == 0
