"""Prompt building: the prompt's ids and its messages' spans from one pass, against the per-prefix
reference (one render per prefix of the chat, as the server rendered before), on several
templates: the tiny models' ChatML, SmolLM2's own (a default system prompt), and templates in
the manner of Llama 3 (BOS, trimmed contents), Qwen2.5 (tools, merged tool results), Qwen3 (a
last-query scan) and Llama 2 (the system prompt inside the first user turn, alternation
enforced)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from kvrt.runtime.model.chat_prompt import (
    PREFIX_RENDERS_UP_TO,
    message_pieces,
    pieces_by_neighbours,
    pieces_by_prefix,
    reads_far_turns,
    render_prompt,
)
from kvrt.runtime.model.tokenizer import Tokenizer
from kvrt.runtime.model.tool_prompt import PromptTools

LLAMA3_STYLE = (
    "{%- for message in messages %}"
    "{%- set turn = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{%- if loop.index0 == 0 %}{%- set turn = '<|begin_of_text|>' + turn %}{%- endif %}"
    "{{- turn }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
QWEN25_STYLE = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>' }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"  # a run of results is one user turn
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The last assistant turn after the last real question gets an empty think block; which one that
# is depends on every later message.
QWEN3_STYLE = (
    "{%- set ns = namespace(searching=true, last_query=messages | length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- if ns.searching and message.role == 'user'"
    " and not message.content.startswith('<tool_response>') %}"
    "{%- set ns.searching = false %}"
    "{%- set ns.last_query = messages | length - 1 - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and loop.index0 > ns.last_query and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content"
    " + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA2_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set loop_messages = messages[1:] %}"
    "{%- set system = messages[0]['content'] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- set system = false %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('roles must alternate user/assistant/user/...') }}{%- endif %}"
    "{%- if loop.index0 == 0 and system != false %}"
    "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{%- else %}{%- set content = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '<s>[INST] ' + content | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + content | trim + ' </s>' }}{%- endif %}{%- endfor %}"
)
# Each turn numbered: a message renders the same after its neighbour whatever its place, only
# the whole chat shows its number.
NUMBERED = ("{%- for m in messages %}"
            "{{- loop.index ~ '. ' ~ m.role ~ ': ' ~ m.content ~ '\\n' }}{%- endfor %}")
TEMPLATES = {"llama3-style": LLAMA3_STYLE, "qwen2.5-style": QWEN25_STYLE,
             "qwen3-style": QWEN3_STYLE, "llama2-style": LLAMA2_STYLE, "numbered": NUMBERED}


def call(call_id: str, name: str, **arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def turn(role: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


SYSTEM = turn("system", "You are terse.")
CHATS: dict[str, list[dict[str, Any]]] = {
    "plain": [SYSTEM, turn("user", "Hi."), turn("assistant", "Hello."), turn("user", "Bye.")],
    "no-system": [turn("user", "Hi."), turn("assistant", "Hello."), turn("user", "And?")],
    "one": [turn("user", "Only this.")],
    "tool-call": [
        SYSTEM, turn("user", "Weather in Paris?"),
        turn("assistant", "", tool_calls=[call("call_1", "get_weather", city="Paris")]),
        turn("tool", "18C", tool_call_id="call_1"), turn("assistant", "18C in Paris."),
        turn("user", "Thanks."),
    ],
    "parallel-calls": [
        turn("user", "Weather and time?"),
        turn("assistant", "Checking.", tool_calls=[call("call_1", "get_weather", city="Oslo"),
                                                   call("call_2", "get_time")]),
        turn("tool", "3C", tool_call_id="call_1"), turn("tool", "9:00", tool_call_id="call_2"),
        turn("assistant", "3C at 9:00."),
    ],
    "whitespace": [turn("system", "  padded \n"), turn("user", "\n leading"),
                   turn("assistant", "trailing  \n\n"), turn("user", " both ")],
    # A question answered by a tool result with no call before it: nothing the server refuses,
    # and the case where Qwen3's last-query scan looks past a message's neighbours.
    "result-after-question": [turn("user", "Q?"), turn("tool", "R", tool_call_id="call_0"),
                              turn("assistant", "A."), turn("user", "Q2?")],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = {"none": None, "offered": PromptTools([WEATHER, TIME]),
         "required": PromptTools([WEATHER, TIME], "You must call at least one function.")}

# Where rendering by neighbours cannot tell, and only the per-prefix reference may: a lone
# assistant or tool turn breaks Llama 2's alternation, Qwen2.5's run of tool results is one
# turn whose end moves with each result, and numbered turns' pieces do not add up to the whole.
# Everywhere else it must succeed.
NEIGHBOURS_DEFER = {(name, chat) for name in ("llama2-style", "numbered")
                    for chat in CHATS if chat != "one"} | {("qwen2.5-style", "parallel-calls")}


def with_template(folder: Path, template: str) -> Tokenizer:
    """The folder's tokenizer with another chat template."""
    return Tokenizer(PreTrainedTokenizerFast.from_pretrained(str(folder), chat_template=template))


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint_dir) -> dict[str, Tokenizer]:
    folder = tiny_checkpoint_dir()
    made = {"chatml": Tokenizer.from_pretrained(folder, as_saved=True)}
    made |= {name: with_template(folder, template) for name, template in TEMPLATES.items()}
    return made


