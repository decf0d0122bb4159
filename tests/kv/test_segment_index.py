"""The segment index's output probe: a probe hit is confirmed by tokens and tenant salt."""

from __future__ import annotations

import torch

from kvrt.runtime.kv.reuse import index as segment_index
from kvrt.runtime.kv.reuse.index import SegmentIndex

OUTPUT = tuple(range(100, 120))


def test_an_output_is_found_inside_a_quote_of_its_own_tenant_only(monkeypatch) -> None:
    index = SegmentIndex(block_size=4)
    assert index.offer_output(b"tenant-a", OUTPUT, 30, torch.arange(40, 60))
    quote = (1, 2, 3) + OUTPUT[:15] + (9,)
    found = index.find_within(b"tenant-a", quote)
    assert found is not None and (found.offset, found.length) == (3, 15)
    assert index.find_within(b"tenant-b", quote) is None
    # Even when Python's hash collides across tenants, the salt decides.
    monkeypatch.setattr(segment_index, "_probe", lambda salt, tokens: 7)
    index = SegmentIndex(block_size=4)
    index.offer_output(b"tenant-a", OUTPUT, 30, torch.arange(40, 60))
    assert index.find_within(b"tenant-b", quote) is None
    assert index.find_within(b"tenant-a", quote) is not None
