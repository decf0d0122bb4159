"""A tiny, randomly initialised Hugging Face checkpoint for tests and examples.

The files are written by transformers' own classes (`LlamaForCausalLM` & co, `save_pretrained`
with safetensors), so whatever loads them is exercised on genuine HF-format files, and the model
can be run by transformers as the reference for our own forward pass.

Weights use a large init std (0.3 instead of 0.02) so that the logits of a greedy step are spread
out: top-1 and top-2 differ by a clear margin, and two implementations that agree up to float
rounding pick the same token at every step instead of breaking near-ties differently. Norm weights
and biases, which transformers initialises to ones and zeros, are randomised too: a swapped norm
or a dropped bias must change the output, or no test could notice it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
INIT_STD = 0.3
VOCAB_SIZE = 512
MAX_POSITION = 2048

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer: plain English with the words chat prompts use, so that common
# words become single tokens and the tokenizer behaves like a real (if small) byte-level BPE.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still answer a question when
the question is simple. You are a helpful assistant. The user asks and the assistant answers.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus
two is four. Please write a short story about a robot who learns to paint. Once upon a time
there was a robot that lived in a quiet town near the sea. Every morning it walked to the
harbour and watched the boats. One day it found a brush and a box of colours, and it began to
paint the water, the sky and the people who worked there. The agents share their notes with
each other, and each agent reads what the others wrote before it writes its own answer. A
planner agent splits the task into steps; a researcher agent looks things up with a tool; a
writer agent turns the findings into a report. When a tool call takes a long time, the agent
waits, and its memory can be moved somewhere cheaper until the result comes back.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _.
Code: def add(a, b): return a + b. for i in range(10): print(i). if x > 0 and y < 1: pass.
"""


def init_tiny(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Writes a tiny HF checkpoint for `arch` into `out_dir` and returns the folder.

    llama: tied embeddings; qwen2: untied, q/k/v bias; qwen3: untied, per-head q/k norms.
    All share hidden 64, 3 layers, 4 heads over 2 KV heads (GQA), head_dim 16. Same arguments,
    same bytes.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(out)
    _write_model(out, arch, seed, vocab_size)
    return out


def _write_tokenizer(out: Path) -> int:
    """tokenizer.json plus a tokenizer_config.json carrying the chat template, as most HF repos
    ship them (transformers 5's save_pretrained would put the template in chat_template.jinja
    and name a tokenizer class older transformers do not know)."""
    tokenizer = _train_bpe()
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)


def _train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so any text (emoji, CJK) encodes, one byte per token
        # at worst: multi-byte characters then span several tokens, as in real checkpoints.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def _model_config(arch: str, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": MAX_POSITION,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "initializer_range": INIT_STD,
        "bos_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    }
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    return Qwen3Config(**common, tie_word_embeddings=False)


def _write_model(out: Path, arch: str, seed: int, vocab_size: int) -> None:
    from transformers import (
        GenerationConfig,
        LlamaForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
    )

    config = _model_config(arch, vocab_size)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(config)
    _randomise_norms_and_biases(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    with _quiet_progress():
        model.save_pretrained(out, safe_serialization=True)


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(INIT_STD * torch.randn(param.shape, generator=gen))


@contextmanager
def _quiet_progress() -> Iterator[None]:
    # save_pretrained draws a progress bar per shard; tests and examples want clean output.
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
