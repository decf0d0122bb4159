"""Running an engine synchronously to completion, for tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.engine.protocol import GenerateOutput, GenerateRequest, SamplingParams


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    outputs: list[GenerateOutput] = field(default_factory=list)

    @property
    def final(self) -> GenerateOutput:
        return self.outputs[-1]


def make_engine(model: Path | str | None, **overrides) -> Engine:
    settings = {"kv_cache_memory": 8 * 1024**2, **overrides}
    return build_engine(EngineConfig(model=None if model is None else str(model), **settings))[0]


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


def run(
    engine: Engine, requests: list[GenerateRequest], max_steps: int = 10_000
) -> dict[str, Result]:
    results = {r.request_id: Result() for r in requests}
    for request in requests:
        engine.add(request)
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for request_id, output in engine.step():
            result = results[request_id]
            result.outputs.append(output)
            result.token_ids.extend(output.token_ids)
            result.text += output.text
        if engine.waits_on_moves():  # as a driver does: sleep until a copy lands, not spin
            landed = threading.Event()
            engine.on_next_landing(landed.set)
            landed.wait(5)
    assert not engine.has_work(), "the engine did not finish in time"
    engine.check_integrity()
    return results


def request(request_id: str, prompt: list[int], params: SamplingParams, salt: bytes = b""):
    return GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params, salt=salt)
