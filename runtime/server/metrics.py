"""Prometheus text exposition (format 0.0.4) of the engine's state and the server's requests.

Written by hand to keep the daemon's dependencies small. Gauges and token counters are read
from `engine.stats()` at scrape time (the engine counts them once, in one place); latencies and
finish reasons are observed here, per request, since only the server sees a request's wall
clock from arrival to last byte. Names carry the `kvrt:` prefix, as vLLM's carry `vllm:`.

Per-tenant figures (`kvrt:tenant_*`, with a `tenant` label) are rendered for the operator only
(runtime/server/auth.py decides who that is). A finished call is counted for the tenant its
HTTP request was attributed to (`attributed_to`, entered by the auth middleware around the
handler): a context variable, because the call's tenant is known at the edge and its tokens deep
in the handler, and the variable follows the handler into the tasks it starts (a round's calls).
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from kvrt.runtime.config import DEFAULT_TENANT
from kvrt.runtime.engine.protocol import EngineStats, GenerateOutput, LandingStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
EVENT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Cumulative-bucket histogram; `counts[i]` counts observations <= buckets[i] alone."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    @classmethod
    def of_landings(cls, landing: LandingStats) -> Histogram:
        """The engine's counts of predictive uploads' landing minus the tool's return."""
        histogram = cls(landing.buckets)
        histogram.counts = list(landing.bucket_counts)
        histogram.sum, histogram.count = landing.sum_s, landing.count
        return histogram

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
        out.append(f"{name}_sum{{{labels}}} {self.sum!r}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass(slots=True)
class TenantCounts:
    """One tenant's finished calls and their tokens."""

    calls: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0


class ServerMetrics:
    """Per-request observations. Lives on the event loop thread only, so no lock."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: Counter[str] = Counter()
        self.event_seconds = Histogram(EVENT_BUCKETS)
        self.events: Counter[str] = Counter()
        self.tenants: defaultdict[str, TenantCounts] = defaultdict(TenantCounts)
        self._tenant: ContextVar[str] = ContextVar("kvrt_metrics_tenant", default=DEFAULT_TENANT)

    @contextmanager
    def attributed_to(self, tenant: str) -> Iterator[None]:
        """Calls finished within (in this task, or tasks it starts) count for `tenant`."""
        token = self._tenant.set(tenant)
        try:
            yield
        finally:
            self._tenant.reset(token)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_finish(self, seconds: float, last: GenerateOutput) -> None:
        """A call's `last` output (its finish reason set) came `seconds` after its arrival."""
        assert last.finish_reason is not None
        self.e2e.observe(seconds)
        self.finished[last.finish_reason] += 1
        counts = self.tenants[self._tenant.get()]
        counts.calls += 1
        counts.prompt_tokens += last.prompt_tokens
        counts.cached_tokens += last.cached_tokens
        counts.generation_tokens += last.completion_tokens

    def observe_event(self, event_type: str, seconds: float) -> None:
        """A control-plane event handled in `seconds` of server time (decode, apply, encode)."""
        self.events[event_type] += 1
        self.event_seconds.observe(seconds)

    def render(self, stats: EngineStats, model_name: str, live_runs: int,
               tenant_live_runs: Mapping[str, int] | None = None) -> str:
        """The exposition; per-tenant families only with `tenant_live_runs` (the operator's
        view: each tenant's live runs)."""
        labels = f'model_name="{_escape(model_name)}"'
        usage = kv_cache_usage(stats)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        def one(name: str, kind: str, help_text: str, value: float) -> None:
            family(name, kind, help_text, [f"{name}{{{labels}}} {value!r}"])

        one("kvrt:num_requests_running", "gauge", "Requests in the running batch.",
            stats.running)
        one("kvrt:num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
            stats.waiting)
        one("kvrt:kv_cache_usage_perc", "gauge",
            "Fraction of device KV blocks referenced by live requests (1 = full; 0 when idle). "
            "Blocks a policy pins are kvrt:kv_cache_pinned_blocks.", usage)
        one("kvrt:kv_cache_pinned_blocks", "gauge",
            "Device KV blocks a policy pins for an agent waiting on a tool.",
            stats.kv_blocks_pinned)
        one("kvrt:kv_cache_cached_blocks", "gauge",
            "Device KV blocks unreferenced but still indexed (evictable).", stats.kv_blocks_cached)
        one("kvrt:prefix_cache_queries_total", "counter",
            "Prompt tokens looked up in the prefix cache.", stats.prefix_queries_tokens)
        one("kvrt:prefix_cache_hits_total", "counter",
            "Prompt tokens found in the prefix cache.", stats.prefix_hits_tokens)
        one("kvrt:prompt_tokens_total", "counter", "Prompt tokens processed.",
            stats.prompt_tokens)
        one("kvrt:generation_tokens_total", "counter", "Tokens generated.",
            stats.generation_tokens)
        one("kvrt:num_preemptions_total", "counter", "Requests preempted.", stats.preemptions)
        one("kvrt:kv_offloaded_blocks_total", "counter",
            "KV blocks moved from the device to the host tier.", stats.kv_blocks_offloaded)
        one("kvrt:kv_uploaded_blocks_total", "counter",
            "KV blocks moved from the host tier back to the device.", stats.kv_blocks_uploaded)
        one("kvrt:kv_backed_up_blocks_total", "counter",
            "KV blocks copied to the host tier and kept on the device (write-through).",
            stats.kv_blocks_backed_up)
        family("kvrt:kv_move_failures_total", "counter",
               "KV moves between the device and the host tier whose copy failed (each logged "
               "with its reason), by direction.", [
                   f'kvrt:kv_move_failures_total{{{labels},direction="{_escape(d)}"}} {n}'
                   for d, n in sorted(stats.kv_move_failures.items())
               ])
        one("kvrt:segment_tokens_total", "counter",
            "Prompt tokens in segments (text reusable at any position).", stats.segment_tokens)
        one("kvrt:segment_reused_tokens_total", "counter",
            "Segment tokens read from another copy: not computed.", stats.segment_reused_tokens)
        one("kvrt:segment_dropped_tokens_total", "counter",
            "Segment tokens recomputed, then read from the master: they changed too little to "
            "keep as a diff.", stats.segment_dropped_tokens)
        held = stats.segment_held_tokens
        one("kvrt:segment_kv_compression", "gauge",
            "Full per-call copies of segments over what reuse stored (masters + diffs).",
            stats.segment_tokens / held if held else 1.0)
        family("kvrt:kv_tier_decisions_total", "counter",
               "The policy's decisions at tool calls: offload, or keep and why.", [
                   f'kvrt:kv_tier_decisions_total{{{labels},decision="{_escape(d)}"}} {n}'
                   for d, n in sorted(stats.kv_decisions.items())
               ])
        family("kvrt:kv_upload_landing_seconds", "histogram",
               "Predictive uploads (planned ahead of a tool's predicted return): the engine's "
               "clock when one landed minus when the tool's finish arrived (negative: in time); "
               "those whose tool returned before its predicted time are "
               "kvrt:kv_upload_early_returns_total instead.",
               Histogram.of_landings(stats.upload_landing).lines(
                   "kvrt:kv_upload_landing_seconds", labels))
        one("kvrt:kv_upload_early_returns_total", "counter",
            "Predictive uploads whose tool returned before its predicted time.",
            stats.upload_landing.early_returns)
        family("kvrt:request_success_total", "counter", "Requests finished, by finish reason.", [
            f'kvrt:request_success_total{{{labels},finished_reason="{_escape(reason)}"}} {n}'
            for reason, n in sorted(self.finished.items())
        ])
        one("kvrt:live_runs", "gauge", "Runs started and not yet ended.", live_runs)
        family("kvrt:control_events_total", "counter", "Control-plane events applied, by type.", [
            f'kvrt:control_events_total{{{labels},type="{_escape(kind)}"}} {n}'
            for kind, n in sorted(self.events.items())
        ])
        family("kvrt:control_event_seconds", "histogram",
               "Server seconds to handle one control-plane event (decode, apply, encode).",
               self.event_seconds.lines("kvrt:control_event_seconds", labels))
        family("kvrt:time_to_first_token_seconds", "histogram",
               "Seconds from a request's arrival to its first generated token.",
               self.ttft.lines("kvrt:time_to_first_token_seconds", labels))
        family("kvrt:e2e_request_latency_seconds", "histogram",
               "Seconds from a request's arrival to its last generated token.",
               self.e2e.lines("kvrt:e2e_request_latency_seconds", labels))
        if tenant_live_runs is not None:
            out.extend(self._tenant_lines(labels, tenant_live_runs))
        return "\n".join(out) + "\n"

    def _tenant_lines(self, labels: str, live_runs: Mapping[str, int]) -> list[str]:
        tenants = sorted({*live_runs, *self.tenants})
        counts = {tenant: self.tenants.get(tenant, TenantCounts()) for tenant in tenants}
        families = [
            ("kvrt:tenant_live_runs", "gauge", "Runs started and not yet ended, by tenant.",
             lambda t: live_runs.get(t, 0)),
            ("kvrt:tenant_request_success_total", "counter", "Model calls finished, by tenant.",
             lambda t: counts[t].calls),
            ("kvrt:tenant_prompt_tokens_total", "counter",
             "Prompt tokens of the tenant's finished calls.", lambda t: counts[t].prompt_tokens),
            ("kvrt:tenant_prefix_cache_hits_total", "counter",
             "Of those, tokens found in the prefix cache.", lambda t: counts[t].cached_tokens),
            ("kvrt:tenant_generation_tokens_total", "counter",
             "Tokens generated for the tenant's finished calls.",
             lambda t: counts[t].generation_tokens),
        ]
        out: list[str] = []
        for name, kind, help_text, value in families:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            out += [f'{name}{{{labels},tenant="{_escape(t)}"}} {value(t)}' for t in tenants]
        return out


def kv_cache_usage(stats: EngineStats) -> float:
    """The fraction of device blocks live requests hold: 0 on an idle server. The engine's
    in-use count also holds the blocks a policy pins for agents in tool calls (`ttl`), which
    no request holds; they are taken out. (A block both pinned and read by a request is then
    not counted: the engine reports the two sets' sizes, not their overlap.)"""
    if not stats.kv_blocks_total:
        return 0.0
    return max(stats.kv_blocks_in_use - stats.kv_blocks_pinned, 0) / stats.kv_blocks_total


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