@pytest.fixture(params=["chatml", "smollm2", *TEMPLATES])
def template(request, tokenizers) -> tuple[str, Tokenizer]:
    return _template(request, tokenizers)


# Templates that read far turns are rendered per prefix (see the last-query test): the
# neighbour method is never theirs.
@pytest.fixture(params=["chatml", "smollm2",
                        *(name for name, text in TEMPLATES.items() if not reads_far_turns(text))])
def neighbour_template(request, tokenizers) -> tuple[str, Tokenizer]:
    return _template(request, tokenizers)


def _template(request, tokenizers) -> tuple[str, Tokenizer]:
    if request.param == "smollm2":  # the real default model's template and tokenizer
        return "smollm2", request.getfixturevalue("default_checkpoint").tokenizer
    return request.param, tokenizers[request.param]


def reference(tokenizer: Tokenizer, turns: list[dict[str, Any]], marked: list[bool],
              tools: PromptTools | None) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """The prompt and segment spans as the server built them before (a render per prefix)."""
    prompt = tokenizer.encode_chat(turns, tools)
    if not any(marked):
        return prompt, ()
    spans: list[tuple[int, int]] = []
    ids: list[int] = []
    before = ""
    for i, is_segment in enumerate(marked):
        rendered = tokenizer.render_chat(turns[: i + 1], add_generation_prompt=False, tools=tools)
        if not rendered.startswith(before):
            return prompt, ()
        start = len(ids)
        ids += tokenizer.encode_piece(rendered[len(before):])
        if is_segment:
            spans.append((start, len(ids)))
        before = rendered
    return prompt, tuple(spans) if prompt[: len(ids)] == ids else ()


