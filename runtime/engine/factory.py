"""Builds an engine from an `EngineConfig`: device, dtype, checkpoint, kernels, KV pool."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvrt.kernels import Kernels, select_kernels
from kvrt.runtime.config import ConfigError, EngineConfig
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.executor import Executor
from kvrt.runtime.engine.sampler import Sampler
from kvrt.runtime.engine.scheduler import BatchScheduler
from kvrt.runtime.engine.tier_moves import TierMoves
from kvrt.runtime.kv.manager import KVManager
from kvrt.runtime.kv.mover import BlockMover
from kvrt.runtime.model.checkpoint import Checkpoint, load_checkpoint
from kvrt.runtime.model.llama import LlamaModel
from kvrt.runtime.policy import make_policy

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":  # exactness on CPU; speed on GPU
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[choice]


def build_engine(
    config: EngineConfig,
    clock: Callable[[], float] = time.monotonic,
    checkpoint: Checkpoint | None = None,
) -> tuple[Engine, Checkpoint]:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    policy = make_policy(config.policy)
    kernels = select_kernels(config.kernels, device)
    started = time.monotonic()
    checkpoint = checkpoint or load_checkpoint(config.model, dtype)
    model_cfg = checkpoint.config
    max_model_len = config.max_model_len or model_cfg.max_position
    if max_model_len > model_cfg.max_position:
        raise ConfigError(
            f"--max-model-len {max_model_len} exceeds the model's context of "
            f"{model_cfg.max_position} tokens"
        )
    model = LlamaModel(model_cfg, checkpoint.weights, kernels, device, dtype, max_model_len)
    checkpoint.weights = {}  # the model holds its own (fused) copies now
    block_bytes = config.block_size * model_cfg.kv_bytes_per_token * dtype.itemsize
    num_blocks = config.kv_cache_memory // block_bytes
    if num_blocks < 1:
        raise ConfigError(
            f"--kv-cache-memory {config.kv_cache_memory} bytes holds no KV block "
            f"(one block is {block_bytes} bytes)"
        )
    kv_pool = torch.zeros(
        (
            num_blocks,
            model_cfg.num_layers,
            2,
            config.block_size,
            model_cfg.num_kv_heads,
            model_cfg.head_dim,
        ),
        dtype=dtype,
        device=device,
    )
    host_blocks = config.host_cache_memory // block_bytes
    kv = KVManager(num_blocks, config.block_size, config.prefix_caching, host_blocks)
    scheduler = BatchScheduler(kv, policy, config.max_num_seqs, config.max_num_batched_tokens)
    executor = Executor(model, kv_pool)
    kv.move_rows = executor.move_rows
    scheduler.collector.row_change = executor.row_change
    if kernels.name == "torch":
        # Shifted rows read in place would be rotated at every decode step on this path: a
        # reader copies them once instead (the Triton kernel rotates them in registers).
        kv.copy_rows = executor.copy_rows
    engine = Engine(
        executor,
        kv,
        scheduler,
        Sampler(config.seed, device),
        checkpoint.tokenizer,
        max_model_len,
        clock,
        _tier_moves(kv, kv_pool, host_blocks, kernels),
    )
    log.info(
        "engine ready in %.1fs: %s on %s/%s, %d KV blocks of %d tokens (%d tokens), kernels %s",
        time.monotonic() - started,
        checkpoint.name,
        device,
        str(dtype).removeprefix("torch."),
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        kernels.name,
    )
    return engine, checkpoint


def _tier_moves(kv: KVManager, kv_pool: torch.Tensor, host_blocks: int, kernels: Kernels
                ) -> TierMoves | None:
    """The host tier's KV tensor (pinned on CUDA, for asynchronous copies) and its mover."""
    if kv.tiers is None:
        return None
    host_kv = torch.zeros((host_blocks, *kv_pool.shape[1:]), dtype=kv_pool.dtype,
                          pin_memory=kv_pool.is_cuda)
    return TierMoves(kv.tiers, BlockMover(kv_pool, host_kv, kernels.pack_blocks,
                                          kernels.unpack_blocks))
