"""The engine's logprobs (TokenLogprobs) in OpenAI's two wire shapes: chat's list of token
entries, each with its top alternatives, and the legacy completions' parallel lists.

A token is named by its own decoded text (special tokens spelled out), and `bytes` are that
text in UTF-8; a token that is only part of a character decodes to U+FFFD, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvrt.runtime.engine.protocol import TokenLogprobs
from kvrt.sdk.protocol.openai_api import (
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    TopLogprob,
)

if TYPE_CHECKING:
    from kvrt.runtime.model.tokenizer import Tokenizer

# A token the model (or a mask) rules out has logprob -inf, which JSON cannot spell: OpenAI and
# vLLM send -9999.0 instead.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _FLOOR)


class TokenNames:
    """Each token id's text, decoded once per id and kept (a request's tokens repeat)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._names: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self._tokenizer.decode(
                [token_id], skip_special_tokens=False)
        return name


def chat_logprobs(entries: Sequence[TokenLogprobs], names: TokenNames) -> ChoiceLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        name = names(token_id)
        return TopLogprob(token=name, logprob=_finite(logprob), bytes=list(name.encode()))

    content = []
    for entry in entries:
        name = names(entry.token_id)
        content.append(ChatTokenLogprob(
            token=name, logprob=_finite(entry.logprob), bytes=list(name.encode()),
            top_logprobs=[top(t, lp) for t, lp in entry.top]))
    return ChoiceLogprobs(content=content)


def completion_logprobs(entries: Sequence[TokenLogprobs], names: TokenNames, offset: int
                        ) -> tuple[CompletionLogprobs, int]:
    """The legacy shape for `entries`, whose first token starts at `offset` in the choice's
    text; returns it and the offset after the last token. The top dict holds the sampled
    token too, as OpenAI's does (k + 1 entries when it is not among the k best). Tokens that
    decode to the same text (parts of one character: U+FFFD) share a key, which keeps the
    likelier's logprob."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        name = names(entry.token_id)
        tokens.append(name)
        token_logprobs.append(_finite(entry.logprob))
        top: dict[str, float] = {}
        for token_id, logprob in [*entry.top, (entry.token_id, entry.logprob)]:
            top.setdefault(names(token_id), _finite(logprob))  # one name: the likelier
        tops.append(top)
        offsets.append(offset)
        offset += len(name)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=tops,
                              text_offset=offsets), offset
