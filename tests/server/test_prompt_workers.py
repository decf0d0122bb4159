"""PromptWorkers: jobs run on the pool's threads, each with its own tokenizer copy, and
`close` lets go of every copy (the app that holds the workers may outlive its serving)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from pathlib import Path

from kvrt.runtime.model.checkpoint import load_checkpoint
from kvrt.runtime.server.prompt_workers import PromptWorkers, ThreadModel


class Model:
    """What PromptWorkers reads of the served model (openai_requests.ServedModel)."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = load_checkpoint(str(folder)).tokenizer
        self.model_name = "tiny"
        self.max_model_len = 64


def test_a_job_runs_off_the_loop_with_its_threads_copy_and_close_frees_them(
        tiny_checkpoint_dir) -> None:
    model = Model(tiny_checkpoint_dir())
    hf_type = type(model.tokenizer.hf)

    def live_copies() -> int:
        gc.collect()
        return sum(type(o) is hf_type for o in gc.get_objects()) - 1  # less the model's

    assert live_copies() == 0
    workers = PromptWorkers(model, threads=3)  # type: ignore[arg-type]
    assert live_copies() == 3
    copies = []

    def build(seen: ThreadModel) -> tuple[str, list[int]]:
        copies.append(weakref.ref(seen.tokenizer.hf))
        return threading.current_thread().name, seen.tokenizer.encode("hello world")

    async def one_job() -> tuple[str, list[int]]:
        return await workers.run(build)

    name, ids = asyncio.run(one_job())
    assert name.startswith("kvrt-prompt") and ids == model.tokenizer.encode("hello world")
    assert copies[0]() is not model.tokenizer.hf
    workers.close()  # one thread started, two copies never taken
    assert live_copies() == 0 and copies[0]() is None
