"""Scheduling policies are plug-ins chosen by name (`--policy`).

A policy decides two orders and nothing else:
- `admission_key(seq)`: waiting sequences are admitted in ascending key order;
- `victim(running)`: which running sequence gives its blocks back when the pool runs dry
  (preempting a sequence is always safe: it is recomputed later, from cached prefix blocks
  where they survive).
Eviction of unreferenced cached blocks is LRU inside the block pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrt.runtime.engine.sequence import Sequence

_REGISTRY: dict[str, Callable[[], Policy]] = {}


class Policy(ABC):
    name: str

    @abstractmethod
    def admission_key(self, seq: Sequence) -> tuple: ...

    @abstractmethod
    def victim(self, running: list[Sequence]) -> Sequence: ...


def register_policy(name: str):
    def add(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str) -> Policy:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(policy_names())}")
    return _REGISTRY[name]()
