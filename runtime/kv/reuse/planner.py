"""The reuse planner: position-independent reuse of segments, per request or for a whole round.

A request's segments (`GenerateRequest.segments`: marked messages, or every message of an
"approximate" graph's calls) are text whose KV may come from another prompt, computed at
another position. The policy's `ReuseConfig.mode` (config.py) says how:

    mode         at admission, for each segment past the exact prefix match
    -----------  -------------------------------------------------------------------------
    off          nothing: exact prefix reuse only (the default; segments are ignored)
    per-request  reuse the copy the segment index holds now, if any; else compute it
    collective   as per-request; and a request whose segment another live request is
                 computing now is not admitted until that copy is indexed (`hold`)

In an All-Gather round all agents' calls arrive together, each with the same shared segments
after its own private history. Per request, each misses the segment index (index.py: nobody has
computed the shared text yet) and computes it again. Collectively, the first admitted computes
it (its copy is the round's master), the others wait, then are admitted together: their
recomputes run in one batch, and the shared text is computed once per round, whatever the
number of agents.

Runs (collective mode). A round's messages are adjacent segments, the same text in the same
order in every prompt: a run. Read segment by segment (from each speaker's output, say), each
reader recomputes the head of every message, since each copy was computed after other text:
N readers of N messages recompute ~ratio x N^2 messages' worth, as many per request. Read as
one copy of the whole run, computed once in the same order, the text inside the run follows
what it followed in the master, and only the run's start follows the reader's own context:
the reader recomputes the head of the run's first segment alone. The collective step knows
the round (the waiting calls that share the run), so it chooses by cost: the run, computed once
by its first reader, when the readers' heads per segment would cost more than the run plus
their heads of it (`_run_pays`); else segment by segment. Only a copy of the whole run is read
as the run (`_run_splice`): a call that read a run segment by segment leaves a copy of its start
(its rows before its first splice are a prefix's), and read as the run, that start would leave
every reader computing the rest of the run itself.

Reuse of a segment of length L at position s, from a copy computed at position c: the reader
computes its first k = ceil(recompute_ratio * L) tokens itself, in its own context (EPIC-style:
they restore the attention to the reader's history that the copy never saw), and reads the rest
of the copy's rows in place, at shift s - c (a splice, runtime/kv/block_table.py). The rows it
computed are its diff against the master; the rest it shares. The last prompt token is always
computed (its logits are needed). Once its prompt is computed, the reader keeps only the part
of its diff that changed most from the master (`diff_keep`, `_share_unchanged`): the rest of
it reads the master's rows too, and its rows are given back.

The planner reads a request through `Reader` (the engine's Sequence) and the KV through the KV
manager's segment verbs; it never writes a block table itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import torch

from kvrt.kernels import coalesce_runs
from kvrt.runtime.kv.block_table import BlockTable, Splice, blocks_of
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.owners import Owner
from kvrt.runtime.kv.reuse.config import ReuseConfig
from kvrt.runtime.kv.reuse.index import segment_key
from kvrt.runtime.kv.rows import KVRows

# An output quoted in a message is followed by the message's end (the output's last token, which
# decoding gave no KV, and the template's end of turn): an output copy covering all the segment
# but this many last tokens is reused, a shorter match is not.
_TAIL = 4


class Reader(Protocol):
    """What the planner reads of a request being served (the engine's Sequence). Readers are
    told apart by identity."""

    table: BlockTable
    token_ids: list[int]  # the prompt, then the tokens generated so far
    num_computed: int

    @property
    def prompt_len(self) -> int: ...

    @property
    def num_output(self) -> int: ...

    @property
    def salt(self) -> bytes: ...

    @property
    def segments(self) -> tuple[tuple[int, int], ...]: ...

    admitted_once: bool


@dataclass(frozen=True, slots=True)
class _Segment:
    start: int
    end: int
    key: bytes
    token_ids: tuple[int, ...]
    # Its text that follows what the reader computed itself, whose head the reader recomputes:
    # all of a segment; a run's first segment.
    head_of: int


@dataclass(frozen=True, slots=True)
class _Run:
    """Adjacent segments, reusable as one copy (collective mode)."""

    whole: _Segment
    parts: tuple[_Segment, ...]


class ReusePlanner:
    def __init__(self, kv: KVManager, config: ReuseConfig, rows: KVRows | None = None) -> None:
        """`rows`: the KV tensor's (or the simulation's stand-in), to measure how much a
        reader's rows changed (None: nothing to compare; see `_share_unchanged`)."""
        self.kv, self.config = kv, config
        self.rows = rows
        self._segments: dict[Reader, list[_Segment]] = {}  # segments, then runs' wholes
        self._runs: dict[Reader, list[_Run]] = {}
        # Collective mode: the calls waiting for their first admission, by the runs they read
        # (how many readers share a run: `_run_pays`).
        self._run_readers: dict[bytes, set[Reader]] = {}
        self._producers: dict[bytes, Reader] = {}  # segment key -> the live seq computing it
        # seq -> splice start -> the master's slots for the head the seq recomputes before it.
        self._heads: dict[Reader, dict[int, torch.Tensor]] = {}
        # Counters since start, over first admissions (with reuse off too): tokens in segments,
        # and of those the ones read from another copy (not computed, not stored again).
        self.segment_requests = 0
        self.segment_tokens = 0
        self.reused_tokens = 0
        self.dropped_tokens = 0  # recomputed, then found to change too little to keep
        # Per agent of a run: segment tokens, and of those the ones shared with another copy.
        self.by_owner: dict[Owner, tuple[int, int]] = {}

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    def hold(self, seq: Reader) -> bool:
        """Collective mode: whether `seq` should wait, because another live request has yet to
        compute one of its segments to the end. Not just until the index holds a copy: a
        master whose prefill is chunked leaves a segment's first rows indexed at the end of a
        step, and a reader admitted then would compute the rest of that segment itself (or
        all of it, the copy being too short to read) in the step that completes it."""
        if self.config.mode != "collective":
            return False
        for segment in self._of(seq):
            producer = self._producers.get(segment.key)
            if (producer is not None and producer is not seq
                    and self._computing(producer, segment.key)):
                return True
        return False

    def _computing(self, producer: Reader, key: bytes) -> bool:
        """Whether `producer` has yet to compute its copy of the segment `key` to the end."""
        end = next(s.end for s in self._of(producer) if s.key == key)
        return producer.num_computed < end

    def on_add(self, seq: Reader) -> None:
        """`seq` waits for admission: in collective mode, it counts as a reader of its runs."""
        if self.config.mode == "collective" and not seq.admitted_once:
            for run in self._runs_of(seq):
                self._run_readers.setdefault(run.whole.key, set()).add(seq)

    def plan(self, seq: Reader, computed: int) -> list[Splice]:
        """The splices for `seq`, whose first `computed` positions its exact prefix covers; in
        collective mode, it becomes the producer of the segments (or runs) it will compute
        itself."""
        if not self.enabled:
            return []
        splices, heads, covered = [], {}, set[_Segment]()
        collective = self.config.mode == "collective"
        # Each segment's splice is looked up once (a run's parts for its cost, then to read).
        splice_of = functools.cache(lambda segment: self._splice(seq, segment))
        for segment in self._of(seq):
            # Its prefix reaches into it (a master preempted, admitted again): it computes the
            # rest itself, and readers wait for it again.
            if collective and segment.start < computed < segment.end:
                self._producers.setdefault(segment.key, seq)
        for run in self._runs_of(seq):
            if run.whole.start < computed:
                continue
            found = self._run_splice(run, splice_of(run.whole))
            if found is None and not self._run_pays(run, [splice_of(p) for p in run.parts]):
                continue
            covered.update(run.parts)
            if found is not None:
                splices.append(found[0])
                heads[found[0].start] = found[1]
            else:  # the round's master: computes the run whole
                self._producers.setdefault(run.whole.key, seq)
        for segment in self._of(seq)[:len(seq.segments)]:  # (then the runs' wholes)
            if segment.start < computed or segment in covered:
                continue
            found = splice_of(segment)
            if found is not None:
                splices.append(found[0])
                heads[found[0].start] = found[1]
            elif collective:
                self._producers.setdefault(segment.key, seq)
        self._heads[seq] = heads
        return sorted(splices, key=lambda s: s.start)

    def _run_splice(self, run: _Run, found: tuple[Splice, torch.Tensor] | None
                    ) -> tuple[Splice, torch.Tensor] | None:
        """`found`, the splice from the run's copy, if that copy is the run's: it reaches the
        block holding the run's end (which may still be filling). A shorter one is the start
        of the run only, which a call that read the rest from other copies left (its rows
        before its first splice are a prefix's, indexed as they are keyed): read as the run,
        each reader would compute all the rest itself, and nobody would wait for a master."""
        if found is None or found[0].end > run.whole.end - self.kv.block_size:
            return found
        return None

    def _run_pays(self, run: _Run, parts_found: list[tuple[Splice, torch.Tensor] | None]
                  ) -> bool:
        """Whether computing `run` whole for its waiting readers costs less than their reading
        it segment by segment (each reader alike: one that would read `parts_found`, the run's
        parts' splices)."""
        readers = len(self._run_readers.get(run.whole.key, ()))
        if readers < 2:
            return False
        alone = 0
        for part, found in zip(run.parts, parts_found, strict=True):
            alone += len(part.token_ids) - (0 if found is None else found[0].end - found[0].start)
        head = math.ceil(self.config.recompute_ratio * run.whole.head_of)
        return readers * alone > len(run.whole.token_ids) + (readers - 1) * head

    def _splice(self, seq: Reader, segment: _Segment) -> tuple[Splice, torch.Tensor] | None:
        """From a copy of the whole segment, else from an earlier call's output inside it (the
        segment's other tokens, e.g. a message's header, are computed). With the splice, the
        copy's slots for the positions just before it that the reader recomputes (its head):
        the splice references their blocks too, for `_share_unchanged`."""
        copy, offset, length = self.kv.segments.find(segment.key, segment.token_ids), 0, 0
        if copy is not None:
            length = copy.length
        else:
            within = self.kv.segments.find_within(seq.salt, segment.token_ids)
            if within is None or within.offset + within.length < len(segment.token_ids) - _TAIL:
                return None  # it covers part of the segment: better one whole master copy
            copy, offset, length = within.copy, within.offset, within.length
        # Segment offsets [first, last) are read from the copy's rows [first - offset, ...).
        first = max(offset, math.ceil(self.config.recompute_ratio * segment.head_of))
        last = min(offset + length, seq.prompt_len - 1 - segment.start)
        if last - first < self.config.min_reused_tokens:
            return None
        slots = copy.slots[first - offset:last - offset]
        head = copy.slots[:first - offset]
        block_ids = blocks_of(torch.cat([head, slots]), self.kv.block_size)
        if self.kv.is_moving(block_ids):
            return None  # on its way to the host
        return Splice(segment.start + first, segment.start + last, slots,
                      segment.start + offset - copy.start, block_ids, head=first), head

    def count_admission(self, seq: Reader, splices: list[Splice]) -> int:
        """Counts a first admission; returns the positions its splices cover."""
        reused = sum(s.end - s.start for s in splices)
        self._unwait(seq)
        if seq.segments:  # counted with reuse off too: what full copies cost
            tokens = sum(end - start for start, end in seq.segments)
            self.segment_requests += 1
            self.segment_tokens += tokens
            self.reused_tokens += reused
            owner = seq.table.owner
            if owner is not None:  # replaced whole: read from the server's thread
                before = self.by_owner.get(owner, (0, 0))
                self.by_owner[owner] = (before[0] + tokens, before[1] + reused)
        return reused

    def on_run_end(self, run: str) -> None:
        for owner in [o for o in self.by_owner if o[0] == run]:
            del self.by_owner[owner]

    def on_computed(self, seq: Reader) -> None:
        """After a step computed part of `seq`: offers the index the segments it computed
        itself. Before its first splice, its rows are a prefix's: a copy covers the rows the
        prefix index has keyed so far (and grows with them). Past it, the prefix index keys
        nothing: a segment is offered once computed, its blocks kept (`keep_cached`). Once its
        prompt is computed, it produces nothing more."""
        if not self.enabled:
            return
        table, salt = seq.table, seq.salt
        limit = table.key_limit if table.key_limit is not None else seq.prompt_len
        keyed_end = min(table.num_keyed * self.kv.block_size, limit)
        for segment in self._of(seq):
            if segment.start >= keyed_end:
                if segment.start < limit or segment.end > seq.num_computed:
                    continue
                if table.num_own(segment.start, segment.end) < segment.end - segment.start:
                    continue  # it reads another copy: nothing of its own to offer
                slots = self.kv.keep_cached(table, segment.start, segment.end, salt)
                self.kv.segments.offer(segment.key, segment.token_ids, segment.start, slots)
                continue
            slots = table.slots[segment.start:min(segment.end, keyed_end)]
            blocks = (slots // self.kv.block_size).tolist()
            # A block whose key another block already held was left unkeyed: stop before it.
            unkeyed = next((i for i, b in enumerate(blocks) if not self.kv.is_keyed(b)),
                           len(blocks))
            self.kv.segments.offer(segment.key, segment.token_ids, segment.start,
                                   slots[:unkeyed])
        if seq.num_computed >= seq.prompt_len:
            self._share_unchanged(seq)
            self.forget(seq)

    def _share_unchanged(self, seq: Reader) -> None:
        """Diff encode, once the prompt is computed: of the head rows a reader recomputed
        before each splice (its diff against the master), it keeps the `diff_keep` share that
        changed most (`KVRows.change`: K and V against the master's rows, over every
        layer); the others read the master's rows from now on, and their own rows serve the
        next positions. The recompute has done its work by then: the prompt's last tokens, and
        so the first output token, saw every recomputed row."""
        heads = self._heads.get(seq)
        if not heads or self.config.diff_keep >= 1:
            return
        table, block_size, parts = seq.table, self.kv.block_size, []
        for splice in table.splices:
            head = heads.get(splice.start)
            if head is None or not head.numel():
                continue
            start = splice.start - head.numel()
            own = table.slots[start:splice.start]
            if self.rows is not None:
                change = self.rows.change(own, head, splice.shift)
            else:  # no KV to compare (a planner built without one): keep the first rows
                change = -torch.arange(head.numel(), dtype=torch.float32)
            # A row in a keyed block stays: the block is another prompt's prefix now.
            keyed = torch.tensor([self.kv.is_keyed(b) for b in (own // block_size).tolist()])
            change[keyed] = float("inf")
            kept = math.ceil(self.config.diff_keep * head.numel())
            drop = torch.zeros(head.numel(), dtype=torch.bool)
            drop[change.argsort(descending=True)[kept:]] = True
            drop &= ~keyed
            for a, n in coalesce_runs(torch.nonzero(drop).flatten().tolist()):
                parts.append((start + a, head[a:a + n], splice.shift))
        shared = self.kv.splice_computed(table, seq.num_computed, parts)
        if seq.num_output:  # recomputed after a preemption: counted the first time
            return
        self.dropped_tokens += shared
        counted = self.by_owner.get(table.owner) if table.owner is not None else None
        if shared and counted is not None:  # (None: its run has ended meanwhile)
            self.by_owner[table.owner] = (counted[0], counted[1] + shared)

    def on_finish(self, seq: Reader) -> None:
        """`seq` is done (finished or aborted), its blocks not yet released: its output (the
        rows decoding gave KV) becomes a copy, kept cached after the call, for a later prompt
        that quotes it; and each segment it computed whole, whose copy covered only the blocks
        the prefix index keyed (`on_computed`), is indexed whole, its last block kept too."""
        self.forget(seq)
        self._unwait(seq)
        self._runs.pop(seq, None)
        segments = self._segments.pop(seq, [])
        if not self.enabled:
            return
        table = seq.table
        for segment in segments:
            length = segment.end - segment.start
            if segment.end <= seq.num_computed and table.num_own(segment.start,
                                                                 segment.end) == length:
                slots = self.kv.keep_cached(table, segment.start, segment.end, seq.salt)
                self.kv.segments.offer(segment.key, segment.token_ids, segment.start, slots)
        # From the second token: a quote puts other text before the first (a name, a space),
        # so it rarely tokenizes the same there.
        start, end = seq.prompt_len + 1, seq.num_computed
        if end <= start:
            return
        slots = self.kv.keep_cached(seq.table, start, end, seq.salt)
        self.kv.segments.offer_output(seq.salt, tuple(seq.token_ids[start:end]), start, slots)

    def forget(self, seq: Reader) -> None:
        """`seq` computes nothing for others any more (preempted, refused, done)."""
        self._heads.pop(seq, None)
        for segment in self._segments.get(seq, ()):
            if self._producers.get(segment.key) is seq:
                del self._producers[segment.key]

    def _of(self, seq: Reader) -> list[_Segment]:
        """Its segments, then (collective mode) its runs' wholes: what it may compute for others."""
        segments = self._segments.get(seq)
        if segments is None:
            ids, salt = seq.token_ids, seq.salt  # (segments lie in the prompt)
            segments = []
            for start, end in seq.segments:
                tokens = tuple(ids[start:end])
                segments.append(_Segment(start, end, segment_key(salt, tokens), tokens,
                                         len(tokens)))
            runs = _runs(segments, salt) if self.config.mode == "collective" else []
            self._runs[seq] = runs
            self._segments[seq] = segments + [run.whole for run in runs]
        return self._segments[seq]

    def _runs_of(self, seq: Reader) -> list[_Run]:
        self._of(seq)
        return self._runs[seq]

    def _unwait(self, seq: Reader) -> None:
        for run in self._runs.get(seq, ()):
            readers = self._run_readers.get(run.whole.key)
            if readers is not None:
                readers.discard(seq)
                if not readers:
                    del self._run_readers[run.whole.key]


def _runs(segments: list[_Segment], salt: bytes) -> list[_Run]:
    """The maximal runs of two or more adjacent segments."""
    groups: list[list[_Segment]] = []
    for segment in segments:
        if groups and groups[-1][-1].end == segment.start:
            groups[-1].append(segment)
        else:
            groups.append([segment])
    runs = []
    for parts in (g for g in groups if len(g) > 1):
        tokens = tuple(t for part in parts for t in part.token_ids)
        whole = _Segment(parts[0].start, parts[-1].end, segment_key(salt, tokens), tokens,
                         len(parts[0].token_ids))
        runs.append(_Run(whole, tuple(parts)))
    return runs
