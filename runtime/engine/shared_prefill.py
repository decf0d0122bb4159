"""A waiting call whose prompt shares a prefix that a running prefill is computing waits for it,
instead of computing it again in the same steps (SGLang's in-batch prefix caching, which
deprioritizes such calls; here they are held).

Calls arriving together with one prompt prefix (the planners of runs started at once, reading
one system prompt; the agents of a workflow template) would otherwise each compute it: the
prefix cache finds a block only once the step that computed it has keyed it. Held, a call is
admitted once the blocks are keyed and adopts them. The hold costs it a step at most per chunk
of the producer's, and saves computing the shared tokens: HOLD_MIN_TOKENS is where the saving
outweighs a step (a GPU step's fixed cost, reading the weights, is that of a few hundred
tokens' prefill for a 7B model).
"""

from __future__ import annotations

from collections import Counter

from kvrt.runtime.engine.sequence import Sequence
from kvrt.runtime.kv.manager import AdmissionPlan, KVManager

HOLD_MIN_TOKENS = 256


class SharedPrefill:
    """The blocks running prefills will key, by key. A prefill's keys are listed only when a
    waiting call is checked against them: with nobody waiting, admitting costs no hashing."""

    def __init__(self, kv: KVManager) -> None:
        self.kv = kv
        self._unlisted: dict[int, Sequence] = {}  # id -> admitted, its keys not listed yet
        # id -> (the block index its prompt's keying stops at, its keys not yet keyed)
        self._pending: dict[int, tuple[int, list[bytes]]] = {}
        self._producers: Counter[bytes] = Counter()  # key -> running prefills that will key it

    def hold(self, seq: Sequence, plan: AdmissionPlan) -> bool:
        """Whether `seq` (waiting, its device prefix `plan`) waits: a running prefill computes
        at least HOLD_MIN_TOKENS of the prompt right after what the cache holds."""
        self._list_unlisted()
        if not self._producers:
            return False
        shared = 0
        usable = (len(seq.token_ids) - 1) // self.kv.block_size  # one token left to compute
        for key in self.kv.block_keys(seq.token_ids, seq.salt, plan.prefix.num_blocks,
                                      plan.prefix.last_key, usable):
            if not self._producers[key]:
                break
            shared += self.kv.block_size
            if shared >= HOLD_MIN_TOKENS:
                return True
        return False

    def admitted(self, seq: Sequence) -> None:
        """`seq` was admitted: the prompt blocks its prefill will key are being computed."""
        if self.kv.prefix_caching:
            self._unlisted[id(seq)] = seq

    def keyed(self, seq: Sequence) -> None:
        """`seq`'s step keyed its blocks up to table.num_keyed."""
        pending = self._pending.get(id(seq))
        if pending is None:
            return
        end, keys = pending
        done = seq.table.num_keyed - (end - len(keys))
        if done > 0:
            self._release(keys[:done])
            del keys[:done]
        if not keys:
            del self._pending[id(seq)]

    def forget(self, seq: Sequence) -> None:
        """`seq` left the running batch (finished, aborted or preempted)."""
        self._unlisted.pop(id(seq), None)
        pending = self._pending.pop(id(seq), None)
        if pending is not None:
            self._release(pending[1])

    def _list_unlisted(self) -> None:
        for seq in self._unlisted.values():
            table = seq.table
            # A spliced table keys nothing from its first segment read from another copy on.
            limit = seq.prompt_len if table.key_limit is None else min(seq.prompt_len,
                                                                       table.key_limit)
            end = limit // self.kv.block_size
            keys = list(self.kv.block_keys(seq.token_ids, seq.salt, table.num_keyed,
                                           table.last_key, end))
            if keys:
                self._pending[id(seq)] = end, keys
                self._producers.update(keys)
        self._unlisted.clear()

    def _release(self, keys: list[bytes]) -> None:
        for key in keys:
            self._producers[key] -= 1
            if not self._producers[key]:
                del self._producers[key]
