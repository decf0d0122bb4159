"""The ReplicaSet over two in-process engines (tiny model), driven directly: the priorities of
agents the router moves before their first call follow them to their new replica."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.protocol import Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.replicas.replica_set import ReplicaSet
from kvrt.runtime.replicas.router import AffinityRouter


class Told(AsyncEngine):
    """A real engine that also keeps the priorities it was sent."""

    told: list[tuple[str, dict[str, float]]]

    def set_priorities(self, run: str, priorities: Mapping[str, float]) -> None:
        self.told.append((run, dict(priorities)))
        super().set_priorities(run, priorities)


def two_replicas(checkpoint: str, step_tokens: int = 512) -> tuple[ReplicaSet, list[Told]]:
    config = EngineConfig(model=checkpoint, kv_cache_memory=4 * 1024**2, max_model_len=256)
    members = []
    for _ in range(2):
        engine = AsyncEngine.create(config, "tiny")
        told = Told(engine.engine, "tiny")
        told.told = []
        members.append(told)
    replicas = ReplicaSet(members, AffinityRouter(2, step_tokens=step_tokens), model_name="tiny",
                          max_model_len=members[0].max_model_len,
                          tokenizer=members[0].tokenizer, vocab_size=members[0].vocab_size)
    return replicas, members


def play(replicas: ReplicaSet, members: list[Told],
         scenario: Callable[[], Awaitable[None]]) -> None:
    """Runs `scenario` on the started set, releases runs a, b and c, and checks every replica
    holds no KV after."""
    async def main() -> None:
        await replicas.start()
        try:
            await scenario()
            for run in "abc":
                await replicas.release_run(run)
        finally:
            await replicas.stop()

    asyncio.run(main())
    for member in members:
        member.engine.check_integrity()
        assert member.stats().kv_blocks_in_use == 0


def test_agents_moved_to_where_their_prompt_is_take_their_priorities_along(tiny_checkpoint_dir):
    replicas, members = two_replicas(str(tiny_checkpoint_dir()))
    system = list(range(5, 69))  # four blocks every run's agent starts with

    async def call(run: str, agent: str) -> None:
        request = GenerateRequest(f"{run}-{agent}", system + [1, 2, 3],
                                  SamplingParams(max_tokens=2, temperature=0),
                                  attribution=Attribution(run, agent))
        async for _ in replicas.generate(request):
            pass

    async def scenario() -> None:
        replicas.set_priorities("a", {"x": 1.0})  # placed on replica 0
        replicas.set_priorities("b", {"y": 2.0})  # on replica 1 (the less loaded)
        await call("b", "y")  # replica 1 now holds the system prompt
        replicas.set_priorities("c", {"z": 3.0})  # placed on 0, sent there
        assert ("c", {"z": 3.0}) in members[0].told
        await call("c", "z")  # moves to replica 1, where its prompt's prefix is
        assert replicas.replica_of("c") == ["0", "1"]
        assert ("c", {"z": 3.0}) in members[1].told

    play(replicas, members, scenario)


def test_a_call_past_its_first_output_is_no_wait_that_moves_an_agent(tiny_checkpoint_dir):
    """The router hears of each call's first output from the set: a long call decoding on an
    agent's home is not prefill queued ahead of the agent's next call, which stays home."""
    # Steps of 16 tokens: a 160-token prompt waiting would be ten steps ahead of it.
    replicas, members = two_replicas(str(tiny_checkpoint_dir()), step_tokens=16)

    def request(run: str, agent: str, prompt: list[int], tokens: int) -> GenerateRequest:
        return GenerateRequest(f"{run}-{agent}-{tokens}", prompt,
                               SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                               attribution=Attribution(run, agent))

    async def scenario() -> None:
        replicas.set_priorities("a", {"x": 1.0})  # on replica 0
        replicas.set_priorities("c", {"w": 1.0})  # on 1
        replicas.set_priorities("b", {"y": 1.0})  # on 0 again: the loads are even
        context = list(range(300, 364))  # the tiny vocabulary has 512 tokens
        async for _ in replicas.generate(request("a", "x", context, 1)):
            pass
        # y's 160-token prompt, fresh, on x's replica: far more than x's context.
        long = replicas.generate(request("b", "y", list(range(100, 260)), 60))
        await anext(long)  # its prefill is done: it decodes
        async for _ in replicas.generate(request("a", "x", context + [7] * 16, 1)):
            pass
        assert replicas.replica_of("a") == ["0"] and replicas.replica_of("b") == ["0"]
        await long.aclose()

    play(replicas, members, scenario)
