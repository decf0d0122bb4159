"""Reading tool calls out of a model's reply: parsers registered by name.

A parser reads a reply through `stream()`, which takes it in the pieces it is generated in;
`parse(text)` is that stream given the whole reply at once. For every way of cutting a text into
pieces, the stream's text events join to `parse(text).content` and its calls equal
`parse(text).calls`. Neither ever raises on what a model writes: text that is not a well-formed
call stays content.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from kvrt.runtime.model.tool_prompt import TOOL_CALL_END, TOOL_CALL_START


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


@dataclass(slots=True)
class ParsedReply:
    content: str  # the text outside the calls; "" when there is none
    calls: list[ParsedCall] = field(default_factory=list)


StreamEvent = str | ParsedCall  # a piece of content, or one whole call


@dataclass(frozen=True, slots=True)
class CallForm:
    """A parser's calls as llguidance Lark rules: `opening` (the text that begins a call) and,
    per tool, the grammar of what follows it (`bodies`). `lark(start)` is a whole grammar whose
    `start` rule may use `call` (one call, opening included) and `opened call_body` (free text
    up to and including the first opening, then the rest of a call)."""

    opening: str
    bodies: list[str]

    def lark(self, start: str) -> str:
        options = " | ".join(f"body_{i}" for i in range(len(self.bodies)))
        rules = "\n".join(f"body_{i}: {body}" for i, body in enumerate(self.bodies))
        opening = json.dumps(self.opening)
        return (f"%llguidance {{}}\n{start}\ncall: {opening} call_body\n"
                f"call_body: {options}\n{rules}\n"
                # Lazy: the text ends at the first opening, which a call must then follow.
                f"opened[lazy]: /(.|\\n)*/ {opening}\n"
                # Text that holds no opening: a call begun is never left as text.
                f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_regex_literal(self.opening)}(.|\\n)*/\n")

    @staticmethod
    def free_text_start(one: bool) -> str:
        """Text with calls in it, each completed once begun; with `one`, the reply ends with
        its call."""
        return ("start: TEXT | opened call_body" if one
                else "start: TEXT | (opened call_body)+ TEXT")


def _regex_literal(text: str) -> str:
    """`text` as a regex matching itself, inside a Lark /.../."""
    return "".join(f"\\{c}" if c in _REGEX_META else c for c in text)


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


class ToolCallStream(ABC):
    """One reply, read piece by piece. Text is held back while it may still turn out to be
    part of a call; `finish` gives back whatever is held."""

    @abstractmethod
    def push(self, text: str) -> list[StreamEvent]: ...

    @abstractmethod
    def finish(self) -> list[StreamEvent]: ...


class ToolParser(ABC):
    name = ""

    @abstractmethod
    def stream(self) -> ToolCallStream: ...

    @abstractmethod
    def call_form(self, tools: list[tuple[str, dict[str, Any]]]) -> CallForm:
        """How this parser's calls are written, as grammar rules for constrained decoding
        (runtime/server/grammars.py), given each tool's name and parameters schema. What the
        rules generate, this parser reads back as that tool's call."""

    def parse(self, text: str) -> ParsedReply:
        """A whole reply: the stream's reading of it in one piece, so the two always agree."""
        stream = self.stream()
        events = stream.push(text) + stream.finish()
        return ParsedReply("".join(e for e in events if isinstance(e, str)),
                           [e for e in events if isinstance(e, ParsedCall)])


_REGISTRY: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str):
    def add(cls: type[ToolParser]) -> type[ToolParser]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def tool_parser_names() -> list[str]:
    return sorted(_REGISTRY)


def make_tool_parser(name: str) -> ToolParser:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown tool parser {name!r}; available: {', '.join(tool_parser_names())}")
    return _REGISTRY[name]()


