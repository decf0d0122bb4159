"""Items by id, and each group's ids in order, so that a page of a listing costs O(log n +
page) instead of a pass over every tenant's items.

Ids sort in creation order (`new_id`: nanoseconds first), so the order of a group is the order
its items were created in, ties broken by id. A page starts after an id, which need not exist:
an id deleted since (or one never held, or another tenant's) still marks a place in that order.
So a client paging through while items come and go never sees a surviving item twice nor
misses one; items created meanwhile come at the end. (Ids a state dir kept from before ids
began with the time are random: they sort by id, a stable order but not their creation order.)

    group                     ids (sorted)
    ------------------------  -----------------------------------------
    ("tenant", "a")           graph-0187...01  graph-0187...9c  ...
    ("graph", "a", graph_id)  run-0187...44    run-0187...f0    ...
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def new_id(kind: str) -> str:
    """`kind-` and 24 hex digits: the wall clock in nanoseconds, then 32 random bits. Ids made
    one after the other sort in the order they were made (unless the clock is set back)."""
    return f"{kind}-{time.time_ns():016x}{os.urandom(4).hex()}"


@dataclass(slots=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool  # items of the group follow the last of these


class Listing(MutableMapping[str, T]):
    """A dict of items by id that also keeps, for each group `groups(item)` names, the
    group's ids sorted. An item's groups must not change while it is held."""

    def __init__(self, groups: Callable[[T], Iterable[Hashable]]) -> None:
        self._groups = groups
        self._items: dict[str, T] = {}
        self._sorted: dict[Hashable, list[str]] = {}

    def __getitem__(self, item_id: str) -> T:
        return self._items[item_id]

    def __setitem__(self, item_id: str, item: T) -> None:
        if item_id in self._items:
            del self[item_id]
        self._items[item_id] = item
        for group in self._groups(item):
            bisect.insort(self._sorted.setdefault(group, []), item_id)  # new ids: appended

    def __delitem__(self, item_id: str) -> None:
        item = self._items.pop(item_id)
        for group in self._groups(item):
            ids = self._sorted[group]
            del ids[bisect.bisect_left(ids, item_id)]
            if not ids:
                del self._sorted[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def count(self, group: Hashable) -> int:
        return len(self._sorted.get(group, ()))

    def group(self, group: Hashable) -> list[T]:
        """The group's items, in order."""
        return [self._items[i] for i in self._sorted.get(group, ())]

    def page(self, group: Hashable, limit: int, after: str | None = None,
             keep: Callable[[T], bool] | None = None,
             size: tuple[Callable[[T], int], int] | None = None) -> Page[T]:
        """Up to `limit` of the group's items that `keep` accepts (all if None), the first
        ones after the id `after` (from the start if None). `size`, (size of an item, most):
        fewer if their sizes together would pass the most, but never none."""
        ids = self._sorted.get(group, [])
        start = 0 if after is None else bisect.bisect_right(ids, after)
        items: list[T] = []
        total = 0
        for position in range(start, len(ids)):
            item = self._items[ids[position]]
            if keep is not None and not keep(item):
                continue
            if size is not None:
                total += size[0](item)
            if len(items) == limit or (items and size is not None and total > size[1]):
                return Page(items, has_more=True)
            items.append(item)
        return Page(items, has_more=False)
