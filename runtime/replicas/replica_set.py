"""Several engine replicas behind one daemon, as one engine: `ReplicaSet` is what the app serves
with `kvrt serve --replicas N` (Ray actors, ray_replica.py) and `kvrt sim --replicas N`
(simulated engines in this process). The router (router.py) says where each call goes; the set
carries it out and keeps what the daemon needs to stay right while replicas come and go:

    calls       each to the router's replica; one that dies under a call fails it with
                ReplicaUnavailable (503, Retry-After), and the router places again what it had
    control     a run's events and priorities go to the replica holding the agent (its home,
                or where its last call went for a graph-blind router); its outlook to every
                replica holding one of its agents
    release     ending a run releases it on every replica that ever served or heard of it
    figures     stats, load, residency and decisions add up over the replicas (merged.py);
                each replica's own are in `replicas()` (/health, /metrics' `replica` label)

The daemon's own state (graphs, runs, learned durations, tenants) lives in the daemon, not
in a replica: losing one loses its KV and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing

from kvrt.runtime.engine.protocol import (
    NO_REPLICA_RETRY_S,
    AgentEvent,
    AgentResidency,
    EngineError,
    EngineLoad,
    EngineStats,
    GenerateOutput,
    GenerateRequest,
    RecentDecisions,
    ReplicaStatus,
    ReplicaUnavailable,
)
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.replicas.merged import (
    merge_decisions,
    merge_residency,
    sum_loads,
    sum_stats,
)
from kvrt.runtime.replicas.replica import Replica
from kvrt.runtime.replicas.router import ReplicaView, Router

log = logging.getLogger(__name__)

class ReplicaSet:
    """Implements ManagedEngine (runtime/server/app_keys.py) over `replicas`."""

    def __init__(self, replicas: Sequence[Replica], router: Router, *, model_name: str,
                 max_model_len: int, tokenizer: Tokenizer, vocab_size: int) -> None:
        if not replicas:
            raise ValueError("a ReplicaSet needs at least one replica")
        self.members = list(replicas)
        self.router = router
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._heard: dict[str, set[int]] = defaultdict(set)  # run -> replicas that saw it
        self._last: dict[tuple[str, str], int] = {}  # (run, agent) -> its last call's replica
        self._down: set[int] = set()  # replicas the router was told are down
        self._priorities: dict[str, dict[str, float]] = defaultdict(dict)  # run -> last pushed

    # -- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(replica.start() for replica in self.members))

    async def stop(self) -> None:
        await asyncio.gather(*(replica.stop() for replica in self.members))

    def is_alive(self) -> bool:
        return any(replica.state() != "down" for replica in self.members)

    # -- calls -----------------------------------------------------------------------------

    def _views(self, dead: int | None = None) -> list[ReplicaView]:
        """What the router sees; a replica seen down for the first time (or `dead`, which
        just failed a call) has what it held placed again first."""
        states = [replica.state() for replica in self.members]
        if dead is not None:
            states[dead] = "down"
        views = []
        for replica, state in zip(self.members, states, strict=True):
            load = replica.load()
            views.append(ReplicaView(state == "ready", load.in_flight, load.queued_requests,
                                     load.queued_tokens))
        for index, state in enumerate(states):
            if state == "ready":
                self._down.discard(index)
            elif state == "down" and index not in self._down:
                self._down.add(index)
                log.warning("replica %s is down: what it held is placed on the others",
                            self._name(index))
                self._last = {who: i for who, i in self._last.items() if i != index}
                self.router.replica_down(index, views)
        return views

    def _ready_views(self) -> list[ReplicaView]:
        views = self._views()
        if not any(view.ready for view in views):
            raise _none_ready()
        return views

    def validate(self, request: GenerateRequest) -> None:
        ready = next((r for r in self.members if r.state() == "ready"), None)
        if ready is None:
            raise _none_ready()
        ready.validate(request)  # the replicas serve one model alike

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        views = self._ready_views()
        index = self.router.route(request, views)
        run, agent = request.attribution.run, request.attribution.agent or ""
        if run is not None:
            self._last[(run, agent)] = index
            if index not in self._heard[run]:  # new there (placed, moved): it learns the run
                self._heard[run].add(index)
                self._resend_priorities(run, index, views)
        self.router.started(request, index)
        try:
            async with aclosing(self.members[index].generate(request)) as outputs:
                first = True
                async for item in outputs:
                    if first:
                        self.router.prefilled(request, index)
                        first = False
                    yield item
        except ReplicaUnavailable:
            self._views(dead=index)
            raise
        finally:
            self.router.finished(request, index)

    def load(self) -> EngineLoad:
        return sum_loads([replica.load() for replica in self.members])

    async def abort_all(self, error: EngineError) -> int:
        counts = await asyncio.gather(*(r.abort_all(error) for r in self.members))
        return sum(counts)

    # -- control ---------------------------------------------------------------------------

    def _agent_replica(self, run: str, agent: str, views: list[ReplicaView]) -> int | None:
        home = self.router.home(run, agent, views)
        return self._last.get((run, agent)) if home is None else home

    def _control_views(self) -> list[ReplicaView] | None:
        views = self._views()
        return views if any(view.ready for view in views) else None

    def notify(self, event: AgentEvent) -> None:
        views = self._control_views()
        if views is None:
            return  # no replica holds anything now: nothing to tell
        index = self._agent_replica(event.run, event.agent, views)
        if index is not None:
            self._heard[event.run].add(index)
            self.members[index].notify(event)
        if event.kind == "agent.done":
            self.router.agent_done(event.run, event.agent)

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        self._priorities[run].update(priorities)
        views = self._control_views()
        if views is None:
            return
        self.router.plan_run(run, priorities, views)  # the first push names every agent
        by_replica: dict[int, dict[str, float]] = defaultdict(dict)
        for agent, priority in priorities.items():
            index = self._agent_replica(run, agent, views)
            if index is not None:
                by_replica[index][agent] = priority
        for index, part in by_replica.items():
            self._heard[run].add(index)
            self.members[index].set_priorities(run, part)

    def _resend_priorities(self, run: str, index: int, views: list[ReplicaView]) -> None:
        """The run's last priorities of its agents that now live on `index`: the daemon pushes
        only changes, and these went to where the agents were before."""
        part = {agent: priority for agent, priority in self._priorities.get(run, {}).items()
                if self._agent_replica(run, agent, views) == index}
        if part:
            self.members[index].set_priorities(run, part)

    def set_outlook(self, run: str, remaining_s: float,
                    next_use: Mapping[str, float | None]) -> None:
        for index in self._holding(run):
            self.members[index].set_outlook(run, remaining_s, next_use)

    def _holding(self, run: str) -> list[int]:
        return [i for i in self._heard.get(run, ()) if self.members[i].state() == "ready"]

    async def release_run(self, run: str) -> int:
        heard = self._heard.pop(run, set())
        self._priorities.pop(run, None)
        self.router.forget_run(run)
        self._last = {who: i for who, i in self._last.items() if who[0] != run}
        counts = await asyncio.gather(*(self._release_on(i, run) for i in sorted(heard)))
        return sum(counts)

    async def _release_on(self, index: int, run: str) -> int:
        try:
            return await self.members[index].release_run(run)
        except ReplicaUnavailable:
            return 0  # it died: its KV went with it

    def sample_shared_text(self) -> None:
        for replica in self.members:
            if replica.state() == "ready":
                replica.sample_shared_text()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        await asyncio.gather(*(r.wait_idle(timeout) for r in self.members
                               if r.state() == "ready"))

    # -- figures ---------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return sum_stats([replica.stats() for replica in self.members])

    def kv_residency(self, run: str) -> dict[str, AgentResidency]:
        return merge_residency(self.members[i].kv_residency(run) for i in self._holding(run))

    def recent_decisions(self) -> RecentDecisions:
        return merge_decisions([r.recent_decisions() for r in self.members
                                if r.state() == "ready"])

    def replica_of(self, run: str) -> list[str]:
        return [self._name(i) for i in sorted(self._heard.get(run, ()))]

    def replicas(self) -> list[ReplicaStatus]:
        statuses = []
        for index, replica in enumerate(self.members):
            runs, agents = self.router.placed(index)
            state = replica.state()
            statuses.append(ReplicaStatus(
                self._name(index), state, replica.restarts, runs, agents, replica.load(),
                replica.stats() if state == "ready" else None))
        return statuses

    def _name(self, index: int) -> str:
        return str(index)


def _none_ready() -> ReplicaUnavailable:
    return ReplicaUnavailable("no engine replica is ready (starting or restarting); retry "
                              "shortly", retry_after_s=NO_REPLICA_RETRY_S)
