"""The routers' decisions, on views made by hand (no engine): where runs, agents and
unattributed calls go, and what happens when a replica dies or is overloaded."""

from __future__ import annotations

from collections import Counter

import pytest

from kvrt.runtime.engine.protocol import Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.replicas.router import (
    AffinityRouter,
    PrefixRouter,
    ReplicaView,
    RoundRobinRouter,
    make_router,
)

IDLE = ReplicaView(ready=True, in_flight=0, queued_requests=0, queued_tokens=0)
DOWN = ReplicaView(ready=False, in_flight=0, queued_requests=0, queued_tokens=0)


def call(prompt: list[int], run: str | None = None, agent: str | None = None,
         salt: bytes = b"") -> GenerateRequest:
    return GenerateRequest("r", prompt, SamplingParams(), salt=salt,
                           attribution=Attribution(run=run, agent=agent))


STEP = 64  # the replicas' step budget, in tokens


def affinity(replicas: int) -> AffinityRouter:
    return AffinityRouter(replicas, step_tokens=STEP)


def busy(in_flight: int = 0, queued: int = 0, tokens: int = 0) -> ReplicaView:
    return ReplicaView(True, in_flight, queued, tokens)


def test_a_small_run_lives_whole_on_the_least_loaded_replica_and_the_next_run_elsewhere():
    router = affinity(4)
    views = [IDLE] * 4
    router.plan_run("a", [f"w{i}" for i in range(6)], views)
    router.plan_run("b", [f"w{i}" for i in range(6)], views)
    homes_a = {router.home("a", f"w{i}", views) for i in range(6)}
    homes_b = {router.home("b", f"w{i}", views) for i in range(6)}
    assert len(homes_a) == 1 and len(homes_b) == 1 and homes_a != homes_b
    for i in range(6):  # every call of an agent goes to its home
        assert router.route(call([1] * 40, "a", f"w{i}"), views) in homes_a
    assert router.placed(homes_a.pop()) == (1, 6)


def test_a_run_too_big_for_one_replica_is_split_evenly():
    router = affinity(4)
    views = [IDLE] * 4
    router.plan_run("town", [f"p{i}" for i in range(100)], views)
    per_replica = Counter(router.home("town", f"p{i}", views) for i in range(100))
    assert sorted(per_replica.values()) == [25, 25, 25, 25]
    # Dealt out in turn: a round's calls, in declaration order, reach every replica at once.
    first = [router.home("town", f"p{i}", views) for i in range(8)]
    assert Counter(first) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_a_run_that_would_unbalance_the_replicas_by_more_than_the_slack_is_split():
    router = affinity(2)
    views = [IDLE] * 2
    router.plan_run("a", [f"x{i}" for i in range(40)], views)  # 20 + 20
    router.plan_run("b", [f"y{i}" for i in range(10)], views)  # small: kept whole
    assert len({router.home("b", f"y{i}", views) for i in range(10)}) == 1
    loads = [router.placed(i)[1] for i in range(2)]
    assert sorted(loads) == [20, 30]


def test_an_agent_that_joins_later_goes_to_its_run_mates():
    router = affinity(3)
    views = [IDLE] * 3
    router.plan_run("a", ["x", "y"], views)
    router.plan_run("b", ["z"], views)
    assert router.route(call([5] * 20, "a", "late"), views) == router.home("a", "x", views)


def test_the_agents_of_a_dead_replica_are_placed_again_together_on_the_others():
    router = affinity(3)
    views = [IDLE] * 3
    router.plan_run("a", ["x", "y", "z"], views)
    dead = router.home("a", "x", views)
    after = [DOWN if i == dead else IDLE for i in range(3)]
    router.replica_down(dead, after)
    homes = {router.home("a", agent, after) for agent in "xyz"}
    assert len(homes) == 1 and dead not in homes
    assert router.placed(dead) == (0, 0)


def two_runs_on_one_replica() -> tuple[AffinityRouter, int]:
    """Runs "a" (agent x) and "b" (agent y) live on one replica (returned); x has made one
    call, a 96-token context, now cached there."""
    router = affinity(2)
    router.plan_run("a", ["x"], [IDLE, IDLE])
    home = router.home("a", "x", [IDLE, IDLE])
    router.plan_run("b", ["y"], [IDLE if i == home else busy(queued=5) for i in range(2)])
    assert router.home("b", "y", [IDLE, IDLE]) == home
    served(router, call(list(range(1000, 1096)), "a", "x"), [IDLE, IDLE])
    return router, home


