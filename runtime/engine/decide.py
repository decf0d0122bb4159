"""Carrying out a policy's decisions (runtime/policy/decisions.py) on the KV."""

from __future__ import annotations

from collections.abc import Iterable

from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.policy.decisions import (
    Backup,
    Decision,
    Offload,
    Pin,
    Prefetch,
    Retain,
    Unpin,
    Upload,
)


def carry_out(kv: KVManager, decisions: Iterable[Decision]) -> None:
    """Carries out each decision before the policy makes the next: a hook that yields its
    decisions reads their effect on the KV right after each."""
    for decision in decisions:
        match decision:
            case Pin(owner):
                kv.pin(owner)
            case Unpin(owner):
                kv.unpin(owner)
            case Offload(owner):
                kv.offload(owner)
            case Upload(owner):
                kv.upload(owner)
            case Backup(block_ids):
                kv.backup(block_ids)
            case Retain(owner, level):
                kv.set_retention(owner, level)
            case Prefetch(owner):
                kv.prefetch(owner)