def longer(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat made longer than the length up to which prompts are rendered per prefix: the
    turns between a leading system message and the last one repeated (which keeps a chat's
    user/assistant alternation)."""
    head = turns[:1] if turns[0]["role"] == "system" else []
    body = turns[len(head):]
    cycle = body[:-1] or body
    return head + cycle * (PREFIX_RENDERS_UP_TO // len(cycle) + 1) + body[-1:]


def renders_whole(tokenizer: Tokenizer, turns: list[dict[str, Any]],
                  tools: PromptTools | None) -> bool:
    try:
        tokenizer.render_chat(turns, tools=tools)
    except Exception:  # e.g. Llama 2's alternation check refuses the chat whole
        return False
    return True


@pytest.mark.parametrize("tools", TOOLS)
def test_pieces_by_neighbours_are_the_per_prefix_pieces(neighbour_template, tools) -> None:
    name, tokenizer = neighbour_template
    assert not reads_far_turns(tokenizer.chat_template or "")
    for chat, turns in CHATS.items():
        if not renders_whole(tokenizer, turns, TOOLS[tools]):
            continue
        expected = pieces_by_prefix(tokenizer, turns, TOOLS[tools])
        got = pieces_by_neighbours(tokenizer, turns, TOOLS[tools])
        assert (got is None) == ((name, chat) in NEIGHBOURS_DEFER), chat
        assert got is None or got == expected, chat


@pytest.mark.parametrize("tools", TOOLS)
def test_the_prompt_and_its_spans_are_the_references(template, tools) -> None:
    _, tokenizer = template
    offered = TOOLS[tools]
    for chat, short in CHATS.items():
        for turns in (short, longer(short)):
            if not renders_whole(tokenizer, turns, offered):
                continue
            every = [True] * len(turns)
            some = [i % 3 == 1 for i in range(len(turns))]
            for marked in (every, some, [False] * len(turns)):
                prompt = render_prompt(tokenizer, turns, marked, offered)
                assert (prompt.token_ids, prompt.segments) == reference(
                    tokenizer, turns, marked, offered), (chat, len(turns), marked)


def test_spans_are_found_where_the_pieces_add_up(tokenizers) -> None:
    # The comparison above would pass if both sides found nothing: they do find spans.
    tokenizer = tokenizers["chatml"]
    turns = longer(CHATS["tool-call"])
    prompt = render_prompt(tokenizer, turns, [True] * len(turns), TOOLS["offered"])
    assert len(prompt.segments) == len(turns) and prompt.segments[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(prompt.segments, prompt.segments[1:]))
    tail = tokenizer.decode(prompt.token_ids[prompt.segments[-1][1]:], skip_special_tokens=False)
    assert tail == "<|im_start|>assistant\n"  # the generation prompt belongs to no message


class CountingTokenizer(Tokenizer):
    """Counts the messages it renders: a render's cost grows with them."""

    def __init__(self, folder: Path, template: str | None = None) -> None:
        extra = {} if template is None else {"chat_template": template}
        super().__init__(PreTrainedTokenizerFast.from_pretrained(str(folder), **extra))
        self.rendered = 0

    def render_chat(self, messages, add_generation_prompt=True, tools=None) -> str:
        self.rendered += len(messages)
        return super().render_chat(messages, add_generation_prompt, tools)


@pytest.mark.parametrize(("template", "tail"), [
    (None, []), (QWEN25_STYLE, CHATS["parallel-calls"])], ids=["chatml", "qwen2.5-style"])
def test_a_long_chat_renders_in_linear_work(tiny_checkpoint_dir, template, tail) -> None:
    """Each message rendered alone and in two pairs, the whole chat twice: 5n messages, not
    the reference's n^2 / 2. Also when the chat ends with a run of tool results that is one
    turn (and so has no spans), which the reference finds out only at its end: then the
    reference's check there renders the chat twice more."""
    tokenizer = CountingTokenizer(tiny_checkpoint_dir(), template)
    turns = CHATS["tool-call"] * 40 + tail
    prompt = render_prompt(tokenizer, turns, [True] * len(turns))
    assert tokenizer.rendered <= (5 if not tail else 7) * len(turns)
    assert bool(prompt.segments) == (not tail)


def test_a_template_that_scans_for_the_last_query_is_rendered_per_prefix(tokenizers) -> None:
    tokenizer = tokenizers["qwen3-style"]
    assert reads_far_turns(QWEN3_STYLE)
    assert not any(reads_far_turns(t) for t in (LLAMA3_STYLE, QWEN25_STYLE, LLAMA2_STYLE))
    turns = longer(CHATS["result-after-question"])
    # The assistant turn has the think block while it is last after the question (a tool result
    # is no question), so no prefix renders as the start of the next: there are no segments.
    # Each message with its neighbour cannot see that question; that is why such templates are
    # rendered per prefix.
    assert pieces_by_prefix(tokenizer, turns) is None
    assert pieces_by_neighbours(tokenizer, turns) is not None
    assert message_pieces(tokenizer, turns) is None
    assert render_prompt(tokenizer, turns, [True] * len(turns)).segments == ()


def test_a_part_of_the_chat_the_template_refuses_leaves_no_segments(tiny_checkpoint_dir) -> None:
    # A template may refuse a prefix of a chat it renders whole (here: a first answer with
    # nothing after it). Before, that was a 500; the call is now served, and reuses KV by exact
    # prefix only.
    tokenizer = with_template(tiny_checkpoint_dir(), (
        "{%- if messages | length == 2 and messages[1].role == 'assistant' %}"
        "{{- raise_exception('no') }}{%- endif %}"
        "{%- for m in messages %}{{- m.role + ': ' + m.content + '\\n' }}{%- endfor %}"))
    turns = CHATS["no-system"]
    assert pieces_by_prefix(tokenizer, turns) is None
    prompt = render_prompt(tokenizer, turns, [True] * len(turns))
    assert prompt.token_ids and prompt.segments == ()


def test_tokens_merged_across_turns_leave_no_segments(tiny_checkpoint_dir) -> None:
    tokenizer = with_template(tiny_checkpoint_dir(),
                              "{%- for m in messages %}{{- m.content }}{%- endfor %}")
    turns = [turn("user", "T"), turn("user", "he quick brown fox")]
    pieces = pieces_by_prefix(tokenizer, turns)
    assert pieces == ["T", "he quick brown fox"]  # they add up as text
    whole = tokenizer.encode_chat(turns)
    assert whole != [i for ids in tokenizer.encode_pieces(pieces) for i in ids]  # not as tokens
    prompt = render_prompt(tokenizer, turns, [True, True])
    assert prompt.token_ids == whole and prompt.segments == ()
