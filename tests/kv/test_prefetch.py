"""Prefetch: an owner's KV on the host comes back to the device ahead of its call, as an upload,
only into free blocks and cached ones of lower retention levels (never evicting KV as important,
never touching blocks in use), earliest in the prompt first, skipping what is there or moving,
and only what its last call held (what its next call extends)."""

from __future__ import annotations

from kvrt.runtime.kv.block_pool import DEFAULT_RETENTION
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.owners import Owner
from tests.kv.helpers import adopt_prefix, host_spec

BLOCK = 4
A, B, C = ("run-a", "planner"), ("run-b", "coder"), ("run-c", "critic")
PROMPT = list(range(1, 14))  # 3 full blocks, all usable by a prompt that goes on after them


def compute(kv: KVManager, owner: Owner, tokens: list[int]) -> list[int]:
    """Computes `tokens` for `owner` and frees the table: its full blocks sit cached."""
    table = BlockTable(BLOCK, owner=owner)
    kv.grow(table, len(tokens))
    kv.key_full_blocks(table, tokens, len(tokens), b"")
    blocks = table.block_ids()[: len(tokens) // BLOCK]
    kv.free(table)
    return blocks


def offloaded(kv: KVManager, owner: Owner, tokens: list[int]) -> None:
    """The owner's KV of `tokens`, computed then moved to the host (gone from the device)."""
    assert kv.host is not None
    compute(kv, owner, tokens)
    assert kv.offload(owner) == len(tokens) // BLOCK
    kv.host.wait()
    assert kv.match_prefix(tokens, b"").block_ids == []


def in_use(kv: KVManager, blocks: int) -> BlockTable:
    table = BlockTable(BLOCK, owner=("run-x", "running"))
    kv.grow(table, blocks * BLOCK)
    return table


def release(kv: KVManager, *tables: BlockTable) -> None:
    for table in tables:
        kv.free(table)
    for run in ("run-a", "run-b", "run-c", "run-x"):
        kv.release_run(run)
    assert kv.usage().in_use == kv.usage().in_flight == 0 and kv.owners.is_empty()
    kv.check_integrity()


def test_a_prefetch_takes_only_free_blocks_and_cached_ones_of_lower_levels() -> None:
    kv = KVManager(6, BLOCK, host=host_spec(6, 8))
    offloaded(kv, A, PROMPT)
    running = in_use(kv, 2)
    b_tokens, c_tokens = list(range(30, 39)), list(range(50, 55))
    b_blocks, c_blocks = compute(kv, B, b_tokens), compute(kv, C, c_tokens)
    kv.set_retention(B, 3)  # as important as A's KV will be, or more: kept
    kv.set_retention(C, 1)  # less: may go
    assert kv.usage().free == 1 and kv.retention_of(A) == DEFAULT_RETENTION
    assert kv.match_prefix(c_tokens, b"").block_ids == c_blocks
    assert kv.prefetchable_blocks(A) == 2  # 1 free + C's block; not B's, not the running's
    assert kv.prefetch(A) == 2
    assert kv.host is not None and kv.host.wait() == 2
    assert len(kv.match_prefix(PROMPT, b"").block_ids) == 2  # the first two blocks
    assert kv.match_prefix(b_tokens, b"").block_ids == b_blocks  # B's untouched
    assert kv.match_prefix(c_tokens, b"").block_ids == []  # C's evicted
    assert all(kv.pool.blocks[b].ref_count == 1 for b in running.block_ids())
    landed = kv.match_prefix(PROMPT, b"").block_ids
    assert kv.owners.blocks_of(A) == set(landed)
    assert [kv.pool.blocks[b].retention for b in landed] == [DEFAULT_RETENTION] * 2
    kv.check_integrity()
    # A higher level for A makes room among B's blocks too: the last block comes up.
    kv.set_retention(A, 4)
    assert kv.prefetchable_blocks(A) == 1 and kv.prefetch(A) == 1 and kv.host.wait() == 1
    assert len(kv.match_prefix(PROMPT, b"").block_ids) == 3
    assert [kv.pool.blocks[b].retention for b in kv.match_prefix(PROMPT, b"").block_ids] == [4] * 3
    assert kv.match_prefix(b_tokens, b"").block_ids == b_blocks[:1]  # B's tail went first
    kv.check_integrity()
    release(kv, running)


def test_a_prefetched_prefix_is_read_as_cached_tokens() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    offloaded(kv, A, PROMPT)
    assert kv.prefetch(A) == 3 and kv.host is not None and kv.host.wait() == 3
    plan = kv.plan_admission(PROMPT + [99], b"", budget=64)
    assert not plan.wait and plan.computed == 3 * BLOCK  # nothing to compute, nor to upload
    assert not kv.moves_in_flight() and kv.tier_counts().uploaded == 3
    table = BlockTable(BLOCK, owner=A)
    adopt_prefix(kv, table, plan.prefix)
    release(kv, table)


def test_a_prefetch_brings_the_earliest_blocks_of_the_prompt_first() -> None:
    kv = KVManager(6, BLOCK, host=host_spec(6, 8))
    assert kv.host is not None
    tokens = list(range(1, 18))  # 4 full blocks
    device = compute(kv, A, tokens)
    kv.host.offload(device[2:])  # the last two reach the host first: its lower block ids
    kv.host.wait()
    kv.host.offload(device[:2])
    kv.host.wait()
    host = kv.host.tiers.host
    by_id = sorted(kv.host.tiers.host_owners.blocks_of(A))
    assert [host.blocks[b].position for b in by_id] == [2, 3, 0, 1]
    running = in_use(kv, 4)  # 2 free blocks left: half the chain fits
    assert kv.prefetch(A) == 2 and kv.host.wait() == 2
    assert len(kv.match_prefix(tokens, b"").block_ids) == 2  # a usable prefix, not its tail
    release(kv, running)


def test_a_prefetch_skips_blocks_on_the_device_or_on_their_way() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    assert kv.host is not None
    device = compute(kv, A, PROMPT)
    kv.backup(device)  # the host holds copies; the device keeps its own
    kv.host.wait()
    assert len(kv.host.tiers.host_owners.blocks_of(A)) == 3
    assert kv.prefetchable_blocks(A) == 0 and kv.prefetch(A) == 0
    kv.pool.drop_cached(device[2])  # the device lets the last block go
    assert kv.prefetchable_blocks(A) == 1
    assert kv.prefetch(A) == 1  # on its way: not cached on the host until it lands
    assert kv.prefetchable_blocks(A) == 0 and kv.prefetch(A) == 0
    assert kv.host.wait() == 1 and kv.tier_counts().uploaded == 1
    assert kv.match_prefix(PROMPT, b"").block_ids[:2] == device[:2]
    assert len(kv.match_prefix(PROMPT, b"").block_ids) == 3
    release(kv)


def test_a_prefetch_brings_back_only_what_the_owners_last_call_held() -> None:
    """Two calls of A with different prompts, both sent to the host: its next call extends
    the last one, so only that one's blocks come back."""
    kv = KVManager(8, BLOCK, host=host_spec(8, 8))
    assert kv.host is not None
    earlier, last = list(range(100, 109)), PROMPT  # 2 full blocks, then 3
    offloaded(kv, A, earlier)
    offloaded(kv, A, last)
    assert len(kv.host.tiers.host_owners.blocks_of(A)) == 5
    assert kv.prefetchable_blocks(A) == 3 and kv.prefetch(A) == 3 and kv.host.wait() == 3
    assert len(kv.match_prefix(last, b"").block_ids) == 3
    assert kv.match_prefix(earlier, b"").block_ids == []
    assert kv.prefetchable_blocks(A) == 0
    release(kv)


def test_without_a_host_tier_a_prefetch_does_nothing() -> None:
    kv = KVManager(4, BLOCK)
    compute(kv, A, PROMPT)
    assert kv.prefetchable_blocks(A) == 0 and kv.prefetch(A) == 0
    release(kv)


def test_the_owner_of_a_call_waiting_for_its_upload_goes_to_the_top_level() -> None:
    """In a pool held at high levels, the KV a waiting call has uploaded must not sit at its
    owner's low level: the next upload (another call's, or this call's next part) would evict
    it first, and the call would wait forever. Its owner goes to the highest level, so its
    landed blocks are the most recent there and older KV goes first."""
    kv = KVManager(8, BLOCK, host=host_spec(8, 16))
    assert kv.host is not None
    c_tokens = [200 + t for t in PROMPT]
    offloaded(kv, A, PROMPT)
    offloaded(kv, C, c_tokens)
    b_blocks = compute(kv, B, list(range(100, 132)))  # 8 blocks: the whole pool
    kv.set_retention(B, 7)  # B's next call is due: all of the pool at the top level
    assert kv.retention_of(A) == DEFAULT_RETENTION
    plan = kv.plan_admission(PROMPT + [99], b"", budget=64, owner=A)
    assert plan.wait and kv.retention_of(A) == 7 and kv.host.wait() == 3
    landed = kv.match_prefix(PROMPT, b"").block_ids
    assert len(landed) == 3 and [kv.pool.blocks[b].retention for b in landed] == [7] * 3
    # C's call now waits for its own: it evicts B's oldest, not A's landed blocks.
    assert kv.plan_admission(c_tokens + [99], b"", budget=64, owner=C).wait
    assert kv.host.wait() == 3
    assert kv.match_prefix(PROMPT, b"").block_ids == landed
    assert len(kv.match_prefix(c_tokens, b"").block_ids) == 3
    assert len(kv.owners.blocks_of(B) & set(b_blocks)) == 2  # six of B's went instead
    plan = kv.plan_admission(PROMPT + [99], b"", budget=64, owner=A)
    assert not plan.wait and plan.computed == 3 * BLOCK
    kv.check_integrity()


def test_without_levels_a_waiting_call_leaves_eviction_plain_lru() -> None:
    kv = KVManager(8, BLOCK, host=host_spec(8, 16))
    offloaded(kv, A, PROMPT)
    assert kv.plan_admission(PROMPT + [99], b"", budget=64, owner=A).wait
    assert not kv.owners.has_levels and kv.retention_of(A) == DEFAULT_RETENTION
    assert kv.host is not None and kv.host.wait() == 3
    kv.check_integrity()


def test_blocks_nobody_owns_land_owned_by_the_waiting_call_at_the_top_level() -> None:
    """The usual case: a shared system prompt whose runs have ended sits on the host, owned by
    nobody. The call waiting for it holds it once it lands, at its own (top) level."""
    kv = KVManager(8, BLOCK, host=host_spec(8, 16))
    assert kv.host is not None
    offloaded(kv, A, PROMPT)
    kv.release_run("run-a")  # A's host copies stay, owned by nobody
    compute(kv, B, list(range(100, 132)))
    kv.set_retention(B, 7)
    waiting = ("run-d", "writer")
    assert kv.plan_admission(PROMPT + [99], b"", budget=64, owner=waiting).wait
    assert kv.host.wait() == 3
    landed = kv.match_prefix(PROMPT, b"").block_ids
    assert kv.owners.blocks_of(waiting) == set(landed) and len(landed) == 3
    assert [kv.pool.blocks[b].retention for b in landed] == [7] * 3
    kv.release_run("run-d")
    assert [kv.pool.blocks[b].retention for b in landed] == [DEFAULT_RETENTION] * 3
    kv.check_integrity()
