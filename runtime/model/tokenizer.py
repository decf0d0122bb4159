"""Text <-> token ids for one checkpoint: encoding, the chat template, streaming decode."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvrt.runtime.model.tool_prompt import (
    PromptTools,
    plain_turns,
    template_uses_tools,
    with_system_text,
)

if TYPE_CHECKING:  # transformers takes ~1.5 s to import; only loading a tokenizer needs it
    from transformers import PreTrainedTokenizerBase

CHATML_END = "<|im_end|>"
_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Tokenizer:
    """A transformers fast tokenizer plus what serving needs to know about it.

    `eos_token_ids` is every id that ends a generation: the ids the checkpoint's config and
    generation_config name (what transformers' `generate` stops on), the tokenizer's own eos,
    and `<|im_end|>` for ChatML templates, whose assistant turns end with it whatever the config
    says (Qwen2.5 base models name only `<|endoftext|>`).
    """

    __slots__ = ("bos_token_id", "eos_token_ids", "hf", "max_token_chars", "vocab_size")

    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        self.vocab_size: int = len(hf)
        # The longest token as the vocabulary spells it (a byte-level BPE: one character per
        # byte), an upper bound on the characters of text one token covers: so a text of N
        # characters needs at least N / max_token_chars tokens, known without tokenizing it.
        self.max_token_chars: int = max((len(t) for t in hf.get_vocab()), default=1)
        self.bos_token_id: int | None = hf.bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids) | _own_eos_ids(hf)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, eos_token_ids: Iterable[int] = (), *, as_saved: bool = False
    ) -> Tokenizer:
        """Loads the folder's tokenizer as transformers' AutoTokenizer does, which for some model
        types rebuilds the pipeline (Qwen2 swaps in its own pre-tokenizer regex) so that kvrt
        tokenizes exactly as transformers does. `as_saved` loads tokenizer.json as written, for
        folders kvrt saved itself (the GGUF cache): AutoTokenizer would build the model's config
        class first, ~2 s of imports on the first call."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        loader = PreTrainedTokenizerFast if as_saved else AutoTokenizer
        return cls(loader.from_pretrained(str(folder)), eos_token_ids)

    @property
    def chat_template(self) -> str | None:
        template = self.hf.chat_template
        return template if isinstance(template, str) else None

    def encode(self, text: str) -> list[int]:
        """Ids for a raw prompt, special tokens added as the tokenizer does by default (a BOS
        for Llama 3, nothing for ChatML models), as an OpenAI /v1/completions server does."""
        return list(self.hf.encode(text))

    def encode_piece(self, text: str) -> list[int]:
        """Ids for a piece of templated text (special tokens spelt in it, none added)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """`encode_piece` of each text, in one call to the Rust tokenizer: each call through
        transformers costs ~50 us of Python on top."""
        encodings = self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: PromptTools | None = None,
    ) -> str:
        """The prompt text of `messages` (OpenAI-style dicts: assistant `tool_calls` with
        arguments as objects, `tool` messages). A template that reads `tools` gets the tools and
        the messages as they are, tool_choice's instruction added to the system message; any
        other template gets them rewritten by `tool_prompt.plain_turns`."""
        template = self.chat_template
        if template is None:
            raise ValueError("this checkpoint's tokenizer has no chat template; use completions")
        if not template_uses_tools(template):
            return self.hf.apply_chat_template(
                plain_turns(messages, tools), tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        if tools is not None and tools.instruction:
            messages = with_system_text(messages, tools.instruction)
        return self.hf.apply_chat_template(
            messages, tools=tools.specs if tools is not None else None, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: PromptTools | None = None
    ) -> list[int]:
        # The template writes any BOS itself; adding special tokens again would double it.
        text = self.render_chat(messages, tools=tools)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(lambda ids: self.decode(ids, skip_special_tokens))


def _own_eos_ids(hf: PreTrainedTokenizerBase) -> frozenset[int]:
    ids = set()
    if hf.eos_token_id is not None:
        ids.add(hf.eos_token_id)
    template = hf.chat_template if isinstance(hf.chat_template, str) else ""
    if CHATML_END in template:
        im_end = hf.convert_tokens_to_ids(CHATML_END)
        if isinstance(im_end, int) and im_end != hf.unk_token_id:
            ids.add(im_end)
    return frozenset(ids)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that concatenate to `decode(all ids)`.

    Byte-level BPE splits a multi-byte character (emoji, CJK) over several tokens, and some
    decoders treat a sequence's first token specially (SentencePiece drops its leading space),
    so a token cannot be decoded alone. As vLLM does, each push decodes only a short window
    that starts at the last point where the text was complete:

        ids:   ... | prefix_offset ........ read_offset ....... end
        text:        already emitted        |  new text (emitted once it is complete)

    Text is held back while it ends in U+FFFD (a character still missing bytes). Cost per token
    is a decode of a few ids, never of the whole output.
    """

    __slots__ = ("_decode", "_ids", "_prefix_offset", "_prefix_text", "_read_offset")

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (often "", never a partial char)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever is held back (a trailing incomplete character decodes as U+FFFD,
        exactly as `decode` of all ids shows it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        new_text = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return new_text