# ---- hermes --------------------------------------------------------------------------------


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen2.5, Hermes 2/3 and
    kvrt's own fallback prompt (`tool_prompt`) ask for. The rules:

    - a call runs from `<tool_call>` to the next `</tool_call>`, or to the end of the reply
      when the model stopped before closing it;
    - it counts when its body is a JSON object with a non-empty string `name` and an object
      `arguments` (absent: `{}`; a string holding a JSON object is taken too); otherwise the
      tags and the body stay content, verbatim;
    - whitespace next to a call (a model writes `\\n<tool_call>\\n...\\n</tool_call>\\n`) is
      not content; a reply without calls is content exactly as generated.
    """

    def stream(self) -> ToolCallStream:
        return HermesStream()

    def call_form(self, tools: list[tuple[str, dict[str, Any]]]) -> CallForm:
        # As tool_prompt.call_text writes a call (json.dumps' separators), its name fixed.
        def body(name: str, schema: dict[str, Any]) -> str:
            head = f'\n{{"name": {json.dumps(name)}, "arguments": '
            tail = f"}}\n{TOOL_CALL_END}"
            return (f"{json.dumps(head)} %json {json.dumps(schema, ensure_ascii=False)} "
                    f"{json.dumps(tail)}")

        return CallForm(TOOL_CALL_START, [body(name, schema) for name, schema in tools])


class HermesStream(ToolCallStream):
    """`HermesToolParser`'s rules, piece by piece:

        outside a call:  [emitted content][held: trailing whitespace + a possible partial tag]
        inside a call:   [held: whitespace before the tag] <tool_call> [body, up to the end tag]

    Trailing whitespace is held because a call may follow (then it is dropped), and a tail that
    could begin `<tool_call>` because it may be one: half a tag never goes out as content.
    """

    def __init__(self) -> None:
        self._pending = ""  # text not yet decided on
        self._inside = False
        self._before_call = ""  # whitespace before the open call's tag: content if it fails
        self._after_call = False  # just closed a call: leading whitespace is dropped

    def push(self, text: str) -> list[StreamEvent]:
        self._pending += text
        events: list[StreamEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[StreamEvent]:
        events = self.push("")
        if self._inside:  # a call the model never closed
            self._close_call(self._pending, "", events)
        elif self._pending:
            events.append(self._pending)
        self._pending = ""
        return events

    def _step(self, events: list[StreamEvent]) -> bool:
        """Decides what it can of the pending text; True when another step may decide more."""
        if self._inside:
            end = self._pending.find(TOOL_CALL_END)
            if end < 0:
                return False
            body, self._pending = self._pending[:end], self._pending[end + len(TOOL_CALL_END):]
            self._close_call(body, TOOL_CALL_END, events)
            return True
        if self._after_call:
            self._pending = self._pending.lstrip()
            if not self._pending:
                return False
            self._after_call = False
        start = self._pending.find(TOOL_CALL_START)
        if start >= 0:
            before = self._pending[:start]
            kept = before.rstrip()
            _emit(events, kept)
            self._before_call = before[len(kept):]
            self._pending = self._pending[start + len(TOOL_CALL_START):]
            self._inside = True
            return True
        held = _partial_tag_length(self._pending)
        kept = self._pending[: len(self._pending) - held].rstrip()
        _emit(events, kept)
        self._pending = self._pending[len(kept):]
        return False

    def _close_call(self, body: str, end_tag: str, events: list[StreamEvent]) -> None:
        call = read_call(body)
        if call is None:
            _emit(events, self._before_call + TOOL_CALL_START + body + end_tag)
        else:
            events.append(call)
            self._after_call = True
        self._before_call = ""
        self._inside = False


def read_call(body: str) -> ParsedCall | None:
    """The call a tag pair holds, or None when its body is not a well-formed call."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name, arguments = obj.get("name"), obj.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json_object(arguments)
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _partial_tag_length(text: str) -> int:
    """The length of the longest tail of `text` that is a proper beginning of the start tag."""
    for n in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


def _emit(events: list[StreamEvent], text: str) -> None:
    if not text:
        return
    last = events[-1] if events else None
    if isinstance(last, str):
        events[-1] = last + text
    else:
        events.append(text)
