"""Admission order across tenants: one tenant's burst never queues another's calls behind it.

The policy orders waiting calls (its admission key: arrival, or graph priority); across tenants
that order alone would admit a tenant's thousand queued calls before another tenant's one. So
the waiting calls are interleaved: each call's turn is the number of batch slots its tenant
holds now plus its rank among its tenant's waiting calls (in the policy's order), and calls
are admitted by turn, the policy's order breaking ties. The tenant holding the fewest slots
goes first; with one tenant the policy's order is unchanged. Within a tenant, graph priority
and critical paths order its calls as before; across tenants, slots are shared evenly first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq

from kvrt.runtime.engine.sequence import Sequence


def fair_order(waiting: Seq[Sequence], running: Seq[Sequence]) -> list[Sequence]:
    """`waiting` in the policy's order, interleaved by tenant (see the module's docstring)."""
    if len({seq.tenant for seq in waiting}) < 2:  # one tenant waits: nothing to interleave
        return list(waiting)
    held = Counter(seq.tenant for seq in running)
    ranked = Counter[str]()
    turns = []
    for seq in waiting:
        turns.append(held[seq.tenant] + ranked[seq.tenant])
        ranked[seq.tenant] += 1
    # sorted() is stable: equal turns keep the policy's order
    return [seq for _, seq in sorted(zip(turns, waiting), key=lambda pair: pair[0])]
