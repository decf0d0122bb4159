"""Times the real engine's steps while the daemon serves, for the calibration's second stage.

`kvrt bench` runs the engine on its own thread beside the daemon and the SDK client, on the
same cores and under one GIL. Each token a sequence emits costs the event loop work
(detokenizing, an SSE chunk, the client reading it), and that work slows the engine's steps:
on a 2-core machine a decode step of 8 sequences took 1.7x its time alone. `measure.py`'s grid
runs the engine alone, so it cannot see this; here small seeded workloads (not the ones the
README compares against) run through the same daemon and SDK as `kvrt bench`, and every
engine step is timed where it runs, with the parts the engine scheduled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from kvrt.runtime.bench.main import UNBOUNDED
from kvrt.runtime.bench.runner import real_engine, run_policy
from kvrt.runtime.bench.workloads import make_workload
from kvrt.runtime.config import EngineConfig, ServeConfig
from kvrt.runtime.engine.async_engine import AsyncEngine
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.sim.measure import Sample, StepRecorder

ServedWorkload = tuple[str, dict]  # a workload's name and parameters

# Batches of 1 to ~12 sequences, prefills and chunks of 100-600 tokens; tools kept short.
SERVING_WORKLOADS: tuple[ServedWorkload, ...] = (
    ("generative-agents", {"agents": 6, "rounds": 2, "persona_words": 150,
                           "min_output_tokens": 16, "max_output_tokens": 48, "seed": 101}),
    ("tool-agents", {"runs": 3, "min_workers": 2, "max_workers": 3, "turns": 1,
                     "system_words": 150, "tool_median_s": 0.3, "tool_p95_s": 1.0,
                     "min_output_tokens": 16, "max_output_tokens": 48, "seed": 102}),
    ("map-reduce", {"agents": 6, "document_words": 400, "min_output_tokens": 16,
                    "max_output_tokens": 48, "seed": 103}),
)


def record_steps(engine: Engine, out: list[Sample]) -> None:
    """Wraps `engine.step` so that each step that ran a forward appends its parts and time."""
    recorder = StepRecorder(engine.executor)
    engine.executor = recorder  # type: ignore[assignment]
    step = engine.step

    def timed():
        recorder.parts = ()
        start = time.perf_counter()
        emitted = step()
        if recorder.parts:
            out.append(Sample(recorder.parts, time.perf_counter() - start))
        return emitted

    engine.step = timed  # type: ignore[method-assign]


def measure_serving(config: EngineConfig,
                    workloads: Sequence[ServedWorkload] = SERVING_WORKLOADS,
                    progress: Callable[[str], None] = print) -> list[Sample]:
    """Every engine step of `workloads`, each played under `lru` on its own event loop (so
    not from a coroutine)."""
    samples: list[Sample] = []

    def make(engine_config: EngineConfig) -> tuple[AsyncEngine, int]:
        engine, block_bytes = real_engine(engine_config)
        record_steps(engine.engine, samples)
        return engine, block_bytes

    serve = ServeConfig(served_model_name="calibration", engine=config, limits=UNBOUNDED)
    for name, params in workloads:
        asyncio.run(run_policy(make_workload(name, **params), serve, 1.0, make))
        progress(f"served {name} ({len(samples)} steps so far)")
    return samples
