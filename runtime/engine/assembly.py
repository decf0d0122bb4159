"""One engine assembly, shared by the real engine (factory.py) and the simulated one
(runtime/sim/engine.py): they differ only in the executor, the KV's row operations and the
host tier's mover, which they pass in."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvrt.runtime.config import ConfigError, EngineConfig
from kvrt.runtime.engine.decision_log import DecisionLog
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.executor import Executor
from kvrt.runtime.engine.sampler import Sampler
from kvrt.runtime.engine.scheduler import BatchScheduler
from kvrt.runtime.kv.manager import HostSpec, KVManager
from kvrt.runtime.kv.reuse.planner import ReusePlanner
from kvrt.runtime.kv.rows import KVRows
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.policy.base import Policy


def context_length(config: EngineConfig, model_context: int) -> int:
    """`--max-model-len`, or the model's own context; never past the model's."""
    max_model_len = config.max_model_len or model_context
    if max_model_len > model_context:
        raise ConfigError(
            f"--max-model-len {max_model_len} exceeds the model's context of "
            f"{model_context} tokens"
        )
    return max_model_len


def assemble_engine(
    config: EngineConfig,
    policy: Policy,
    executor: Executor,
    tokenizer: Tokenizer,
    *,
    num_blocks: int,
    max_model_len: int,
    host: HostSpec | None,
    rows: KVRows | None,
    clock: Callable[[], float],
    sampler_device: torch.device | None = None,
) -> Engine:
    """`policy`: `config.policy` built (make_policy), early, so a bad option fails before the
    model loads. `rows`: the KV tensor's (None: a simulation)."""
    kv = KVManager(num_blocks, config.block_size, config.prefix_caching, host, rows)
    reuse = ReusePlanner(kv, policy.reuse, rows)
    decisions = DecisionLog(clock)  # the policy's, wherever the engine carries them out
    scheduler = BatchScheduler(kv, policy, reuse, config.max_num_seqs,
                               config.max_num_batched_tokens, decisions)
    sampler = Sampler(config.seed, sampler_device or torch.device("cpu"))
    return Engine(executor, kv, scheduler, policy, reuse, sampler, tokenizer, max_model_len,
                  clock, decisions)
