"""One typed configuration for the daemon and its engine, validated when built."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "torch", "triton")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A configuration value is out of range or malformed."""


def parse_size(text: str | int) -> int:
    """'512MiB', '2G', '1.5GB', '1048576' -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1073741824)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "kmgt".find(unit) * 1024) if unit else int(number)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # local checkpoint folder or GGUF file; None = default SmolLM2
    device: str = "auto"
    dtype: str = "auto"  # auto = float32 on CPU (exactness), bfloat16 on CUDA
    kv_cache_memory: int = 512 * 1024**2  # bytes of the device KV pool
    host_cache_memory: int = 0  # bytes of the host tier KV is offloaded to; 0: no host tier
    block_size: int = 16
    max_model_len: int | None = None  # None = the model's own context length
    max_num_seqs: int = 32  # sequences in the running batch
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    prefix_caching: bool = True  # off: every prompt is computed in full (for comparisons)
    policy: str = "lru"
    kernels: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _choose("device", self.device, DEVICES)
        _choose("dtype", self.dtype, DTYPES)
        _choose("kernels", self.kernels, KERNELS)
        for name in ("kv_cache_memory", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.host_cache_memory < 0:
            raise ConfigError(f"host_cache_memory cannot be negative, got {self.host_cache_memory}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The control plane's cost model and limits. An agent's expected work in seconds is its
    expected output tokens times `seconds_per_output_token` plus its tools' expected seconds."""

    seconds_per_output_token: float = 0.02  # a decode step of a small model on one GPU
    default_output_tokens: int = 256  # for agents that do not declare expected_output_tokens
    max_live_runs: int = 4096

    def __post_init__(self) -> None:
        if self.seconds_per_output_token < 0 or self.default_output_tokens < 0:
            raise ConfigError("the control plane's cost model takes no negative values")
        if self.max_live_runs < 1:
            raise ConfigError(f"max_live_runs must be positive, got {self.max_live_runs}")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8400
    log_level: str = "info"
    served_model_name: str | None = None  # None = derived from the checkpoint
    # How replies are read for tool calls (runtime/server/tool_parsers.py, by name).
    tool_call_parser: str = "hermes"
    engine: EngineConfig = field(default_factory=EngineConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")


def _choose(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
