"""Which replica has lately seen a prompt's prefix: the routers' picture of the replicas' caches.

The front daemon cannot see into a replica's prefix cache, so it remembers what it sent where.
A prompt is cut into blocks of BLOCK_TOKENS tokens; block i's key chains the keys before it
(like the engine's prefix hash, runtime/kv/prefix_hash.py, but a plain `hash`: this is a
routing hint, never a cache hit) and the tenant's salt, so a prompt shares a key with another
exactly as far as their first tokens agree. Each replica keeps the keys of the prompts routed to
it lately, at most `capacity`, the least recently used falling off first, as its cache's LRU
eviction would.
"""

from __future__ import annotations

from collections import OrderedDict

from kvrt.runtime.engine.protocol import GenerateRequest

BLOCK_TOKENS = 16
MAX_BLOCKS = 256  # a prompt's first 4,096 tokens decide
CAPACITY = 1 << 16  # keys remembered per replica


def prefix_chain(request: GenerateRequest, block_tokens: int = BLOCK_TOKENS,
                 max_blocks: int = MAX_BLOCKS) -> list[int]:
    """The keys of the prompt's full blocks (at most `max_blocks`), first block first."""
    ids = request.prompt_token_ids
    chain, key = [], hash(request.salt)
    for start in range(0, min(len(ids) // block_tokens, max_blocks) * block_tokens,
                       block_tokens):
        key = hash((key, tuple(ids[start:start + block_tokens])))
        chain.append(key)
    return chain


class PrefixIndex:
    def __init__(self, replicas: int, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]

    def matched(self, replica: int, chain: list[int]) -> int:
        """How many of the chain's first blocks the replica saw lately. What is kept of a chain
        is a prefix of it (see add): binary search for its end."""
        seen = self._seen[replica]
        low, high = 0, len(chain)
        while low < high:
            middle = (low + high + 1) // 2
            if chain[middle - 1] in seen:
                low = middle
            else:
                high = middle - 1
        return low

    def add(self, replica: int, chain: list[int]) -> None:
        # Last block first, so that a block is never older than the blocks after it: the LRU
        # end drops a prompt's tail before its head, and what is kept is always a prefix.
        seen = self._seen[replica]
        for key in reversed(chain):
            seen[key] = None
            seen.move_to_end(key)
        while len(seen) > self._capacity:
            seen.popitem(last=False)

    def forget(self, replica: int) -> None:
        """The replica lost its cache (it died)."""
        self._seen[replica].clear()
