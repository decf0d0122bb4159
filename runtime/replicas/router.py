"""Which replica serves each call (`kvrt serve --replicas N --router NAME`).

    affinity     kvrt's, by the graph. Every agent of a run has a home replica, where its KV
                 lives (its prefixes, the round text it reads, its offloaded blocks): its calls
                 go there, and so do its run's events, priorities and outlook. A run's agents
                 are placed together when the run starts (the least loaded replica takes them
                 all), so a round runs on one replica and its shared text is computed once.
                 Runs share text too (runs of one graph, its agents' system prompts): at a
                 whole run's first call it moves, before any of its KV exists, to the replica
                 that holds the longest prefix of that call's prompt, if that one stays within
                 the balance SLACK (else the caller alone does), and so does each agent at
                 its own first call (see `AffinityRouter._kin`). A run too big for one
                 replica's fair share is split, evenly, over as few replicas as balance
                 needs: a round of it computes its text once per replica.
                 An agent of an overloaded replica moves (see `AffinityRouter._moved`). Calls
                 without a run go by prefix, as below.
    prefix       graph-blind, as Ray Serve's prefix-affinity router: each call goes to the
                 replica that lately saw the longest prefix of its prompt, unless that one has
                 IMBALANCE more calls in flight than the least busy, which then takes it.
    round-robin  blind to graph and cache: each call to the next ready replica.

A router sees the replicas as `ReplicaView`s (ready or not, what is in flight and queued) and
is told of each call's start and end. It runs on the event loop only.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvrt.runtime.engine.protocol import GenerateRequest
from kvrt.runtime.replicas.prefix_index import BLOCK_TOKENS, PrefixIndex, prefix_chain

log = logging.getLogger(__name__)

Agent = tuple[str, str]  # (run, agent)

IMBALANCE = 8  # prefix: calls in flight past the least busy replica that void an affinity
MATCH_MIN = 0.1  # prefix: the fewest of a prompt's blocks a replica must hold to be preferred
SLACK = 0.25  # affinity: a run stays whole while its replica holds at most this over the mean
MIN_GROUP = 16  # affinity: a run of up to this many agents is never split


@dataclass(frozen=True, slots=True)
class ReplicaView:
    ready: bool
    in_flight: int  # calls live on it
    queued_requests: int  # of those, not yet producing output
    queued_tokens: int  # their prompt tokens: the prefill waiting there


class Router(Protocol):
    name: str

    def route(self, request: GenerateRequest, views: Sequence[ReplicaView]) -> int:
        """The ready replica to serve the call (there is at least one)."""
        ...

    def home(self, run: str, agent: str, views: Sequence[ReplicaView]) -> int | None:
        """Where the agent's KV lives, for its events and priorities: None when the router
        does not place agents (the caller then uses where its last call went)."""
        ...

    def plan_run(self, run: str, agents: Iterable[str], views: Sequence[ReplicaView]) -> None:
        """The run's agents, as its graph declares them, when it starts."""
        ...

    def started(self, request: GenerateRequest, replica: int) -> None: ...

    def prefilled(self, request: GenerateRequest, replica: int) -> None:
        """The call's first output came: its prompt no longer waits there."""
        ...

    def finished(self, request: GenerateRequest, replica: int) -> None: ...

    def agent_done(self, run: str, agent: str) -> None: ...

    def forget_run(self, run: str) -> None: ...

    def replica_down(self, replica: int, views: Sequence[ReplicaView]) -> None:
        """The replica died, with its KV: whatever was placed there is placed again."""
        ...

    def placed(self, replica: int) -> tuple[int, int]:
        """(runs, agents) placed on the replica."""
        ...


