"""Model shapes for the simulator, written in code (no weights), and what follows from a shape.

The shapes are the published Hugging Face `config.json` files of the instruct checkpoints
(Qwen/Qwen2.5-7B-Instruct, meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen2.5-14B-Instruct), and the
default model's (SmolLM2-135M-Instruct, as kvrt's GGUF conversion writes it) for calibration.
Parameter counts and KV bytes are derived from the shape, never typed in.
"""

from __future__ import annotations

from kvrt.runtime.model.config import ModelConfig, RopeConfig

QWEN25_7B = ModelConfig(
    arch="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    max_position=32768,
    rms_eps=1e-6,
    rope=RopeConfig(theta=1e6),
    tie_embeddings=False,
    attention_bias=True,
    eos_token_ids=(151645, 151643),
    bos_token_id=151643,
)

LLAMA31_8B = ModelConfig(
    arch="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position=131072,
    rms_eps=1e-5,
    rope=RopeConfig(
        theta=500000.0,
        kind="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position=8192,
    ),
    tie_embeddings=False,
    eos_token_ids=(128001, 128008, 128009),
    bos_token_id=128000,
)

QWEN25_14B = ModelConfig(
    arch="qwen2",
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=13824,
    num_layers=48,
    num_heads=40,
    num_kv_heads=8,
    head_dim=128,
    max_position=32768,
    rms_eps=1e-5,
    rope=RopeConfig(theta=1e6),
    tie_embeddings=False,
    attention_bias=True,
    eos_token_ids=(151645, 151643),
    bos_token_id=151643,
)

SMOLLM2_135M = ModelConfig(
    arch="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position=8192,
    rms_eps=1e-5,
    rope=RopeConfig(theta=100000.0),
    tie_embeddings=True,
    eos_token_ids=(2,),
    bos_token_id=1,
)

_SHAPES = {
    "qwen2.5-7b": QWEN25_7B,
    "llama-3.1-8b": LLAMA31_8B,
    "qwen2.5-14b": QWEN25_14B,
    "smollm2-135m": SMOLLM2_135M,
}


def shape_names() -> list[str]:
    return list(_SHAPES)


def get_shape(name: str) -> ModelConfig:
    key = name.lower()
    if key not in _SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {', '.join(_SHAPES)}")
    return _SHAPES[key]


def layer_parameters(shape: ModelConfig) -> int:
    """Every parameter of the decoder layers (projections, biases, norms), all layers."""
    hidden, head_dim = shape.hidden_size, shape.head_dim
    q_out, kv_out = shape.num_heads * head_dim, shape.num_kv_heads * head_dim
    attention = hidden * (q_out + 2 * kv_out) + q_out * hidden
    if shape.attention_bias:
        attention += q_out + 2 * kv_out
    if shape.qk_norm:
        attention += 2 * head_dim
    mlp = 3 * hidden * shape.intermediate_size
    norms = 2 * hidden
    return shape.num_layers * (attention + mlp + norms)


def lm_head_parameters(shape: ModelConfig) -> int:
    return shape.vocab_size * shape.hidden_size


def parameter_count(shape: ModelConfig) -> int:
    """All parameters: embeddings, layers, final norm, and the LM head unless tied."""
    embeddings = shape.vocab_size * shape.hidden_size
    head = 0 if shape.tie_embeddings else lm_head_parameters(shape)
    return embeddings + layer_parameters(shape) + shape.hidden_size + head


def weight_bytes(shape: ModelConfig, dtype_bytes: int = 2) -> int:
    return parameter_count(shape) * dtype_bytes


def kv_bytes_per_token(shape: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V of one token over all layers (`ModelConfig.kv_bytes_per_token` is per byte of
    element size)."""
    return shape.kv_bytes_per_token * dtype_bytes
