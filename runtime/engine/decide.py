"""Carrying out a policy's decisions (runtime/policy/decisions.py) on the KV."""

from __future__ import annotations

from collections.abc import Iterable

from kvrt.runtime.engine.landing import UploadLandings
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


def carry_out(kv: KVManager, decisions: Iterable[Decision],
              landings: UploadLandings | None = None) -> None:
    """Carries out each decision before the policy makes the next: a hook that yields its
    decisions reads their effect on the KV right after each. An upload planned ahead (`due`)
    that starts is watched in `landings`, if given."""
    for decision in decisions:
        match decision:
            case Pin(owner):
                kv.pin(owner)
            case Unpin(owner):
                kv.unpin(owner)
            case Offload(owner):
                kv.offload(owner)
            case Upload(owner, due):
                if kv.upload(owner) and due is not None and landings is not None:
                    landings.planned(owner, due)
            case Backup(block_ids):
                kv.backup(block_ids)
            case Retain(owner, level):
                kv.set_retention(owner, level)
            case Prefetch(owner):
                kv.prefetch(owner)
