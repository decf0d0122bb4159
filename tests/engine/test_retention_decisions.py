"""Retain and Prefetch carried out on the KV (runtime/engine/decide.py): levels reach the pool,
a bad level is a policy's bug (ValueError), and a prefetched prefix is read as cached tokens by
a real engine's next call, bit-identical to what was offloaded."""

from __future__ import annotations

import pytest
import torch

from kvrt.runtime.engine.decide import carry_out
from kvrt.runtime.engine.protocol import Attribution, GenerateRequest
from kvrt.runtime.kv.block_pool import DEFAULT_RETENTION
from kvrt.runtime.kv.block_table import BlockTable
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.policy.decisions import Prefetch, Retain
from tests.engine.helpers import greedy, make_engine, run

OWNER = ("run-1", "coder")


def test_retain_sets_the_owners_level_on_its_blocks() -> None:
    kv = KVManager(4, 4)
    table = BlockTable(4, owner=OWNER)
    kv.grow(table, 9)
    kv.key_full_blocks(table, list(range(9)), 9, b"")
    carry_out(kv, [Retain(OWNER, 6)])
    assert kv.retention_of(OWNER) == 6
    assert [kv.pool.blocks[b].retention for b in table.block_ids()] == [6, 6, 6]
    carry_out(kv, [Retain(OWNER, DEFAULT_RETENTION), Prefetch(OWNER)])  # no host: no move
    assert [kv.pool.blocks[b].retention for b in table.block_ids()] == [DEFAULT_RETENTION] * 3
    kv.free(table)
    kv.release_run("run-1")
    kv.check_integrity()


@pytest.mark.parametrize("level", [-1, 8])
def test_a_retention_level_out_of_range_is_a_value_error(level: int) -> None:
    kv = KVManager(4, 4)
    with pytest.raises(ValueError, match="retention level"):
        carry_out(kv, [Retain(OWNER, level)])
    assert kv.retention_of(OWNER) == DEFAULT_RETENTION


def test_a_prefetched_prefix_is_read_as_cached_tokens(tiny_checkpoint_dir) -> None:
    engine = make_engine(tiny_checkpoint_dir(), host_cache_memory=4 * 1024**2)
    tokens = torch.randint(3, 200, (70,), generator=torch.Generator().manual_seed(7)).tolist()

    def call(request_id: str) -> GenerateRequest:
        return GenerateRequest(request_id, tokens, greedy(4), attribution=Attribution(*OWNER))

    first = run(engine, [call("a")])["a"]
    kv, host = engine.kv, engine.kv.host
    assert host is not None
    keyed = [b for b in sorted(kv.owners.blocks_of(OWNER)) if kv.pool.is_cached(b)]
    before = engine.executor.kv_pool[keyed].clone()
    assert kv.offload(OWNER) == len(keyed) > 0 and host.wait() == len(keyed)
    assert kv.match_prefix(tokens, b"").block_ids == []
    assert kv.prefetchable_blocks(OWNER) == len(keyed)
    carry_out(kv, [Retain(OWNER, 5), Prefetch(OWNER)])
    assert host.wait() == len(keyed)
    prefetched = kv.match_prefix(tokens, b"").block_ids  # on the device before the call
    assert len(prefetched) == len(keyed)
    assert all(kv.pool.blocks[b].retention == 5 for b in prefetched)
    assert torch.equal(engine.executor.kv_pool[prefetched], before)
    second = run(engine, [call("b")])["b"]
    assert second.token_ids == first.token_ids
    assert second.final.cached_tokens == first.final.cached_tokens + len(keyed) * 16
    assert engine.stats().kv_blocks_uploaded == len(keyed)  # the call waited on no upload
    engine.check_integrity()
    engine.close()
