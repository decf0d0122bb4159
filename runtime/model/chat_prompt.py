"""A chat's prompt ids and the token spans of its messages, built in one pass.

A message's piece is its text as the chat template renders it: role header and end of turn
included, the generation prompt in no message's piece. By definition (the reference):

    piece(i) = render(messages[:i+1]) minus render(messages[:i])      render([]) = ""

each piece tokenized on its own. The spans are those of the marked messages' pieces; there are
none when a render is not a prefix of the next one (a template that rewrites earlier turns), a
render fails, or the pieces' ids are not the prompt's first ids (tokens merged across turns).

Rendering every prefix costs O(messages^2). A chat longer than `PREFIX_RENDERS_UP_TO` messages
is rendered by neighbours instead: each message alone, and after the one before it,

    piece(i) = render(messages[i-1:i+1]) minus render(messages[i-1:i])  piece(0) = render([m0])

which is the definition with the prefix cut to one message; the pieces must then concatenate,
character for character, to the render of the whole chat. That holds, and gives the reference's
pieces, when a turn's rendering depends on itself, its neighbours and whether it is first or last
(ChatML, SmolLM2's default system prompt, Llama 3's BOS and trimming, Qwen2.5's tool turns).
A template can read any turn from any other, and no method with fewer renders than one per
prefix can be exact for all of them; so templates whose way of doing so neighbours cannot see
(state carried across turns in a `namespace`, the list read backwards or searched, as Qwen3's
last-query logic does) are rendered per prefix, as is any chat whose checks fail, unless the
reference's own check fails at the message where they did (two renders). Each render holds
the tools block, if the chat offers tools.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any

from jinja2 import TemplateError

from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.model.tool_prompt import PromptTools

# Up to here, rendering every prefix is cheaper than rendering 2n - 1 windows: a render's fixed
# cost is that of ~4 messages (measured on SmolLM2's template: ~25 us + ~6 us a message).
PREFIX_RENDERS_UP_TO = 16

# How a template reads turns that are not a message's neighbours: state kept across loop
# iterations (Jinja scopes a plain `set` to one iteration), or the list reversed or searched.
_READS_FAR_TURNS = re.compile(
    r"namespace\s*\(|\[\s*::\s*-1\s*\]|\breverse\b|\b(?:selectattr|rejectattr)\b")

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    token_ids: list[int]  # the templated prompt, generation prompt included
    segments: tuple[Span, ...]  # token spans [start, end) of the marked messages' pieces


def render_prompt(tokenizer: Tokenizer, turns: list[dict[str, Any]], marked: Sequence[bool],
                  tools: PromptTools | None = None) -> ChatPrompt:
    """`turns` as `Tokenizer.render_chat` takes them; `marked[i]`: message i is a segment.
    Raises what rendering the whole chat raises (ValueError without a template, TemplateError
    for turns the template refuses)."""
    text = tokenizer.render_chat(turns, tools=tools)
    pieces = message_pieces(tokenizer, turns, tools) if any(marked) else None
    # The prompt is tokenized as a piece (its template writes any BOS), with the pieces.
    token_ids, *piece_ids = tokenizer.encode_pieces([text, *(pieces or ())])
    return ChatPrompt(token_ids, () if pieces is None else
                      segment_spans(piece_ids, marked, token_ids))


def message_pieces(tokenizer: Tokenizer, turns: list[dict[str, Any]],
                   tools: PromptTools | None = None) -> list[str] | None:
    """Each message's piece (see the module docstring), or None where they do not add up."""
    if len(turns) > PREFIX_RENDERS_UP_TO and not reads_far_turns(tokenizer.chat_template or ""):
        pieces, broken = _by_neighbours(tokenizer, turns, tools)
        if pieces is not None:
            return pieces
        # Where a message does not extend its neighbour, the reference's own check there
        # (two renders) often settles it: a run of tool results that is one turn (Qwen2.5).
        if broken is not None and not _prefix_extends(tokenizer, turns, broken, tools):
            return None
    return pieces_by_prefix(tokenizer, turns, tools)


def pieces_by_prefix(tokenizer: Tokenizer, turns: list[dict[str, Any]],
                     tools: PromptTools | None = None) -> list[str] | None:
    """The reference: one render per prefix, O(messages^2)."""
    pieces, before = [], ""
    for end in range(1, len(turns) + 1):
        rendered = _render(tokenizer, turns[:end], tools)
        if rendered is None or not rendered.startswith(before):
            return None
        pieces.append(rendered[len(before):])
        before = rendered
    return pieces


def pieces_by_neighbours(tokenizer: Tokenizer, turns: list[dict[str, Any]],
                         tools: PromptTools | None = None) -> list[str] | None:
    """2n renders of one or two messages and one of the whole chat; None where a check fails
    (then only the reference can say)."""
    return _by_neighbours(tokenizer, turns, tools)[0]


def segment_spans(piece_ids: list[list[int]], marked: Sequence[bool],
                  token_ids: list[int]) -> tuple[Span, ...]:
    """The spans of the marked pieces, laid end to end; () unless the pieces' ids are the first
    of `token_ids` (the prompt's)."""
    spans, start = [], 0
    for ids, is_segment in zip(piece_ids, marked, strict=True):
        if is_segment:
            spans.append((start, start + len(ids)))
        start += len(ids)
    return tuple(spans) if token_ids[:start] == list(chain.from_iterable(piece_ids)) else ()


@lru_cache(maxsize=16)
def reads_far_turns(template: str) -> bool:
    """Whether a template may render a turn by what lies beyond its neighbours, in a way that
    renders of one or two messages cannot show (see _READS_FAR_TURNS)."""
    return _READS_FAR_TURNS.search(template) is not None


def _by_neighbours(tokenizer: Tokenizer, turns: list[dict[str, Any]],
                   tools: PromptTools | None) -> tuple[list[str] | None, int | None]:
    """The pieces, or None and the message that did not extend its neighbour (None if the
    checks failed elsewhere)."""
    alone = [_render(tokenizer, [turn], tools) for turn in turns]
    if alone[0] is None:
        return None, None
    pieces = [alone[0]]
    for i in range(1, len(turns)):
        before, pair = alone[i - 1], _render(tokenizer, turns[i - 1:i + 1], tools)
        if before is None or pair is None:
            return None, None
        if not pair.startswith(before):
            return None, i
        pieces.append(pair[len(before):])
    whole = _render(tokenizer, turns, tools)
    return (pieces if whole is not None and "".join(pieces) == whole else None), None


def _prefix_extends(tokenizer: Tokenizer, turns: list[dict[str, Any]], i: int,
                    tools: PromptTools | None) -> bool:
    """The reference's check at message i > 0: the chat through it renders as the chat
    before it, then more."""
    before = _render(tokenizer, turns[:i], tools)
    rendered = _render(tokenizer, turns[:i + 1], tools)
    return before is not None and rendered is not None and rendered.startswith(before)


def _render(tokenizer: Tokenizer, turns: list[dict[str, Any]],
            tools: PromptTools | None) -> str | None:
    try:
        return tokenizer.render_chat(turns, add_generation_prompt=False, tools=tools)
    except TemplateError:  # a template may refuse a part of a chat it takes whole
        return None
