"""The engine's figures as Prometheus families, read from one `EngineStats` at scrape time.

A collector (prometheus_client's custom-collector protocol: `collect()` yields metric families)
built per scrape over the stats the engine counted, in one place, once: nothing here counts.
Names carry the `kvrt:` prefix, as vLLM's carry `vllm:`; every sample has a `model_name` label.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvrt.runtime.engine.protocol import EngineStats, LandingStats

# name -> (help, the EngineStats field it reads)
_COUNTERS = {
    "kvrt:prefix_cache_queries_total": (
        "Prompt tokens looked up in the prefix cache.", "prefix_queries_tokens"),
    "kvrt:prefix_cache_hits_total": ("Prompt tokens found in the prefix cache.",
                                     "prefix_hits_tokens"),
    "kvrt:prompt_tokens_total": ("Prompt tokens processed.", "prompt_tokens"),
    "kvrt:generation_tokens_total": ("Tokens generated.", "generation_tokens"),
    "kvrt:num_preemptions_total": ("Requests preempted.", "preemptions"),
    "kvrt:kv_offloaded_blocks_total": (
        "KV blocks moved from the device to the host tier.", "kv_blocks_offloaded"),
    "kvrt:kv_uploaded_blocks_total": (
        "KV blocks moved from the host tier back to the device.", "kv_blocks_uploaded"),
    "kvrt:kv_backed_up_blocks_total": (
        "KV blocks copied to the host tier and kept on the device (write-through).",
        "kv_blocks_backed_up"),
    "kvrt:segment_tokens_total": (
        "Prompt tokens in segments (text reusable at any position).", "segment_tokens"),
    "kvrt:segment_reused_tokens_total": (
        "Segment tokens read from another copy: not computed.", "segment_reused_tokens"),
    "kvrt:segment_dropped_tokens_total": (
        "Segment tokens recomputed, then read from the master: they changed too little to "
        "keep as a diff.", "segment_dropped_tokens"),
}


def kv_cache_usage(stats: EngineStats) -> float:
    """The fraction of device blocks live requests hold: 0 on an idle server. The engine's
    in-use count also holds the blocks a policy pins for agents in tool calls (`ttl`), which
    no request holds; they are taken out. (A block both pinned and read by a request is then
    not counted: the engine reports the two sets' sizes, not their overlap.)"""
    if not stats.kv_blocks_total:
        return 0.0
    return max(stats.kv_blocks_in_use - stats.kv_blocks_pinned, 0) / stats.kv_blocks_total


class EngineFamilies:
    """One scrape's engine families (a prometheus_client collector)."""

    def __init__(self, stats: EngineStats, model_name: str, live_runs: int) -> None:
        self.stats, self.model_name, self.live_runs = stats, model_name, live_runs

    def collect(self) -> Iterator[Metric]:
        stats, held = self.stats, self.stats.segment_held_tokens
        yield self._gauge("kvrt:num_requests_running", "Requests in the running batch.",
                          stats.running)
        yield self._gauge("kvrt:num_requests_waiting", "Requests waiting to be scheduled.",
                          stats.waiting)
        yield self._gauge(
            "kvrt:kv_cache_usage_perc",
            "Fraction of device KV blocks referenced by live requests (1 = full; 0 when idle). "
            "Blocks a policy pins are kvrt:kv_cache_pinned_blocks.", kv_cache_usage(stats))
        yield self._gauge("kvrt:kv_cache_pinned_blocks",
                          "Device KV blocks a policy pins for an agent waiting on a tool.",
                          stats.kv_blocks_pinned)
        yield self._gauge("kvrt:kv_cache_cached_blocks",
                          "Device KV blocks unreferenced but still indexed (evictable).",
                          stats.kv_blocks_cached)
        yield self._gauge(
            "kvrt:segment_kv_compression",
            "Full per-call copies of segments over what reuse stored (masters + diffs).",
            stats.segment_tokens / held if held else 1.0)
        yield self._gauge("kvrt:live_runs", "Runs started and not yet ended.", self.live_runs)
        for name, (help_text, field) in _COUNTERS.items():
            counter = CounterMetricFamily(name, help_text, labels=["model_name"])
            counter.add_metric([self.model_name], getattr(stats, field))
            yield counter
        yield self._by_label(
            "kvrt:kv_move_failures_total", "KV moves between the device and the host tier "
            "whose copy failed (each logged with its reason), by direction.", "direction",
            stats.kv_move_failures)
        yield self._by_label(
            "kvrt:kv_tier_decisions_total",
            "The policy's decisions at tool calls: offload, or keep and why.", "decision",
            stats.kv_decisions)
        yield self._landings(stats.upload_landing)
        early = CounterMetricFamily(
            "kvrt:kv_upload_early_returns_total",
            "Predictive uploads whose tool returned before its predicted time.",
            labels=["model_name"])
        early.add_metric([self.model_name], stats.upload_landing.early_returns)
        yield early

    def _gauge(self, name: str, help_text: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, help_text, labels=["model_name"])
        gauge.add_metric([self.model_name], value)
        return gauge

    def _by_label(self, name: str, help_text: str, label: str,
                  counts: Mapping[str, int]) -> CounterMetricFamily:
        counter = CounterMetricFamily(name, help_text, labels=["model_name", label])
        for value, n in sorted(counts.items()):
            counter.add_metric([self.model_name, value], n)
        return counter

    def _landings(self, landing: LandingStats) -> HistogramMetricFamily:
        """The engine's per-bucket counts (each alone) as the cumulative buckets Prometheus
        wants."""
        histogram = HistogramMetricFamily(
            "kvrt:kv_upload_landing_seconds",
            "Predictive uploads (planned ahead of a tool's predicted return): the engine's "
            "clock when one landed minus when the tool's finish arrived (negative: in time); "
            "those whose tool returned before its predicted time are "
            "kvrt:kv_upload_early_returns_total instead.", labels=["model_name"])
        buckets, cumulative = [], 0
        for bound, n in zip((*landing.buckets, float("inf")), landing.bucket_counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        histogram.add_metric([self.model_name], buckets, landing.sum_s)
        # The library leaves out _sum and _count when a bucket is negative (OpenMetrics has
        # no sum there); the text format 0.0.4 has them, and this histogram always did.
        if histogram.samples[-1].name.endswith("_bucket"):
            labels = {"model_name": self.model_name}
            histogram.add_sample(histogram.name + "_count", labels, cumulative)
            histogram.add_sample(histogram.name + "_sum", labels, landing.sum_s)
        return histogram


class TenantLiveRuns:
    """`kvrt:tenant_live_runs` at scrape time (a collector): each tenant's runs now."""

    def __init__(self, model_name: str, live_runs: Mapping[str, int]) -> None:
        self.model_name, self.live_runs = model_name, live_runs

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("kvrt:tenant_live_runs",
                                  "Runs started and not yet ended, by tenant.",
                                  labels=["model_name", "tenant"])
        for tenant, n in sorted(self.live_runs.items()):
            gauge.add_metric([self.model_name, tenant], n)
        yield gauge
