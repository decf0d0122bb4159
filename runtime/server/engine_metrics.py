"""The engine's figures as Prometheus families, read from one `EngineStats` at scrape time.

A collector (prometheus_client's custom-collector protocol: `collect()` yields metric families)
built per scrape over the stats the engine counted, in one place, once: nothing here counts.
Names carry the `kvrt:` prefix, as vLLM's carry `vllm:`; every sample has a `model_name` label.
Behind replicas (`kvrt serve --replicas N`) every engine family has one sample per replica,
labelled `replica` (sum them with `sum without (replica)`), and the `kvrt:replica_*` families
say each replica's state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvrt.runtime.engine.protocol import EngineStats, ReplicaStatus

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
    """One scrape's engine families (a prometheus_client collector). `replicas`: the
    replicas' statuses, when there are replicas; `stats` is then not read (each replica's
    own are, those that reported)."""

    def __init__(self, stats: EngineStats, model_name: str, live_runs: int,
                 replicas: list[ReplicaStatus] | None = None) -> None:
        self.model_name, self.live_runs, self.replicas = model_name, live_runs, replicas
        self.labels = ["model_name", "replica"] if replicas else ["model_name"]
        self.parts: list[tuple[list[str], EngineStats]] = (
            [([model_name, r.name], r.stats) for r in replicas if r.stats is not None]
            if replicas else [([model_name], stats)])

    def collect(self) -> Iterator[Metric]:
        yield self._gauge("kvrt:num_requests_running", "Requests in the running batch.",
                          lambda s: s.running)
        yield self._gauge("kvrt:num_requests_waiting", "Requests waiting to be scheduled.",
                          lambda s: s.waiting)
        yield self._gauge(
            "kvrt:kv_cache_usage_perc",
            "Fraction of device KV blocks referenced by live requests (1 = full; 0 when idle). "
            "Blocks a policy pins are kvrt:kv_cache_pinned_blocks.", kv_cache_usage)
        yield self._gauge("kvrt:kv_cache_pinned_blocks",
                          "Device KV blocks a policy pins for an agent waiting on a tool.",
                          lambda s: s.kv_blocks_pinned)
        yield self._gauge("kvrt:kv_cache_cached_blocks",
                          "Device KV blocks unreferenced but still indexed (evictable).",
                          lambda s: s.kv_blocks_cached)
        yield self._gauge(
            "kvrt:segment_kv_compression",
            "Full per-call copies of segments over what reuse stored (masters + diffs).",
            lambda s: (s.segment_tokens / s.segment_held_tokens
                       if s.segment_held_tokens else 1.0))
        live = GaugeMetricFamily("kvrt:live_runs", "Runs started and not yet ended.",
                                 labels=["model_name"])
        live.add_metric([self.model_name], self.live_runs)
        yield live
        for name, (help_text, field) in _COUNTERS.items():
            counter = CounterMetricFamily(name, help_text, labels=self.labels)
            for values, stats in self.parts:
                counter.add_metric(values, getattr(stats, field))
            yield counter
        yield self._by_label(
            "kvrt:kv_move_failures_total", "KV moves between the device and the host tier "
            "whose copy failed (each logged with its reason), by direction.", "direction",
            lambda s: s.kv_move_failures)
        yield self._by_label(
            "kvrt:kv_tier_decisions_total",
            "The policy's decisions at tool calls: offload, or keep and why.", "decision",
            lambda s: s.kv_decisions)
        yield self._landings()
        early = CounterMetricFamily(
            "kvrt:kv_upload_early_returns_total",
            "Predictive uploads whose tool returned before its predicted time.",
            labels=self.labels)
        for values, stats in self.parts:
            early.add_metric(values, stats.upload_landing.early_returns)
        yield early
        if self.replicas:
            yield from replica_families(self.model_name, self.replicas)

    def _gauge(self, name: str, help_text: str,
               value: Callable[[EngineStats], float]) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, help_text, labels=self.labels)
        for values, stats in self.parts:
            gauge.add_metric(values, value(stats))
        return gauge

    def _by_label(self, name: str, help_text: str, label: str,
                  counts: Callable[[EngineStats], Mapping[str, int]]) -> CounterMetricFamily:
        counter = CounterMetricFamily(name, help_text, labels=[*self.labels, label])
        for values, stats in self.parts:
            for value, n in sorted(counts(stats).items()):
                counter.add_metric([*values, value], n)
        return counter

    def _landings(self) -> HistogramMetricFamily:
        """The engine's per-bucket counts (each alone) as the cumulative buckets Prometheus
        wants."""
        histogram = HistogramMetricFamily(
            "kvrt:kv_upload_landing_seconds",
            "Predictive uploads (planned ahead of a tool's predicted return): the engine's "
            "clock when one landed minus when the tool's finish arrived (negative: in time); "
            "those whose tool returned before its predicted time are "
            "kvrt:kv_upload_early_returns_total instead.", labels=self.labels)
        for values, stats in self.parts:
            landing = stats.upload_landing
            buckets, cumulative = [], 0
            for bound, n in zip((*landing.buckets, float("inf")), landing.bucket_counts):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            histogram.add_metric(values, buckets, landing.sum_s)
            # The library leaves out _sum and _count when a bucket is negative (OpenMetrics
            # has no sum there); the text format 0.0.4 has them, and this histogram always did.
            if histogram.samples[-1].name.endswith("_bucket"):
                labels = dict(zip(self.labels, values, strict=True))
                histogram.add_sample(histogram.name + "_count", labels, cumulative)
                histogram.add_sample(histogram.name + "_sum", labels, landing.sum_s)
        return histogram


def replica_families(model_name: str, replicas: list[ReplicaStatus]) -> Iterator[Metric]:
    """Each replica's state as the front daemon sees it."""
    labels = ["model_name", "replica"]
    families = [
        (GaugeMetricFamily("kvrt:replica_up", "1 while the replica serves; 0 while it starts, "
                           "or after it died (until Ray restarts it).", labels=labels),
         lambda r: float(r.state == "ready")),
        (CounterMetricFamily("kvrt:replica_restarts_total",
                             "Times the replica came back after dying.", labels=labels),
         lambda r: r.restarts),
        (GaugeMetricFamily("kvrt:replica_runs", "Live runs with agents placed on the replica.",
                           labels=labels), lambda r: r.runs),
        (GaugeMetricFamily("kvrt:replica_agents", "Live agents placed on the replica.",
                           labels=labels), lambda r: r.agents),
        (GaugeMetricFamily("kvrt:replica_requests_in_flight",
                           "Calls the front daemon has sent the replica that have not ended.",
                           labels=labels), lambda r: r.load.in_flight),
    ]
    for family, value in families:
        for replica in replicas:
            family.add_metric([model_name, replica.name], value(replica))
        yield family


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
