"""Builds an engine from an `EngineConfig`: device, dtype, checkpoint, kernels, KV pool."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvrt.kernels import Kernels, select_kernels
from kvrt.runtime.config import ConfigError, EngineConfig
from kvrt.runtime.engine.assembly import assemble_engine, context_length
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.executor import ModelExecutor
from kvrt.runtime.kv.manager import HostSpec
from kvrt.runtime.kv.tiers.mover import BlockMover
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
    policy = make_policy(config.policy, config.policy_options)
    kernels = select_kernels(config.kernels, device)
    started = time.monotonic()
    checkpoint = checkpoint or load_checkpoint(config.model, dtype)
    model_cfg = checkpoint.config
    max_model_len = context_length(config, model_cfg.max_position)
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
    executor = ModelExecutor(model, kv_pool)
    engine = assemble_engine(
        config, policy, executor, checkpoint.tokenizer,
        num_blocks=num_blocks, max_model_len=max_model_len,
        host=_host_tier(kv_pool, config.host_cache_memory // block_bytes, kernels),
        rows=executor,
        clock=clock, sampler_device=device,
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


def _host_tier(kv_pool: torch.Tensor, host_blocks: int, kernels: Kernels) -> HostSpec | None:
    """The host tier's KV tensor and its mover. The tensor is plain CPU memory: the mover copies
    through its own pinned staging buffers (so only those, not the whole tier, are pinned), and
    hands the kernels the device pool only."""
    if not host_blocks:
        return None
    host_kv = torch.zeros((host_blocks, *kv_pool.shape[1:]), dtype=kv_pool.dtype)
    return HostSpec(host_blocks, BlockMover(kv_pool, host_kv, kernels.pack_blocks,
                                            kernels.unpack_blocks))
