"""The real Engine, scheduler, KV manager, sampler and policy over a simulated executor.

The KV pool exists only as block ids (the `KVManager`'s bookkeeping); no tensor of KV size is
allocated, so a 7B model's tens of GB of KV cost nothing here. Its size:

    kv bytes = config.kv_cache_memory, when the user set it (it differs from EngineConfig's
               default, the CPU daemon's 512 MiB, which means nothing on a simulated GPU);
               else device memory * (1 - KV_RESERVE) - weight bytes
    blocks   = kv bytes // (block_size * kv bytes per token)

KV_RESERVE (10%) stands for activations, the CUDA context and allocator slack: vLLM's
`gpu_memory_utilization` defaults to 0.9 for the same reason. Weights and KV take the device's
dtype (bf16 on the GPUs). The pool is capped at MAX_BLOCKS (16M tokens of 16-token blocks):
a small model on an 80 GB device would otherwise get millions of blocks of bookkeeping that no
workload fills.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from kvrt.runtime.config import ConfigError, EngineConfig
from kvrt.runtime.engine.assembly import assemble_engine, context_length
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.kv.manager import HostSpec
from kvrt.runtime.model.config import ModelConfig
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.policy import make_policy
from kvrt.runtime.sim.cost_model import CostModel
from kvrt.runtime.sim.executor import SimClock, SimExecutor
from kvrt.runtime.sim.hardware import Device
from kvrt.runtime.sim.link import SimLink
from kvrt.runtime.sim.model_shapes import kv_bytes_per_token, weight_bytes
from kvrt.runtime.sim.words import word_token_ids

KV_RESERVE = 0.10
MAX_BLOCKS = 1 << 20
LOGIT_WIDTH = 8192  # sampled ids come from the vocabulary's first 8192: see executor.py
_DEFAULT_KV_MEMORY = next(
    f.default for f in dataclasses.fields(EngineConfig) if f.name == "kv_cache_memory"
)


def kv_cache_bytes(shape: ModelConfig, device: Device, config: EngineConfig) -> int:
    if config.kv_cache_memory != _DEFAULT_KV_MEMORY:
        return config.kv_cache_memory
    budget = int(device.memory_bytes * (1 - KV_RESERVE)) - weight_bytes(shape, device.dtype_bytes)
    if budget <= 0:
        raise ConfigError(
            f"the model's weights ({weight_bytes(shape, device.dtype_bytes) / 1e9:.1f} GB) leave "
            f"no room for KV in {device.name}'s {device.memory_bytes / 1e9:.1f} GB"
        )
    return budget


def sim_block_bytes(shape: ModelConfig, device: Device, config: EngineConfig) -> int:
    return config.block_size * kv_bytes_per_token(shape, device.dtype_bytes)


def sim_kv_blocks(shape: ModelConfig, device: Device, config: EngineConfig) -> int:
    block_bytes = sim_block_bytes(shape, device, config)
    blocks = kv_cache_bytes(shape, device, config) // block_bytes
    if blocks < 1:
        raise ConfigError(f"the KV budget holds no block of {block_bytes} bytes")
    return min(blocks, MAX_BLOCKS)


class SimEngine(NamedTuple):
    """The engine, with its executor and its host link (None without a host tier), which a
    driver on simulated time steps by (runtime/sim/driver.py)."""

    engine: Engine
    executor: SimExecutor
    link: SimLink | None


def build_sim_engine(
    shape: ModelConfig,
    device: Device,
    config: EngineConfig,
    tokenizer: Tokenizer,
    clock: SimClock,
    advance_clock: bool = True,
) -> SimEngine:
    """`config.model`, `device`, `dtype` and `kernels` are ignored: the shape and the device
    stand for them. Simulated outputs are drawn from the word tokens (words.py) among the
    tokenizer's first LOGIT_WIDTH ids, never its EOS ids, so an output's length is its request's
    max_tokens and its text, quoted, re-tokenizes to its ids. The executor is also the KV's row
    operations, priced (see SimExecutor). The Engine reads `clock`; each step advances it unless
    `advance_clock` is False (see SimExecutor)."""
    policy = make_policy(config.policy, config.policy_options)
    max_model_len = context_length(config, shape.max_position)
    block_bytes = sim_block_bytes(shape, device, config)
    host_blocks = min(config.host_cache_memory // block_bytes, MAX_BLOCKS)
    cost_model = CostModel(shape, device)
    link = SimLink(cost_model, block_bytes) if host_blocks else None  # over the host link
    executor = SimExecutor(
        cost_model,
        clock if advance_clock else None,
        tokenizer.vocab_size,
        word_token_ids(tokenizer, LOGIT_WIDTH),
        seed=config.seed,
        logit_width=min(LOGIT_WIDTH, tokenizer.vocab_size),
    )
    engine = assemble_engine(
        config, policy, executor, tokenizer,
        num_blocks=sim_kv_blocks(shape, device, config), max_model_len=max_model_len,
        host=None if link is None else HostSpec(host_blocks, link),
        rows=executor, clock=clock.now,
    )
    return SimEngine(engine, executor, link)
