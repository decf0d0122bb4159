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
    def __init__(self, kv: KVManager) -> None:
        self.kv = kv
        self._producers: Counter[bytes] = Counter()  # key -> running prefills that will key it
        self._pending: dict[int, list[bytes]] = {}  # id(seq) -> its keys not yet keyed, in order
        self._first: dict[int, int] = {}  # id(seq) -> the block index of its first pending key

    def hold(self, seq: Sequence, plan: AdmissionPlan) -> bool:
        """Whether `seq` (waiting, its device prefix `plan`) waits: a running prefill computes
        at least HOLD_MIN_TOKENS of the prompt right after what the cache holds."""
        if not self._producers:
            return False
        shared = 0
        start = plan.prefix.num_blocks
        usable = (len(seq.token_ids) - 1) // self.kv.block_size  # one token left to compute
        for key in self.kv.block_keys(seq.token_ids, seq.salt, start, plan.prefix.last_key,
                                      usable):
            if not self._producers[key]:
                break
            shared += self.kv.block_size
            if shared >= HOLD_MIN_TOKENS:
                return True
        return False

    def admitted(self, seq: Sequence) -> None:
        """`seq` was admitted: the prompt blocks its prefill will key are being computed."""
        if not self.kv.prefix_caching:
            return
        table = seq.table
        limit = seq.prompt_len if table.key_limit is None else min(seq.prompt_len,
                                                                   table.key_limit)
        keys = list(self.kv.block_keys(seq.token_ids, seq.salt, table.num_keyed,
                                       table.last_key, limit // self.kv.block_size))
        if keys:
            self._pending[id(seq)], self._first[id(seq)] = keys, table.num_keyed
            self._producers.update(keys)

    def keyed(self, seq: Sequence) -> None:
        """`seq`'s step keyed its blocks up to table.num_keyed."""
        keys = self._pending.get(id(seq))
        if keys is None:
            return
        done = seq.table.num_keyed - self._first[id(seq)]
        if done <= 0:
            return
        self._release(keys[:done])
        del keys[:done]
        self._first[id(seq)] += done
        if not keys:
            self.forget(seq)

    def forget(self, seq: Sequence) -> None:
        """`seq` left the running batch (finished, aborted or preempted)."""
        keys = self._pending.pop(id(seq), None)
        self._first.pop(id(seq), None)
        if keys:
            self._release(keys)

    def _release(self, keys: list[bytes]) -> None:
        for key in keys:
            self._producers[key] -= 1
            if not self._producers[key]:
                del self._producers[key]
