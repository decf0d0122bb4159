"""Measures the real engine's step times over a grid of batches, for the calibration.

Requests go through the engine's public API (`add` / `step` / `abort`); each step's parts are
read from the chunks the engine ran (a wrapper around its executor), its time is the wall time
of `engine.step()`: scheduling and sampling included, as the simulator charges them.

    grid point                 how
    -------------------------  -----------------------------------------------------------
    prefill of n tokens        a fresh prompt, computed in one step
    decode of B at context C   B prompts sharing a cached C-token prefix plus a token of their
                               own (no long prefill per sequence), then their decode steps
    chunk after a prefix       a cached prefix plus n fresh tokens, in one step
    mixed                      B decoding sequences plus a fresh prefill in the same step

Other work on the machine ruins the figures (on a 2-core machine another torch process
oversubscribes the cores and slows steps 10-30x), so before each attempt the driver waits for
the CPU to go quiet, marks steps during which other processes ran (/proc on Linux) as
disturbed, and keeps the fastest undisturbed of a point's repeats.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.protocol import GenerateRequest, SamplingParams
from kvrt.runtime.sim.cost_model import StepPart
from kvrt.runtime.sim.executor import step_parts


@dataclass(frozen=True, slots=True)
class Grid:
    """The steps a calibration measures. Contexts must be multiples of the block size (their
    prompts are found whole in the prefix cache)."""

    prefills: tuple[int, ...] = (16, 64, 256, 512, 1024, 2048)
    decode_contexts: tuple[int, ...] = (32, 512, 2048)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_steps: int = 4  # measured decode steps per (context, batch); the fastest counts
    chunks: tuple[tuple[int, int], ...] = ((1024, 256), (1792, 256), (1536, 512))  # cached, new
    mixed: tuple[tuple[int, int, int], ...] = ((8, 512, 64), (8, 512, 256), (16, 32, 512))
    # mixed: (decoding sequences, their context, tokens of the prefill beside them)


DEFAULT_GRID = Grid()


@dataclass(frozen=True, slots=True)
class Sample:
    parts: tuple[StepPart, ...]
    seconds: float
    disturbed: bool = False  # other processes used the CPU during the step


class StepRecorder:
    """Wraps the engine's executor to note each step's parts."""

    def __init__(self, inner) -> None:
        self.inner, self.vocab_size = inner, inner.vocab_size
        self.parts: tuple[StepPart, ...] = ()

    def run(self, chunks):
        self.parts = tuple(step_parts(chunks))
        return self.inner.run(chunks)


class _Driver:
    """Runs requests through the engine's public API and times its steps.

    A step during which other processes used the CPU (read from /proc on Linux) is marked
    disturbed. Each grid point takes the fastest of `repeats` undisturbed steps; before each
    attempt the driver waits for the machine to go quiet (at most `wait_budget` seconds over
    the whole run) and gives up on a point after `max_attempts`."""

    def __init__(
        self, engine: Engine, repeats: int, max_attempts: int, wait_budget: float, seed: int = 0
    ) -> None:
        self.engine = engine
        self.recorder = StepRecorder(engine.executor)
        engine.executor = self.recorder  # type: ignore[assignment]
        self.repeats, self.max_attempts, self.wait_budget = repeats, max_attempts, wait_budget
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab = engine.vocab_size
        self.live: list[str] = []

    def tokens(self, count: int) -> list[int]:
        return torch.randint(3, self.vocab, (count,), generator=self.gen).tolist()

    def add(self, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request_id = f"cal-{uuid.uuid4().hex}"
        self.engine.add(GenerateRequest(request_id, prompt, params))
        self.live.append(request_id)

    def step(self) -> Sample:
        others = _others_cpu_seconds()
        start = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - start
        disturbed = False
        if others is not None:
            after = _others_cpu_seconds()
            disturbed = after is not None and after - others > max(0.03, 0.1 * seconds)
        return Sample(self.recorder.parts, seconds, disturbed)

    def prefill(self, prompt: list[int]) -> Sample:
        """One request computed in one step (the budget allows), alone."""
        self.add(prompt, 1)
        sample = self.step()
        self.clear()
        return sample

    def clear(self) -> None:
        for request_id in self.live:
            self.engine.abort(request_id)
        self.live.clear()
        assert not self.engine.has_work()

    def sample(self, attempt: Callable[[], Sample]) -> Sample:
        """The fastest undisturbed of `repeats` attempts (or of all, when none was quiet)."""
        quiet: list[Sample] = []
        tried: list[Sample] = []
        while len(quiet) < self.repeats and len(tried) < self.max_attempts:
            self.wait_for_quiet()
            sample = attempt()
            tried.append(sample)
            if not sample.disturbed:
                quiet.append(sample)
        # Other work only ever adds time: the fastest repeat is the least disturbed.
        return min(quiet or tried, key=lambda s: s.seconds)

    def wait_for_quiet(self, window: float = 0.25) -> None:
        while self.wait_budget > 0:
            before = _others_cpu_seconds()
            time.sleep(window)
            after = _others_cpu_seconds()
            if before is None or after is None or after - before < 0.1 * window:
                return
            self.wait_budget -= window


def measure(
    engine: Engine,
    grid: Grid = DEFAULT_GRID,
    repeats: int = 2,
    progress: Callable[[str], None] = print,
    max_attempts: int = 8,
    wait_budget: float = 600.0,
) -> list[Sample]:
    """Runs the grid on `engine` (prefix caching on, a token budget and a sequence limit that
    fit the grid's largest step); returns one Sample per grid point, in grid order."""
    d = _Driver(engine, repeats, max_attempts, wait_budget)
    d.prefill(d.tokens(64))  # warm-up: first-call allocations are not the model's cost
    samples: list[Sample] = []
    for n in grid.prefills:
        samples.append(d.sample(lambda n=n: d.prefill(d.tokens(n))))
    progress(f"prefills done ({len(samples)} samples)")
    shared = d.tokens(max(grid.decode_contexts + tuple(c + n for c, n in grid.chunks)))
    d.prefill(shared)  # caches the shared prompt: every context below is a prefix of it
    steps = max_attempts + 2  # enough output for every attempt; aborted after
    for context, batch in itertools.product(grid.decode_contexts, grid.decode_batches):
        for _ in range(batch):  # each: the cached prefix plus one token of its own
            d.add(shared[:context] + d.tokens(1), steps)
        d.step()  # admission: one new token per sequence after the cached prefix
        samples.append(d.sample(d.step))
        d.clear()
    progress(f"decodes done ({len(samples)} samples)")
    for cached, new in grid.chunks:
        prefix = shared[:cached]
        samples.append(d.sample(lambda p=prefix, n=new: d.prefill(p + d.tokens(n))))
    for decoders, context, new in grid.mixed:
        for _ in range(decoders):
            d.add(shared[:context] + d.tokens(1), steps)
        d.step()

        def mixed(n: int = new) -> Sample:  # the decoders plus a prefill that finishes at once
            d.add(d.tokens(n), 1)
            return d.step()

        samples.append(d.sample(mixed))
        d.clear()
    disturbed = sum(s.disturbed for s in samples)
    progress(f"prefill chunks and mixed steps done ({len(samples)} samples, {disturbed} disturbed)")
    return samples


def _others_cpu_seconds() -> float | None:
    """CPU seconds used by every process but this one since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    busy = user + nice + system + irq + softirq + steal
    mine = sum(int(x) for x in own[11:15])  # utime, stime, cutime, cstime
    return (busy - mine) / os.sysconf("SC_CLK_TCK")