def served(router: AffinityRouter, request: GenerateRequest, views: list[ReplicaView]) -> int:
    """As the ReplicaSet does: routed, started, first output, end."""
    replica = router.route(request, views)
    router.started(request, replica)
    router.prefilled(request, replica)
    router.finished(request, replica)
    return replica


def queue(router: AffinityRouter, request: GenerateRequest) -> int:
    """Routed and started, with no output yet: its prompt waits there."""
    replica = router.route(request, [IDLE, IDLE])
    router.started(request, replica)
    return replica


def test_an_agent_moves_when_the_prefill_waiting_at_home_outweighs_recomputing_its_context():
    router, home = two_runs_on_one_replica()
    x_next = list(range(1000, 1096)) + [7] * 16  # its context and 16 new tokens
    # 160 fresh tokens queued ahead of x at home: 160 + its 16 new ones there, three steps,
    # against its 112-token prompt computed whole on the idle replica, two: it moves, while
    # y's call has had no output; after its first output nothing of it waits.
    y_call = call(list(range(2000, 2160)), "b", "y")
    assert queue(router, y_call) == home
    router.prefilled(y_call, home)
    assert router.route(call(x_next, "a", "x"), [IDLE, IDLE]) == home
    router.finished(y_call, home)
    assert queue(router, call(list(range(3000, 3160)), "b", "y")) == home
    assert router.route(call(x_next, "a", "x"), [IDLE, IDLE]) == 1 - home


def test_an_agent_stays_when_recomputing_its_context_elsewhere_costs_more_than_the_wait():
    router, home = two_runs_on_one_replica()
    x_next = list(range(1000, 1096)) + [7] * 16
    # 80 fresh tokens ahead: 80 + 16 at home, 112 elsewhere: two steps either way.
    assert queue(router, call(list(range(2000, 2080)), "b", "y")) == home
    assert router.route(call(x_next, "a", "x"), [IDLE, IDLE]) == home


def test_what_a_replica_has_cached_of_a_queued_prompt_is_not_a_wait():
    router, home = two_runs_on_one_replica()
    y_context = list(range(2000, 2320))
    served(router, call(y_context, "b", "y"), [IDLE, IDLE])
    # y's next call queues 336 prompt tokens at home, 320 of them cached there: 16 to compute.
    assert queue(router, call(y_context + [9] * 16, "b", "y")) == home
    x_next = list(range(1000, 1096)) + [7] * 16
    assert router.route(call(x_next, "a", "x"), [IDLE, IDLE]) == home


def test_an_agent_with_a_call_in_flight_never_moves():
    router = affinity(2)
    views = [IDLE, IDLE]
    home = router.route(call([1] * 10, "a", "x"), views)
    router.started(call([1] * 10, "a", "x"), home)
    loaded = [busy(9, 8, 10_000) if i == home else IDLE for i in range(2)]
    assert router.route(call([1] * 10, "a", "x"), loaded) == home


def test_prefix_sends_a_shared_prefix_to_the_same_replica_until_it_is_too_busy():
    router = PrefixRouter(3)
    system = list(range(64))
    first = router.route(call(system + [100, 101]), [IDLE] * 3)
    views = [busy(in_flight=3) if i == first else IDLE for i in range(3)]
    assert router.route(call(system + [200] * 20), views) == first
    swamped = [busy(in_flight=20) if i == first else IDLE for i in range(3)]
    assert router.route(call(system + [300] * 20), swamped) != first


def test_prefix_keeps_tenants_apart():
    router = PrefixRouter(2)
    text = list(range(64))
    first = router.route(call(text, salt=b"tenant-a"), [IDLE, IDLE])
    # The other tenant's identical prompt matches nothing: the least busy replica, which is
    # the other one while the first holds a call.
    views = [busy(in_flight=1) if i == first else IDLE for i in range(2)]
    assert router.route(call(text, salt=b"tenant-b"), views) == 1 - first