def make_router(name: str, replicas: int, *, step_tokens: int) -> Router:
    """`step_tokens`: the replicas' per-step token budget (EngineConfig.max_num_batched_tokens),
    the unit in which the affinity router weighs a wait."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose {', '.join(ROUTERS)}")
    if name == "affinity":
        return AffinityRouter(replicas, step_tokens=step_tokens)
    return PrefixRouter(replicas) if name == "prefix" else RoundRobinRouter()


def _ready(views: Sequence[ReplicaView]) -> list[int]:
    return [i for i, view in enumerate(views) if view.ready]


def _interleaved(targets: list[int]) -> list[int]:
    """The same replicas, as many times each, dealt out in turn: agents are called in about
    the order they are declared (a round's calls go out in that order), and dealt out so, every
    replica's share of a run starts with its first calls; in blocks, the last replicas would
    wait idle for the run's last calls while the first ones queue the rest."""
    quota = Counter(targets)
    dealt: list[int] = []
    while quota:
        for replica in list(quota):
            dealt.append(replica)
            quota[replica] -= 1
            if not quota[replica]:
                del quota[replica]
    return dealt


class _Blind:
    """What the graph-blind routers share: they place no agent."""

    def home(self, run: str, agent: str, views: Sequence[ReplicaView]) -> int | None:
        return None

    def plan_run(self, run: str, agents: Iterable[str], views: Sequence[ReplicaView]) -> None:
        pass

    def started(self, request: GenerateRequest, replica: int) -> None:
        pass

    def prefilled(self, request: GenerateRequest, replica: int) -> None:
        pass

    def finished(self, request: GenerateRequest, replica: int) -> None:
        pass

    def agent_done(self, run: str, agent: str) -> None:
        pass

    def forget_run(self, run: str) -> None:
        pass

    def placed(self, replica: int) -> tuple[int, int]:
        return 0, 0


class RoundRobinRouter(_Blind):
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def route(self, request: GenerateRequest, views: Sequence[ReplicaView]) -> int:
        ready = _ready(views)
        return ready[next(self._turn) % len(ready)]

    def replica_down(self, replica: int, views: Sequence[ReplicaView]) -> None:
        pass


class PrefixRouter(_Blind):
    name = "prefix"

    def __init__(self, replicas: int, index: PrefixIndex | None = None) -> None:
        """`index`: what each replica was sent, when the caller keeps it (see AffinityRouter)."""
        self._index = index or PrefixIndex(replicas)
        self._turn = itertools.count()  # breaks ties among equally busy replicas

    def route(self, request: GenerateRequest, views: Sequence[ReplicaView]) -> int:
        chain = prefix_chain(request)
        choice = self.choose(chain, views)
        self._index.add(choice, chain)
        return choice

    def choose(self, chain: list[int], views: Sequence[ReplicaView]) -> int:
        """Where a prompt of this chain goes (not yet noted as sent there)."""
        ready = _ready(views)
        least = min(view.in_flight for i, view in enumerate(views) if i in ready)
        choice = None
        if chain:
            matched = {i: self._index.matched(i, chain) for i in ready}
            best = max(ready, key=lambda i: (matched[i], -views[i].in_flight))
            if (matched[best] >= MATCH_MIN * len(chain)
                    and views[best].in_flight - least <= IMBALANCE):
                choice = best
        if choice is None:
            idle = [i for i in ready if views[i].in_flight == least]
            choice = idle[next(self._turn) % len(idle)]
        return choice

    def replica_down(self, replica: int, views: Sequence[ReplicaView]) -> None:
        self._index.forget(replica)


class AffinityRouter:
    name = "affinity"

    def __init__(self, replicas: int, *, step_tokens: int) -> None:
        """`step_tokens`: the tokens a replica's step computes at most (its chunked prefill
        budget): prefill queued within one step's budget costs no wait but that step."""
        self._step_tokens = step_tokens
        # What each replica was sent, calls with a run and without: one picture of its cache.
        self._index = PrefixIndex(replicas)
        self._prefix = PrefixRouter(replicas, self._index)  # calls without a run
        self._home: dict[str, dict[str, int]] = {}  # run -> agent -> replica
        self._agents = [0] * replicas  # live agents placed on each replica, done ones not
        # Agents reported done keep their home (LangGraph reports every node done at the end
        # of an invocation; the next one calls them again, and their KV is there) but no
        # longer count as load.
        self._done: set[Agent] = set()
        self._in_flight: dict[Agent, int] = defaultdict(int)
        self._context: dict[Agent, int] = {}  # prompt tokens of the agent's last call
        # The prefill waiting on each replica: the calls sent there with no output yet, each
        # by the tokens it computes there (its prompt less the prefix the index says the
        # replica holds). A replica's own queued_tokens count whole prompts, most of which a
        # warm cache holds.
        self._fresh = [0] * replicas
        self._run_fresh: dict[tuple[str, int], int] = defaultdict(int)  # of a run's calls
        self._waiting: dict[int, tuple[int, str | None, int]] = {}  # id(call): where, run, fresh
        self._routed: tuple[GenerateRequest, int] | None = None  # the last call routed, fresh
        self._unstarted: set[str] = set()  # runs placed whole that have made no call yet

    # -- placing ---------------------------------------------------------------------------

    def plan_run(self, run: str, agents: Iterable[str], views: Sequence[ReplicaView]) -> None:
        homes = self._home.setdefault(run, {})
        new = [agent for agent in agents if agent not in homes]
        if new and _ready(views):
            if not homes:
                self._unstarted.add(run)
            self._place(run, new, views)

    def home(self, run: str, agent: str, views: Sequence[ReplicaView]) -> int | None:
        homes = self._home.setdefault(run, {})
        if agent not in homes:
            if not _ready(views):
                return None
            if not homes:
                self._unstarted.add(run)
            self._place(run, [agent], views)
        return homes[agent]

    def _place(self, run: str, agents: list[str], views: Sequence[ReplicaView]) -> None:
        """Whole on the least loaded replica (its run's, for agents joining a run) while that
        keeps the replicas within SLACK of the mean, or the group is at most MIN_GROUP; else
        split evenly, filling the least loaded replicas up to the mean, the agents dealt out
        in turn (see _interleaved)."""
        ready, load = self._load(views)
        mean = (sum(load.values()) + len(agents)) / len(ready)
        mates = Counter(i for i in self._home[run].values() if i in load)
        first = (max(mates, key=lambda i: (mates[i], -load[i])) if mates
                 else min(ready, key=lambda i: (load[i], views[i].queued_tokens, i)))
        if (load[first] + len(agents) <= mean * (1 + SLACK)
                or mates[first] + len(agents) <= MIN_GROUP):
            self._assign(run, agents, [first] * len(agents))
            return
        level = math.ceil(mean)
        targets: list[int] = []
        for i in sorted(ready, key=lambda i: (load[i], i)):
            targets += [i] * max(0, min(level - load[i], len(agents) - len(targets)))
        while len(targets) < len(agents):  # what rounding left over
            targets.append(min(ready, key=lambda i: (load[i] + targets.count(i), i)))
        self._assign(run, agents, _interleaved(targets))

    def _load(self, views: Sequence[ReplicaView]) -> tuple[list[int], dict[int, int]]:
        """The ready replicas, and each one's load: its live agents placed, its calls queued."""
        ready = _ready(views)
        return ready, {i: self._agents[i] + views[i].queued_requests for i in ready}

    def _assign(self, run: str, agents: list[str], replicas: list[int]) -> None:
        homes = self._home[run]
        for agent, replica in zip(agents, replicas, strict=True):
            homes[agent] = replica
            self._agents[replica] += 1
            self._done.discard((run, agent))

    def _unplace(self, run: str, agent: str) -> None:
        replica = self._home.get(run, {}).pop(agent, None)
        if replica is not None and (run, agent) not in self._done:
            self._agents[replica] -= 1
        self._done.discard((run, agent))

    # -- routing ---------------------------------------------------------------------------

    def route(self, request: GenerateRequest, views: Sequence[ReplicaView]) -> int:
        run, agent = request.attribution.run, request.attribution.agent or ""
        chain = prefix_chain(request)
        replica = (self._prefix.choose(chain, views) if run is None
                   else self._route_agent(request, run, agent, chain, views))
        self._routed = request, self._uncached(replica, len(request.prompt_token_ids), chain)
        self._index.add(replica, chain)
        return replica

    def _route_agent(self, request: GenerateRequest, run: str, agent: str, chain: list[int],
                     views: Sequence[ReplicaView]) -> int:
        replica = self.home(run, agent, views)
        assert replica is not None  # a ready replica exists: the caller checked
        if (run, agent) in self._done:  # called again: it counts again
            self._done.discard((run, agent))
            self._agents[replica] += 1
        if not views[replica].ready:  # not seen down yet: placed again, among the ready
            self._unplace(run, agent)
            replica = self.home(run, agent, views)
            assert replica is not None
        first = (run, agent) not in self._context and not self._in_flight[(run, agent)]
        if run in self._unstarted or first:  # nothing of it has run where it is placed
            homes = self._home[run]
            movers = list(homes) if run in self._unstarted else [agent]
            self._unstarted.discard(run)
            kin = self._kin(movers, homes, replica, chain, views)
            if kin is None and len(movers) > 1 and first:
                # The run would break the balance: the caller alone, as at its own first call
                # in a started run (its run-mates' prompts may lie elsewhere: a workflow's
                # agents each have their own).
                movers = [agent]
                kin = self._kin(movers, homes, replica, chain, views)
            if kin is not None:
                for mover in movers:
                    self._unplace(run, mover)
                self._assign(run, movers, [kin] * len(movers))
                replica = kin
        moved = self._moved((run, agent), replica, request, chain, views)
        if moved is not None:
            self._unplace(run, agent)
            self._assign(run, [agent], [moved])
            replica = moved
        return replica

    def _uncached(self, replica: int, tokens: int, chain: list[int]) -> int:
        """What the replica computes of a prompt of `tokens` tokens with this chain."""
        return max(0, tokens - self._index.matched(replica, chain) * BLOCK_TOKENS)

    def _kin(self, movers: list[str], homes: dict[str, int], replica: int, chain: list[int],
             views: Sequence[ReplicaView]) -> int | None:
        """Where `movers` (a whole run at its first call, or one agent at its own), all placed
        on `replica` and none having made a call, go, or None to stay: the replica holding the
        longest prefix of the call's prompt (at least MATCH_MIN of it, and more than `replica`
        holds), among those that keep the balance. Runs of one graph share their agents'
        system prompts, which prefix-blind placement computes on every replica; no call of the
        movers has run yet, so the move recomputes nothing (the ReplicaSet sends their
        priorities to where they went). The balance, three bounds:
          - the target stays within SLACK over the mean load, or no more loaded than `replica`
            is with them: a move never makes the busiest replica busier than placing did;
          - `replica` stays within SLACK under the mean, or no emptier than the target was: a
            replica yet to compute a prefix every run shares would otherwise lose every run to
            the replicas that have (it computes it once and stays warm);
          - the target has at most IMBALANCE calls in flight more than the least busy, as the
            prefix router: placed agents are not all busy (a DAG's wait for their
            predecessors), so the load by agents misses where the calls are."""
        if not chain or any(homes[mover] != replica for mover in movers):
            return None
        ready, load = self._load(views)
        mean, count = sum(load.values()) / len(ready), len(movers)
        bound = max(mean * (1 + SLACK), load[replica])
        least = min(views[i].in_flight for i in ready)
        fits = [i for i in ready if i != replica and load[i] + count <= bound
                and load[replica] - count >= min(mean * (1 - SLACK), load[i])
                and views[i].in_flight - least <= IMBALANCE]
        if not fits:
            return None
        matched = {i: self._index.matched(i, chain) for i in [replica, *fits]}
        best = max(fits, key=lambda i: (matched[i], -load[i], -i))
        if matched[best] <= matched[replica] or matched[best] < MATCH_MIN * len(chain):
            return None
        return best

    def _moved(self, who: Agent, replica: int, request: GenerateRequest, chain: list[int],
               views: Sequence[ReplicaView]) -> int | None:
        """Where the agent's call would start at least one step sooner, or None to stay. Only
        an agent with no call in flight moves, and only off a replica where prefill of other
        runs waits. A call waits on a replica for the steps that compute the prefill queued
        there (the fresh tokens of the calls with no output yet) and its own: at home what
        its prompt adds to its cached context; elsewhere its whole context (its last call's
        prompt, at least this one's) less the prefix that replica holds. A call takes one
        step at least, and prefill within the step budget costs no more. Its KV is recomputed
        there, never copied: a copy through the host tier costs a host round trip of the
        context on both replicas and a transfer between them, while recomputing costs one
        prefill, counted in the wait. Its own run's calls do not count as queued ahead: a
        round's calls arrive together, and splitting them would compute its text twice."""
        if self._in_flight[who]:
            return None
        others = [i for i in _ready(views) if i != replica]
        prompt = len(request.prompt_token_ids)
        context = max(self._context.get(who, 0), prompt)

        def ahead(i: int) -> int:
            return self._fresh[i] - self._run_fresh.get((who[0], i), 0)

        def steps(i: int) -> int:
            own = self._uncached(i, prompt if i == replica else context, chain)
            return max(1, math.ceil((ahead(i) + own) / self._step_tokens))

        if not others or ahead(replica) <= 0:
            return None
        here = steps(replica)
        target = min(others, key=lambda i: (steps(i), self._agents[i], i))
        if steps(target) >= here:
            return None
        log.info("affinity: agent %s of run %s moves from replica %d to %d: its call would "
                 "wait there for %d steps of prefill, its own included, and for %d on %d, "
                 "its context recomputed", who[1], who[0], replica, target, here,
                 steps(target), target)
        return target

    def started(self, request: GenerateRequest, replica: int) -> None:
        routed, self._routed = self._routed, None
        fresh = (routed[1] if routed is not None and routed[0] is request
                 else len(request.prompt_token_ids))
        run = request.attribution.run
        self._waiting[id(request)] = replica, run, fresh
        self._fresh[replica] += fresh
        if run is not None:
            who = (run, request.attribution.agent or "")
            self._in_flight[who] += 1
            self._context[who] = len(request.prompt_token_ids)
            self._run_fresh[(run, replica)] += fresh

    def prefilled(self, request: GenerateRequest, replica: int) -> None:
        waiting = self._waiting.pop(id(request), None)
        if waiting is None:
            return
        replica, run, fresh = waiting
        self._fresh[replica] -= fresh
        if run is not None:
            self._run_fresh[(run, replica)] -= fresh
            if not self._run_fresh[(run, replica)]:
                del self._run_fresh[(run, replica)]

    def finished(self, request: GenerateRequest, replica: int) -> None:
        self.prefilled(request, replica)  # a call that failed before its first output
        run = request.attribution.run
        if run is not None:
            who = (run, request.attribution.agent or "")
            self._in_flight[who] -= 1
            if not self._in_flight[who]:
                del self._in_flight[who]

    # -- ends ------------------------------------------------------------------------------

    def agent_done(self, run: str, agent: str) -> None:
        replica = self._home.get(run, {}).get(agent)
        if replica is not None and (run, agent) not in self._done:
            self._done.add((run, agent))
            self._agents[replica] -= 1

    def forget_run(self, run: str) -> None:
        for agent in list(self._home.get(run, {})):
            self._unplace(run, agent)
            self._context.pop((run, agent), None)
        self._home.pop(run, None)
        self._unstarted.discard(run)

    def replica_down(self, replica: int, views: Sequence[ReplicaView]) -> None:
        self._index.forget(replica)  # the prefix router's too
        for run, homes in self._home.items():
            lost = [agent for agent, home in homes.items() if home == replica]
            for agent in lost:
                self._unplace(run, agent)
                self._context.pop((run, agent), None)  # its KV is gone: nothing to recompute
            if lost and _ready(views):
                self._place(run, lost, views)

    def placed(self, replica: int) -> tuple[int, int]:
        runs = sum(1 for homes in self._home.values() if replica in homes.values())
        return runs, self._agents[replica]



ROUTERS = ("affinity", "prefix", "round-robin")
