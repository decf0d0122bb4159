"""One workload under one policy: the real engine and daemon in this process, on loopback.

The engine is built fresh for each policy (empty KV pool, zeroed counters); the daemon is the
same aiohttp app `kvrt serve` runs, and the workload talks to it through the SDK. Two things
are observed from inside, since only the process that holds the engine can see them: every
request's prompt and output token ids (for the ideal), and the KV pool, sampled while the
workload runs (with the blocks live agents hold for shared text, which the engine samples when
asked: its block tables are its own thread's).

The engine may be a ReplicaSet of engines (`kvrt sim --replicas N`): the KV pool sampled is then
the sum of its members' pools, and each member that is a `ReplicaRecorder` says which calls it
served, for the per-replica figures (`PolicyRun.replicas`).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from kvrt.runtime.bench.session import BenchSession, CallRecord, JobRecord
from kvrt.runtime.bench.workloads import Workload
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.executor import ModelExecutor
from kvrt.runtime.engine.landing import LandingSample
from kvrt.runtime.engine.protocol import EngineStats, GenerateOutput, GenerateRequest
from kvrt.runtime.policy import options_for
from kvrt.runtime.replicas.replica_set import ReplicaSet
from kvrt.runtime.server.app import create_app
from kvrt.runtime.server.serve import start_site
from kvrt.sdk import Client

SAMPLE_EVERY_S = 0.05
_NO_TIMEOUT_S = 1e9


@dataclass(frozen=True, slots=True)
class KVSample:
    at: float
    in_use_blocks: int  # referenced by live requests (or pinned)
    cached_blocks: int  # unreferenced, still indexed
    agent_blocks: list[int]  # device blocks of each agent holding any, over live runs


@dataclass(frozen=True, slots=True)
class ReplicaFigures:
    """One replica's share of a run: the calls routed to it and its own KV pool's figures."""

    calls: int
    prompt_tokens: int
    prefill_tokens: int  # prompt tokens it computed: prompt minus cached, as the run's total
    agents: frozenset[tuple[str, str]]  # (run, agent) of the calls it served
    kv_peak_blocks: int
    preemptions: int
    evicted_blocks: int


@dataclass(slots=True)
class PolicyRun:
    policy: str
    block_bytes: int
    calls: list[CallRecord]
    jobs: list[JobRecord]
    samples: list[KVSample]
    tokens: list[tuple[list[int], list[int]]]  # (prompt, output) ids, in submission order
    preemptions: int
    wall_s: float
    peak_in_use_blocks: int = 0  # the engine's own peak, seen at every step (samples miss some)
    offload_bytes: int = 0  # moved to the host tier, and back
    upload_bytes: int = 0
    backup_bytes: int = 0  # copied to the host tier and kept on the device
    evicted_blocks: int = 0  # cached device blocks evicted: 0 means no memory pressure
    # The policy's predictive uploads: landing minus the tool's return (the engine's last ones).
    upload_landings: list[LandingSample] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    replicas: list[ReplicaFigures] = field(default_factory=list)  # with a ReplicaSet only


class RecordingEngine:
    """The engine as the daemon sees it, keeping each request's prompt and output ids.

    The app outlives its run: aiohttp (3.10.6 on) keeps the middleware chains it built in a
    process-wide cache of 1,024 entries keyed by handler and Application, so the last apps a
    process served stay reachable, and with them whatever they hold. `release`, once the
    app is cleaned up, lets go of the engine (its KV pool and weights: ~0.5 GB a policy with
    a 512 MiB pool) that the app still reaches through this object."""

    def __init__(self, inner: Served) -> None:
        self._inner: Served | None = inner
        self.tokens: list[tuple[list[int], list[int]]] = []

    def __getattr__(self, name: str):
        if self._inner is None:
            raise AttributeError(f"{name}: the engine was released at the end of its run")
        return getattr(self._inner, name)

    def release(self) -> None:
        self._inner = None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        assert self._inner is not None, "a request after the run's end"
        output: list[int] = []
        self.tokens.append((list(request.prompt_token_ids), output))
        async with aclosing(self._inner.generate(request)) as outputs:
            async for item in outputs:
                output.extend(item.token_ids)
                yield item


class ReplicaRecorder:
    """A replica as its ReplicaSet sees it, counting the calls the set routed to it."""

    def __init__(self, inner: AsyncEngine) -> None:
        self.inner = inner
        self.calls = self.prompt_tokens = self.cached_tokens = 0
        self.agents: set[tuple[str, str]] = set()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.calls += 1
        if request.attribution.run is not None:
            self.agents.add((request.attribution.run, request.attribution.agent or ""))
        last = None
        try:
            async with aclosing(self.inner.generate(request)) as outputs:
                async for last in outputs:
                    yield last
        finally:
            if last is not None:  # the call's usage is its last output's, as the server's
                self.prompt_tokens += last.prompt_tokens
                self.cached_tokens += last.cached_tokens

    def figures(self) -> ReplicaFigures:
        stats = self.inner.stats()
        return ReplicaFigures(self.calls, self.prompt_tokens,
                              self.prompt_tokens - self.cached_tokens, frozenset(self.agents),
                              stats.kv_blocks_in_use_peak, stats.preemptions,
                              stats.kv_blocks_evicted)


Served = AsyncEngine | ReplicaSet
# Builds the engine for a config (blocking: called off the loop) and says its KV block's bytes.
EngineFactory = Callable[[EngineConfig], tuple[Served, int]]


def members(engine: Served) -> list[AsyncEngine]:
    """The engines whose KV pools make up the served one's (one, or a ReplicaSet's)."""
    if isinstance(engine, ReplicaSet):
        return [m.inner if isinstance(m, ReplicaRecorder) else m  # type: ignore[misc]
                for m in engine.members]
    return [engine]


def real_engine(config: EngineConfig) -> tuple[AsyncEngine, int]:
    engine = AsyncEngine.create(config, "bench")
    executor = engine.engine.executor
    assert isinstance(executor, ModelExecutor)
    return engine, executor.kv_pool[0].numel() * executor.kv_pool.element_size()


async def run_policy(workload: Workload, config: ServeConfig, time_scale: float,
                     make_engine: EngineFactory = real_engine) -> PolicyRun:
    """Times are the event loop's clock: real seconds, or simulated ones on kvrt sim's loop."""
    loop = asyncio.get_running_loop()
    # A finished run's engine is garbage in reference cycles (the async engine and its worker
    # refer to each other), which only the cyclic collector frees, and it counts objects, not
    # bytes: collect now, or the last run's KV pool and weights may still be there while this
    # run's are allocated (a bench of 3 policies with a 512 MiB pool peaked at 4.9 GB, not 2.8).
    gc.collect()
    inner, block_bytes = await loop.run_in_executor(None, make_engine, config.engine)
    engine = RecordingEngine(inner)
    app = create_app(config, engine)  # type: ignore[arg-type]
    runner, url = await start_site(app, "127.0.0.1", 0)
    samples: list[KVSample] = []
    sampler = asyncio.create_task(_sample(inner, members(inner), samples))
    started = loop.time()
    try:
        # No read timeout: a call may wait long in the queue, and on a simulated clock hours pass.
        async with Client(url, retries=0, timeout=_NO_TIMEOUT_S) as client:
            session = BenchSession(client, time_scale, clock=loop.time)
            await workload.run(session)
    finally:
        wall = loop.time() - started
        sampler.cancel()
        await runner.cleanup()  # stops the engine
        engine.release()
    stats = inner.stats()
    recorders = [m for m in inner.members if isinstance(m, ReplicaRecorder)] \
        if isinstance(inner, ReplicaSet) else []
    return PolicyRun(
        policy=config.engine.policy, block_bytes=block_bytes,
        calls=session.calls, jobs=session.jobs, samples=samples, tokens=engine.tokens,
        preemptions=stats.preemptions, wall_s=wall, peak_in_use_blocks=stats.kv_blocks_in_use_peak,
        offload_bytes=stats.kv_blocks_offloaded * block_bytes,
        upload_bytes=stats.kv_blocks_uploaded * block_bytes,
        backup_bytes=stats.kv_blocks_backed_up * block_bytes,
        evicted_blocks=stats.kv_blocks_evicted,
        upload_landings=list(stats.upload_landing.recent),
        extra=shared_kv(stats, block_bytes, config.engine.block_size),
        replicas=[recorder.figures() for recorder in recorders])


def shared_kv(stats: EngineStats, block_bytes: int, block_size: int) -> dict[str, float]:
    """The device KV a live agent holds for its segments: `shared_kv_bytes_per_agent` in
    blocks as the pool holds them (masters amortized over their readers, plus each reader's own
    blocks, partial ones included: runtime/kv/shared_blocks.py), where the most agents shared
    at once; beside it `shared_kv_token_bytes_per_agent`, the segment tokens each call stores
    (masters + kept diffs, per call), which can show savings the pool does not see."""
    extra = {}
    if stats.segment_requests:
        extra["shared_kv_token_bytes_per_agent"] = (
            stats.segment_held_tokens / stats.segment_requests * block_bytes / block_size)
    if stats.shared_text_blocks_per_agent is not None:
        extra["shared_kv_bytes_per_agent"] = stats.shared_text_blocks_per_agent * block_bytes
    return extra


async def _sample(engine: Served, pools: list[AsyncEngine], out: list[KVSample]) -> None:
    """`pools`: the engines whose KV ledgers make up `engine`'s (see `members`)."""
    clock, ledgers = asyncio.get_running_loop().time, [pool.engine.kv.owners for pool in pools]
    while True:
        engine.sample_shared_text()  # taken on the engine's side, between two steps
        stats = engine.stats()
        # Released runs leave the ledger: every owner in it is an agent of a live run. An agent
        # that moved between replicas holds blocks in two ledgers: counted once in each.
        out.append(KVSample(clock(), stats.kv_blocks_in_use, stats.kv_blocks_cached,
                            [n for ledger in ledgers for n in ledger.held_counts()]))
        await asyncio.sleep(SAMPLE_EVERY_S)


def with_policy(config: ServeConfig, policy: str) -> ServeConfig:
    """The config for one compared policy, with the options it takes: `policy` is a name, or
    a variant `NAME:KEY=VALUE[:KEY=VALUE...]` (an ablation: the policy with those options,
    over the `--policy-option`s it takes)."""
    name, variant = parse_variant(policy)
    engine = config.engine
    return replace(config, engine=replace(
        engine, policy=name,
        policy_options={**options_for(name, engine.policy_options), **variant}))


def parse_variant(policy: str) -> tuple[str, dict[str, str]]:
    """`NAME:KEY=VALUE:...` -> (NAME, {KEY: VALUE}); ValueError for a part without `=`."""
    name, *parts = policy.split(":")
    options = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{policy!r}: a variant's options are KEY=VALUE, not {part!r}")
        options[key.strip()] = value.strip()
    return name.strip(), options
