"""Tool parsers: the hermes parser on whole replies (expected results written out by hand), and
the same replies streamed in every possible cut, which must read exactly as the whole."""

from __future__ import annotations

import json
import random

import pytest

from kvrt.runtime.model.tool_prompt import call_text
from kvrt.runtime.server.tool_parsers import (
    HermesToolParser,
    ParsedCall,
    ParsedReply,
    make_tool_parser,
    tool_parser_names,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {}}'


def call(name: str, **arguments) -> ParsedCall:
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


# (id, reply, expected content, expected calls)
CASES = [
    ("no-call", "Paris is sunny today.\n", "Paris is sunny today.\n", []),
    ("empty", "", "", []),
    ("only-whitespace", " \n ", " \n ", []),
    ("qwen-style", f"\n<tool_call>\n{WEATHER}\n</tool_call>", "",
     [call("get_weather", city="Paris")]),
    ("text-then-call", f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n", "Let me look.",
     [call("get_weather", city="Paris")]),
    ("two-calls", f"<tool_call>{WEATHER}</tool_call>\n\n<tool_call>\n{TIME}\n</tool_call>", "",
     [call("get_weather", city="Paris"), call("get_time")]),
    ("text-around-and-between",
     f"A <tool_call>{WEATHER}</tool_call> B <tool_call>{TIME}</tool_call>  C  ",
     "ABC  ", [call("get_weather", city="Paris"), call("get_time")]),
    ("malformed-json", '<tool_call>{"name": "get_weather", "arguments": {</tool_call> ok',
     '<tool_call>{"name": "get_weather", "arguments": {</tool_call> ok', []),
    ("not-a-call-object", '<tool_call>["get_weather"]</tool_call>',
     '<tool_call>["get_weather"]</tool_call>', []),
    ("no-name", '<tool_call>{"arguments": {}}</tool_call>',
     '<tool_call>{"arguments": {}}</tool_call>', []),
    ("empty-name", '<tool_call>{"name": "", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "", "arguments": {}}</tool_call>', []),
    ("arguments-not-object", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("malformed-keeps-its-whitespace-then-good-call",
     f"x \n<tool_call>oops</tool_call> \n<tool_call>{TIME}</tool_call>",
     "x \n<tool_call>oops</tool_call>", [call("get_time")]),
    ("arguments-as-json-text", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
     "", [call("f", a=1)]),
    ("no-arguments", '<tool_call>{"name": "f"}</tool_call>', "", [call("f")]),
    ("unicode-arguments", '<tool_call>{"name": "f", "arguments": {"city": "Zürich 東京"}}'
     "</tool_call>", "", [call("f", city="Zürich 東京")]),
    ("unclosed-call-at-the-end", f"Sure.\n<tool_call>\n{WEATHER}\n", "Sure.",
     [call("get_weather", city="Paris")]),
    ("unclosed-and-malformed", '<tool_call>\n{"name": "get_wea', '<tool_call>\n{"name": "get_wea',
     []),
    ("half-a-tag-at-the-end", "Hello <tool_ca", "Hello <tool_ca", []),
    ("lookalike-tag", "<tool_calls>[]</tool_calls> and <tool>",
     "<tool_calls>[]</tool_calls> and <tool>", []),
    ("end-tag-without-start", f"{WEATHER}</tool_call>", f"{WEATHER}</tool_call>", []),
    ("end-tag-inside-a-string",  # the first end tag closes the call, as in vLLM's parser
     '<tool_call>{"name": "echo", "arguments": {"t": "</tool_call>"}}</tool_call>',
     '<tool_call>{"name": "echo", "arguments": {"t": "</tool_call>"}}</tool_call>', []),
    ("start-tag-inside-a-call-body", f"<tool_call><tool_call>{TIME}</tool_call>",
     f"<tool_call><tool_call>{TIME}</tool_call>", []),
]
IDS = [case[0] for case in CASES]


def streamed(text: str, cuts: list[int]) -> ParsedReply:
    """`text` pushed through a fresh stream in the pieces `cuts` makes of it."""
    stream = HermesToolParser().stream()
    bounds = [0, *cuts, len(text)]
    events = [e for a, b in zip(bounds, bounds[1:]) for e in stream.push(text[a:b])]
    events += stream.finish()
    assert "" not in events
    return ParsedReply("".join(e for e in events if isinstance(e, str)),
                       [e for e in events if isinstance(e, ParsedCall)])


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in CASES], ids=IDS)
def test_whole_reply(text: str, content: str, calls: list[ParsedCall]) -> None:
    assert HermesToolParser().parse(text) == ParsedReply(content, calls)


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in CASES], ids=IDS)
def test_stream_in_every_cut_reads_as_the_whole(text: str, content: str,
                                                calls: list[ParsedCall]) -> None:
    whole = ParsedReply(content, calls)
    assert streamed(text, list(range(1, len(text)))) == whole  # one character at a time
    for i in range(len(text) + 1):
        assert streamed(text, [i]) == whole, i
        for j in range(i, len(text) + 1, 3):  # and in three pieces, for many pairs of cuts
            assert streamed(text, [i, j]) == whole, (i, j)


def test_half_a_tag_is_never_sent_as_content() -> None:
    stream = HermesToolParser().stream()
    assert stream.push("Let me check.\n<tool_") == ["Let me check."]
    assert stream.push("call>\n" + WEATHER[:20]) == []
    assert stream.push(WEATHER[20:] + "\n</tool_call>") == [call("get_weather", city="Paris")]
    assert stream.push("\n\n") == []  # whitespace after a call is not content
    assert stream.finish() == []


def test_text_held_back_as_a_possible_tag_comes_out_when_it_is_not() -> None:
    stream = HermesToolParser().stream()
    assert stream.push("a <tool") == ["a"]
    assert stream.push("box> b ") == [" <toolbox> b"]
    assert stream.finish() == [" "]


def test_random_replies_never_raise_and_stream_as_whole() -> None:
    """Replies glued at random from whole calls, loose tags, JSON pieces and text (which may
    break the calls next to them); each must stream, in random cuts, as it parses whole."""
    pieces = [f"<tool_call>{WEATHER}</tool_call>", f"<tool_call>\n{TIME}\n</tool_call>",
              "<tool_call>", "</tool_call>", "<tool_", "call>", "</tool", WEATHER, TIME, "{",
              '"name"', ": ", "}", "\n", "  ", "text", "<", "é😀", '"arguments": {}']
    rng = random.Random(7)
    parser = HermesToolParser()
    found_calls = 0
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        whole = parser.parse(text)
        found_calls += len(whole.calls)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        assert streamed(text, cuts) == whole, (text, cuts)
    assert found_calls > 20  # the mix does produce calls, so the equality covers them


def test_the_prompts_call_format_parses_back() -> None:
    """What kvrt's fallback prompt shows an assistant's calls as is what the parser reads."""
    text = "Checking.\n" + call_text("get_weather", {"city": "Paris"}) + "\n" + call_text("t", {})
    assert HermesToolParser().parse(text) == ParsedReply(
        "Checking.", [call("get_weather", city="Paris"), call("t")])


def test_registry_by_name() -> None:
    assert "hermes" in tool_parser_names()
    assert isinstance(make_tool_parser("hermes"), HermesToolParser)
    assert make_tool_parser("hermes").name == "hermes"
    with pytest.raises(ValueError, match="unknown tool parser 'mistral'; available: .*hermes"):
        make_tool_parser("mistral")
