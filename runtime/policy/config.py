"""The policies' parameters, typed, with their defaults and why."""

from __future__ import annotations

from dataclasses import dataclass

RETENTIONS = ("next-use", "pins", "none")


@dataclass(frozen=True, slots=True)
class TokencakeConfig:
    # Temporal: offload an agent's KV when its tool call is predicted to outlast the copy there
    # and back by this factor (predictions are rough, and an upload that lands late stalls the
    # next call) ...
    offload_margin: float = 2.0
    # ... and the device pool is under pressure: fewer than this fraction of its blocks free
    # (the rest is in use, or cached and about to be evicted by whoever comes next).
    pressure_free_fraction: float = 0.25
    # Start the upload this long before the copy must end, so it lands before the tool returns.
    upload_lead_s: float = 0.05
    # ... and, besides, twice the engine's recent tick interval (the longest gap between its
    # last `TICK_WINDOW` on_step calls: a step, or the ~50 ms idle wait): the upload starts at
    # the first tick past its time, and lands only when a later tick completes the move. With
    # the fixed lead alone, uploads landed 10-60 ms after the predicted return. False: the
    # fixed lead alone (the ablation).
    timed_upload_lead: bool = True
    # Copy speed assumed until the first copy is observed (bytes/s; a CPU memcpy is ~5-10 GB/s,
    # a pinned PCIe copy ~20-50 GB/s) and the fixed cost of one copy.
    prior_bandwidth: float = 5e9
    copy_latency_s: float = 1e-3
    # Copy every block to the host as soon as it is computed (off the step loop, in the
    # background), so that evicting it from the device, or preempting its sequence, loses
    # nothing: its next reader uploads it instead of computing it again.
    write_through: bool = True
    # What keeps an agent's KV on the device between its calls (runtime/policy/next_use.py):
    # "next-use": every owner's cached blocks get a retention level from the predicted time to
    # its next call, the soonest kept longest (soft: evictable when nothing else is left);
    # "pins": the critical path's agents (priority at least `reserve_priority`) keep their KV
    # pinned between calls, within `reserve_fraction` of the pool, lent back under a stall
    # (hard, the earlier form); "none": plain LRU eviction.
    retention: str = "next-use"
    reserve_priority: float = 0.99
    reserve_fraction: float = 0.25
    # Bring an agent's KV back from the host tier when its next call is due within this many
    # seconds (into free blocks or blocks of less urgent KV only: never preempting).
    prefetch: bool = True
    prefetch_horizon_s: float = 1.0
    # Across runs: waiting calls go in order of their run's remaining work (the critical path
    # left, in predicted seconds) plus their agent's slack off it, less `aging` times the
    # seconds they have waited. Shortest remaining work first lowers the mean completion time
    # of a loaded server (the runs close to done leave first); the aging bounds every call's
    # wait, so no run starves: with aging 1 calls go by arrival + remaining x (2 - priority),
    # a deadline fixed when they arrive (earliest deadline first); 0 would be pure SRPT.
    cross_run: bool = True
    aging: float = 1.0
    # Within runs only (cross_run off, the earlier order): a waiting call's priority grows by
    # this much per second it waits, so a steady stream of critical-path calls cannot starve
    # the others: a call of priority 0.2 overtakes fresh critical ones (1.0) after 400 s.
    aging_per_s: float = 0.002
    # A reservation ends by itself once its agent has been silent too long, so a tool that
    # never reports its finish (a crashed client) cannot hold the pool: at a tool call's start,
    # `tool_deadline_factor` times the predicted tool time, and never less than
    # `tool_deadline_min_s` (nor, with no tool running, after a call or a tool's finish).
    tool_deadline_factor: float = 3.0
    tool_deadline_min_s: float = 10.0

    def __post_init__(self) -> None:
        if self.offload_margin < 1 or not 0 <= self.pressure_free_fraction <= 1:
            raise ValueError(f"bad tokencake config: {self}")
        if not 0 <= self.reserve_fraction <= 1 or self.aging_per_s < 0 or self.aging < 0:
            raise ValueError(f"bad tokencake config: {self}")
        if self.upload_lead_s < 0 or self.prior_bandwidth <= 0 or self.copy_latency_s < 0:
            raise ValueError(f"bad tokencake config: {self}")
        if self.tool_deadline_factor < 1 or self.tool_deadline_min_s <= 0:
            raise ValueError(f"bad tokencake config: {self}")
        if self.retention not in RETENTIONS or self.prefetch_horizon_s < 0:
            raise ValueError(f"bad tokencake config: retention must be one of "
                             f"{', '.join(RETENTIONS)}, prefetch_horizon_s >= 0: {self}")


@dataclass(frozen=True, slots=True)
class TTLConfig:
    # Pin for this many times the predicted tool time: tools run late ...
    margin: float = 1.5
    # ... and never longer than this: a long tool must not hold the pool for long.
    max_s: float = 60.0
    # A tool call nobody predicted.
    default_s: float = 5.0

    def __post_init__(self) -> None:
        if self.margin <= 0 or self.max_s <= 0 or self.default_s <= 0:
            raise ValueError(f"bad ttl config: {self}")
