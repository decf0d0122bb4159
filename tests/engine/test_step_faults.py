"""A step that raises (the executor failing) fails only the requests that fail when run alone:
they are aborted with StepFailed, their KV freed; their batch-mates get their tokens from the
same step, and the engine serves the others and the next ones with the output a clean engine
gives. A fault that passes fails nobody."""

from __future__ import annotations

import asyncio

import pytest

from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.protocol import StepFailed
from tests.engine.helpers import greedy, make_engine, request, run

PROMPT_A = [5 + i % 40 for i in range(40)]
PROMPT_B = [7 + i % 30 for i in range(24)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return tiny_checkpoint_dir()


def break_next_run(engine: Engine) -> None:
    """The executor's next forward raises; the ones after it work again."""
    real = engine.executor.run

    def broken(chunks):
        engine.executor.run = real
        raise RuntimeError("device fault")

    engine.executor.run = broken


def test_a_failed_step_aborts_its_batch_and_spares_the_waiting(tiny) -> None:
    reference = run(make_engine(tiny), [request("b", PROMPT_B, greedy(6))])["b"]
    engine = make_engine(tiny, max_num_seqs=1)
    engine.add(request("a", PROMPT_A, greedy(6)))
    engine.add(request("b", PROMPT_B, greedy(6)))
    break_next_run(engine)
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert failed.value.request_ids == ["a"]
    assert "RuntimeError: device fault" in str(failed.value)
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert list(engine.live_attributions()) == ["b"]  # a is gone, b waits untouched
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()
    tokens = []
    while engine.has_work():
        tokens += [t for request_id, out in engine.step() for t in out.token_ids
                   if request_id == "b"]
    assert tokens == reference.token_ids
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()
    engine.close()


def test_a_failed_decode_step_frees_the_blocks_it_held(tiny) -> None:
    engine = make_engine(tiny)
    engine.add(request("a", PROMPT_A, greedy(20)))
    engine.step()  # the prefill: a holds its blocks now
    assert engine.kv.usage().in_use > 0
    break_next_run(engine)
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert failed.value.request_ids == ["a"] and not engine.has_work()
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()
    engine.close()


def test_the_async_engine_fails_the_batch_and_goes_on_serving(tiny) -> None:
    engine = make_engine(tiny)
    reference = run(make_engine(tiny), [request("r", PROMPT_B, greedy(6))])["r"]

    async def scenario():
        served = AsyncEngine(engine, "tiny")
        await served.start()
        try:
            break_next_run(engine)
            with pytest.raises(StepFailed, match="device fault"):
                async for _ in served.generate(request("a", PROMPT_A, greedy(6))):
                    pass
            assert served.is_alive()
            tokens = [t async for out in served.generate(request("b", PROMPT_B, greedy(6)))
                      for t in out.token_ids]
            await served.wait_idle()
            return tokens, served.load()
        finally:
            await served.stop()

    tokens, load = asyncio.run(scenario())
    assert tokens == reference.token_ids
    assert (load.queued_requests, load.queued_tokens, load.in_flight) == (0, 0, 0)
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()


PROMPT_C = [9 + i % 17 for i in range(33)]


def fail_when_running(engine: Engine, request_id: str) -> None:
    """Every forward whose batch holds `request_id` raises (a fault tied to its data)."""
    real = engine.executor.run

    def run_unless(chunks):
        if any(chunk.seq.request_id == request_id for chunk in chunks):
            raise RuntimeError(f"kernel fault on {request_id}'s data")
        return real(chunks)

    engine.executor.run = run_unless


def test_a_request_that_fails_alone_fails_alone_and_its_batch_mates_go_on(tiny) -> None:
    reference = run(make_engine(tiny), [request("a", PROMPT_A, greedy(6)),
                                        request("c", PROMPT_C, greedy(6))])
    engine = make_engine(tiny)
    for request_id, prompt in (("a", PROMPT_A), ("b", PROMPT_B), ("c", PROMPT_C)):
        engine.add(request(request_id, prompt, greedy(6)))
    fail_when_running(engine, "b")
    with pytest.raises(StepFailed) as failed:
        engine.step()  # the three prefills in one batch
    assert failed.value.request_ids == ["b"] and "kernel fault on b" in str(failed.value)
    first = {request_id: out.token_ids for request_id, out in failed.value.emitted}
    assert first == {"a": reference["a"].token_ids[:1], "c": reference["c"].token_ids[:1]}
    tokens = {request_id: list(ids) for request_id, ids in first.items()}
    while engine.has_work():
        for request_id, out in engine.step():
            tokens[request_id] += out.token_ids
    assert tokens == {"a": reference["a"].token_ids, "c": reference["c"].token_ids}
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()
    engine.close()


def test_a_passing_fault_in_a_batch_fails_nobody(tiny) -> None:
    reference = run(make_engine(tiny), [request("a", PROMPT_A, greedy(6)),
                                        request("b", PROMPT_B, greedy(6))])
    engine = make_engine(tiny)
    for request_id, prompt in (("a", PROMPT_A), ("b", PROMPT_B)):
        engine.add(request(request_id, prompt, greedy(6)))
    break_next_run(engine)  # the batch's forward fails once; each alone then runs
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    while engine.has_work():
        for request_id, out in engine.step():  # no StepFailed
            tokens[request_id] += out.token_ids
    assert tokens == {"a": reference["a"].token_ids, "b": reference["b"].token_ids}
    assert engine.kv.usage().in_use == 0
    engine.check_integrity()
    engine.close()
