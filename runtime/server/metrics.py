"""/metrics through prometheus_client: the server's per-request observations and, read at
scrape time, the engine's figures (runtime/server/engine_metrics.py).

Latencies, finish reasons and control events are observed here, per request, as
prometheus_client Counters and Histograms, since only the server sees a request's wall clock
from arrival to last byte. Each ServerMetrics has its own CollectorRegistry (never the
library's global default), so two apps in one process (the tests start many) never share a
sample. The exposition is the text format 0.0.4 (`generate_latest`).

Per-tenant figures (`kvrt:tenant_*`, with a `tenant` label) live in a second registry, rendered
for the operator only (runtime/server/auth.py decides who that is). A finished call is counted
for the tenant its HTTP request was attributed to (`attributed_to`, entered by the auth
middleware around the handler): a context variable, because the call's tenant is known at the
edge and its tokens deep in the handler, and the variable follows the handler into the tasks it
starts (a round's calls).

Several processes (replicas behind one port): prometheus_client's multiprocess mode applies to
the Counters and Histograms here as they are. With PROMETHEUS_MULTIPROC_DIR set before
prometheus_client is imported, every process writes its values to mmap files in that folder,
and a /metrics handler would answer with `generate_latest` over a fresh registry holding a
`prometheus_client.multiprocess.MultiProcessCollector`, which sums them over the processes.
The engine's families are collectors read at scrape time, so they are per process by nature
(each replica has its own engine and KV pool): the handler would add this process's, or each
replica would serve its own with a `replica` label. No Gauge is instrumented here (gauges are
read at scrape time), so no gauge needs a `multiprocess_mode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kvrt.runtime.config import DEFAULT_TENANT
from kvrt.runtime.engine.protocol import EngineStats, GenerateOutput, ReplicaStatus
from kvrt.runtime.server.engine_metrics import EngineFamilies, TenantLiveRuns, kv_cache_usage

__all__ = ["CONTENT_TYPE", "ServerMetrics", "kv_cache_usage"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
EVENT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """Per-request observations of one app. Lives on the event loop thread only."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant_registry = CollectorRegistry(auto_describe=True)  # the operator's only
        model, registry = ("model_name",), self.registry
        self.ttft = Histogram(
            "kvrt:time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.", model,
            registry=registry, buckets=TTFT_BUCKETS).labels(model_name)
        self.e2e = Histogram(
            "kvrt:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its last generated token.", model,
            registry=registry, buckets=E2E_BUCKETS).labels(model_name)
        self.finished = Counter("kvrt:request_success_total",
                                "Requests finished, by finish reason.",
                                (*model, "finished_reason"), registry=registry)
        self.events = Counter("kvrt:control_events_total",
                              "Control-plane events applied, by type.", (*model, "type"),
                              registry=registry)
        self.event_seconds = Histogram(
            "kvrt:control_event_seconds",
            "Server seconds to handle one control-plane event (decode, apply, encode).", model,
            registry=registry, buckets=EVENT_BUCKETS).labels(model_name)
        self._tenant_counters = self._make_tenant_counters()
        self._tenant: ContextVar[str] = ContextVar("kvrt_metrics_tenant", default=DEFAULT_TENANT)

    def _make_tenant_counters(self) -> dict[str, Counter]:
        labels, registry = ("model_name", "tenant"), self.tenant_registry
        families = {
            "calls": ("kvrt:tenant_request_success_total", "Model calls finished, by tenant."),
            "prompt_tokens": ("kvrt:tenant_prompt_tokens_total",
                              "Prompt tokens of the tenant's finished calls."),
            "cached_tokens": ("kvrt:tenant_prefix_cache_hits_total",
                              "Of those, tokens found in the prefix cache."),
            "generation_tokens": ("kvrt:tenant_generation_tokens_total",
                                  "Tokens generated for the tenant's finished calls."),
        }
        return {key: Counter(name, help_text, labels, registry=registry)
                for key, (name, help_text) in families.items()}

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
        self.finished.labels(self.model_name, last.finish_reason).inc()
        tenant, counters = self._tenant.get(), self._tenant_counters
        counters["calls"].labels(self.model_name, tenant).inc()
        counters["prompt_tokens"].labels(self.model_name, tenant).inc(last.prompt_tokens)
        counters["cached_tokens"].labels(self.model_name, tenant).inc(last.cached_tokens)
        counters["generation_tokens"].labels(self.model_name, tenant).inc(
            last.completion_tokens)

    def observe_event(self, event_type: str, seconds: float) -> None:
        """A control-plane event handled in `seconds` of server time (decode, apply, encode)."""
        self.events.labels(self.model_name, event_type).inc()
        self.event_seconds.observe(seconds)

    def render(self, stats: EngineStats, live_runs: int,
               tenant_live_runs: Mapping[str, int] | None = None,
               replicas: list[ReplicaStatus] | None = None) -> bytes:
        """The exposition; per-tenant families only with `tenant_live_runs` (the operator's
        view: each tenant's live runs). A tenant with live runs and no finished call yet is
        listed with zeros. `replicas`: each replica's own figures, labelled."""
        sources: list[Collector] = [
            EngineFamilies(stats, self.model_name, live_runs, replicas), self.registry]
        if tenant_live_runs is not None:
            for tenant in tenant_live_runs:
                for counter in self._tenant_counters.values():
                    counter.labels(self.model_name, tenant)  # a child starts at 0
            sources += [TenantLiveRuns(self.model_name, tenant_live_runs), self.tenant_registry]
        return generate_latest(_Scrape(sources))


class _Scrape:
    """Several collectors read as one (generate_latest reads anything with `collect`),
    without the `_created` series prometheus_client adds to its Counters and Histograms: the
    format 0.0.4 has no such notion, and each would come out as one more gauge family."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            for metric in source.collect():  # a fresh Metric per collect: ours to trim
                created = metric.name + "_created"
                metric.samples = [s for s in metric.samples if s.name != created]
                yield metric