def test_prefix_spreads_unrelated_prompts_over_idle_replicas():
    router = PrefixRouter(3)
    chosen = {router.route(call([i] * 32), [IDLE] * 3) for i in range(3)}
    assert chosen == {0, 1, 2}


def test_affinity_routes_unattributed_calls_by_prefix():
    router = affinity(2)
    system = list(range(48))
    first = router.route(call(system + [1]), [IDLE, IDLE])
    views = [busy(in_flight=2) if i == first else IDLE for i in range(2)]
    assert router.route(call(system + [2] * 17), views) == first


def test_round_robin_cycles_over_the_ready_replicas_only():
    router = RoundRobinRouter()
    views = [IDLE, DOWN, IDLE]
    assert [router.route(call([1]), views) for _ in range(4)] == [0, 2, 0, 2]


def test_unknown_router_names_are_refused():
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random", 2, step_tokens=STEP)


def test_a_rounds_own_queued_calls_never_push_its_agents_apart():
    router = affinity(2)
    router.plan_run("a", ["x", "y", "z"], [IDLE, IDLE])
    home = router.home("a", "x", [IDLE, IDLE])
    queued = 0
    for agent in "xyz":  # the round's calls, submitted together, queue at home
        views = [busy(queued // 40, queued // 40, queued) if i == home else IDLE
                 for i in range(2)]
        request = call([7] * 40, "a", agent)
        assert router.route(request, views) == home
        router.started(request, home)
        queued += 40


def test_a_done_agent_keeps_its_home_but_no_longer_counts_as_load():
    router = affinity(2)
    views = [IDLE, IDLE]
    router.plan_run("thread", ["agent", "tools"], views)
    home = router.home("thread", "agent", views)
    for agent in ("agent", "tools"):  # the end of a LangGraph invocation
        router.agent_done("thread", agent)
    assert router.placed(home) == (1, 0)
    router.plan_run("other", ["x"], views)  # placed by load: both replicas are empty
    assert router.route(call([1] * 20, "thread", "agent"), views) == home  # the next one
    assert router.placed(home)[1] == 1 + (router.home("other", "x", views) == home)
    router.forget_run("thread")
    router.forget_run("other")
    assert [router.placed(i) for i in range(2)] == [(0, 0), (0, 0)]
def test_a_runs_first_call_takes_it_to_the_replica_that_holds_its_prompts_prefix():
    router = affinity(2)
    shared = list(range(100, 164))  # four blocks: a graph's system prompt
    router.plan_run("a", ["solo"], [IDLE] * 2)
    assert router.route(call(shared + [1] * 16, "a", "solo"), [IDLE] * 2) == 0
    router.forget_run("a")  # done: its replica is empty, its prefix still cached there
    # Replica 0 is busy when "b" starts: placed on 1. At its first call, before any KV of it
    # exists, the run (all its agents) goes where its prompt's prefix is.
    router.plan_run("b", ["solo", "helper"], [busy(queued=3), IDLE])
    assert router.home("b", "helper", [IDLE] * 2) == 1
    assert router.route(call(shared + [2] * 16, "b", "solo"), [IDLE] * 2) == 0
    assert router.home("b", "helper", [IDLE] * 2) == 0
    assert router.placed(0) == (1, 2) and router.placed(1) == (0, 0)


def routed(router: AffinityRouter, request: GenerateRequest, views: list[ReplicaView]) -> int:
    """As the ReplicaSet does: route, then the call starts there and ends."""
    replica = router.route(request, views)
    router.started(request, replica)
    router.finished(request, replica)
    return replica


def test_an_agent_stays_put_when_its_prefix_is_nowhere_or_its_first_call_is_past():
    router = affinity(2)
    router.plan_run("a", ["solo"], [IDLE] * 2)
    assert routed(router, call(list(range(64)), "a", "solo"), [IDLE] * 2) == 0
    router.forget_run("a")
    router.plan_run("b", ["solo"], [busy(queued=3), IDLE])
    assert routed(router, call(list(range(500, 564)), "b", "solo"), [IDLE] * 2) == 1  # no match
    # Its second call matches replica 0's prefix, but its KV is where it is now.
    assert routed(router, call(list(range(64)), "b", "solo"), [IDLE] * 2) == 1


def test_an_agent_at_its_first_call_goes_where_its_prompts_prefix_is():
    router = affinity(2)
    own = [list(range(100 * k, 100 * k + 64)) for k in range(2)]  # two agents' system prompts
    agents = ["first", "second", "third", "fourth"]
    router.plan_run("a", agents, [IDLE] * 2)  # all on 0
    router.plan_run("b", agents, [IDLE] * 2)  # all on 1
    assert routed(router, call(own[0], "a", "first"), [IDLE] * 2) == 0
    assert routed(router, call(own[1], "b", "second"), [IDLE] * 2) == 1
    # The runs have started: each agent's first call follows its own prefix, within balance.
    assert routed(router, call(own[1], "a", "second"), [IDLE] * 2) == 1
    assert routed(router, call(own[0], "b", "first"), [IDLE] * 2) == 0
    assert router.home("a", "second", [IDLE] * 2) == 1
    assert [router.placed(i)[1] for i in range(2)] == [4, 4]
    # A fifth agent on 0 stays within the slack (1.25x the mean of 4), a sixth would not.
    assert routed(router, call(own[0], "b", "third"), [IDLE] * 2) == 0
    assert routed(router, call(own[0], "b", "fourth"), [IDLE] * 2) == 1


def test_a_run_does_not_follow_its_prefix_onto_a_replica_it_would_overload_its_caller_does():
    router = affinity(2)
    shared = list(range(100, 164))
    router.plan_run("a", [f"w{i}" for i in range(8)], [IDLE] * 2)
    assert router.route(call(shared, "a", "w0"), [IDLE] * 2) == 0  # 8 agents live on 0
    router.plan_run("b", [f"w{i}" for i in range(8)], [IDLE] * 2)  # 8 on 1
    # All 8 on 0 would leave 16 there and none on 1. The caller alone keeps 9 and 7, within
    # the slack (1.25x the mean of 8): it goes, and its run mates stay where they are.
    assert router.route(call(shared, "b", "w0"), [IDLE] * 2) == 0
    assert router.home("b", "w1", [IDLE] * 2) == 1
    assert router.placed(0) == (2, 9) and router.placed(1) == (1, 7)
    # w1's own first call follows the same prefix (10 and 6: still within the slack); w2's
    # would leave 5 on 1, below 0.75x the mean: it stays.
    assert router.route(call(shared, "b", "w1"), [IDLE] * 2) == 0
    assert router.route(call(shared, "b", "w2"), [IDLE] * 2) == 1


def test_runs_following_a_prefix_every_run_shares_leave_no_replica_below_the_slack():
    """The first replica to compute a prefix every run shares (a graph's system prompt) would
    draw every run whose first call comes while it has room; the replicas that have not yet
    computed it keep at least (1 - SLACK) of the mean load, and compute it once."""
    router = affinity(4)
    shared = list(range(100, 164))
    runs = [f"r{k}" for k in range(16)]
    for run in runs:  # four runs of two agents on each replica
        router.plan_run(run, ["planner", "worker"], [IDLE] * 4)
    assert [router.placed(i)[1] for i in range(4)] == [8, 8, 8, 8]
    for run in runs:
        routed(router, call(shared + [len(run)] * 16, run, "planner"), [IDLE] * 4)
    loads = [router.placed(i)[1] for i in range(4)]
    assert sum(loads) == 32 and min(loads) >= 6 and max(loads) <= 10, loads


@pytest.mark.parametrize(("in_flight", "goes_to"), [(8, 0), (9, 1)])
def test_a_run_follows_its_prefix_only_to_a_replica_within_the_imbalance_in_calls(
        in_flight: int, goes_to: int):
    """Placed agents are not all busy (a DAG's agents wait for their predecessors): the
    replica holding the prefix must also be within IMBALANCE (8) calls in flight of the least
    busy, as the prefix router's rule."""
    router = affinity(2)
    shared = list(range(100, 164))
    router.plan_run("a", ["solo"], [IDLE] * 2)
    assert routed(router, call(shared + [1] * 16, "a", "solo"), [IDLE] * 2) == 0
    router.forget_run("a")
    router.plan_run("b", ["solo", "helper"], [busy(queued=3), IDLE])  # placed on 1
    views = [busy(in_flight=in_flight), IDLE]  # calls without a run, say
    assert routed(router, call(shared + [2] * 16, "b", "solo"), views) == goes_to
