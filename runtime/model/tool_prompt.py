"""Tools in a chat prompt, for chat templates that know nothing of them.

A template written for tool calling (Qwen2.5, Hermes, Llama 3.1) takes `tools=[...]` and renders
assistant `tool_calls` and `tool` messages itself; the tokenizer hands them over as they are.
Any other template (SmolLM2, the tiny test models) sees only roles and text, so kvrt rewrites
the conversation into plain turns in the Hermes format, which the `hermes` tool parser reads:

    system     the system message's text (if any), the tool_choice instruction, then a
               "# Tools" block: each function as one JSON line inside <tools></tools>, and
               the form of a call
    assistant  its text, then each call on its own lines:
               <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
    tool       a user turn, one per result: <tool_response>\\n{its text}\\n</tool_response>

One turn per tool result (Qwen2.5 merges a run of them into one) keeps each prefix of the
conversation rendering as a prefix of the whole, which segment spans rely on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.ext import loopcontrols

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"


@dataclass(slots=True)
class PromptTools:
    """The tools a chat offers, as its prompt shows them. `specs` are OpenAI tool objects
    (`{"type": "function", "function": {"name", "description", "parameters"}}`); `instruction`
    is what tool_choice asks of the model beyond "use them if you like" (a prompt can ask,
    not force)."""

    specs: list[dict[str, Any]]
    instruction: str | None = None


@lru_cache(maxsize=16)
def template_uses_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable (and so renders tools, tool calls and
    tool results its own way). Templates with tags of transformers' own (`{% generation %}`)
    do not parse in plain Jinja; for those the word decides."""
    try:
        parsed = jinja2.Environment(extensions=[loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError:
        return re.search(r"\btools\b", template) is not None
    return "tools" in meta.find_undeclared_variables(parsed)


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`messages` with `text` appended to the leading system message, or in one put first."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        joined = "\n\n".join(part for part in (first.get("content") or "", text) if part)
        return [{**first, "content": joined}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def plain_turns(messages: list[dict[str, Any]], tools: PromptTools | None) -> list[dict[str, Any]]:
    """The conversation as role + text turns in the Hermes format (see the module docstring).
    Messages without tool calls pass through untouched, so a chat without tools renders exactly
    as the template alone renders it."""
    turns = [_plain_turn(m) for m in messages]
    if tools is None:
        return turns
    return with_system_text(turns, _system_block(tools))


def call_text(name: str, arguments: Any) -> str:
    """One call as the model is asked to write it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def _plain_turn(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        text = f"{TOOL_RESPONSE_START}\n{message.get('content') or ''}\n{TOOL_RESPONSE_END}"
        return {"role": "user", "content": text}
    calls = message.get("tool_calls")
    if not calls:
        return message
    pieces = [message.get("content") or ""]
    pieces += [call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    return {"role": message["role"], "content": "\n".join(p for p in pieces if p)}


def _system_block(tools: PromptTools) -> str:
    signatures = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in tools.specs)
    example = call_text("<function-name>", "<arguments-json-object>").replace(
        '"<arguments-json-object>"', "<arguments-json-object>")
    return "\n\n".join(part for part in (
        tools.instruction,
        "# Tools",
        "You can call the functions below to help with the user's request. Their signatures, "
        "one JSON object a line, are inside <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>",
        "To call a function, reply with a JSON object holding its name and arguments inside "
        f"{TOOL_CALL_START}{TOOL_CALL_END} tags, one pair of tags per call:\n{example}\n"
        f"The result comes back in a user turn inside {TOOL_RESPONSE_START}"
        f"{TOOL_RESPONSE_END} tags.",
    ) if part)
