"""The checks and conversions of a decoded OpenAI request, before a call is built of it
(model_calls.py).

Everything a request can get wrong is checked here, before the engine sees it, so a bad request
is answered at once with a 400 and never queued (a prompt longer than the context included).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from kvrt.runtime.engine.protocol import SamplingParams
from kvrt.runtime.model.tool_prompt import PromptTools
from kvrt.runtime.server.errors import APIError, bad_request
from kvrt.sdk.protocol.openai_api import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    SamplingRequest,
    ToolCall,
)

if TYPE_CHECKING:
    from kvrt.runtime.model.tokenizer import Tokenizer


# The most choices one request may ask for (each is a sequence of the running batch).
MAX_CHOICES = 64


# Fields a client may send that kvrt does not serve: a 400 naming the field, never a 200 that
# quietly ignores what was asked (null, false or the default value asks for nothing).
REFUSED_FIELDS = ("best_of", "echo", "suffix", "functions", "function_call", "audio",
                  "modalities", "prediction", "web_search_options")


class ServedModel(Protocol):
    """What checking and building a call read of the engine (an EngineClient is one)."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer


def check_common(body: SamplingRequest, engine: ServedModel) -> None:
    """Checks that do not need the prompt: the model name, the number of choices, the fields
    kvrt does not serve (REFUSED_FIELDS), logprobs and logit_bias."""
    if body.model is not None and body.model != engine.model_name:
        raise APIError(
            404,
            f"The model `{body.model}` does not exist; this server serves `{engine.model_name}`",
            param="model",
            code="model_not_found",
        )
    if body.n > 1 and not isinstance(body, (ChatCompletionRequest, CompletionRequest)):
        raise bad_request("n > 1 is served by /v1/chat/completions and /v1/completions only",
                          param="n")
    if body.n > MAX_CHOICES:
        raise bad_request(f"n={body.n} asks for more than {MAX_CHOICES} choices", param="n")
    check_refused(body)
    if (isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None
            and not body.logprobs):
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    _logit_bias(body, engine.tokenizer.vocab_size)


def _refused_value(body: SamplingRequest, name: str) -> str | None:
    """Why the body's field `name` is refused, or None where its value asks for nothing."""
    value = getattr(body, name, None)
    if value is None:
        return None
    if isinstance(value, msgspec.Raw):
        return None if bytes(value).strip() == b"null" else "kvrt does not serve it"
    if name == "echo":
        return "kvrt does not echo the prompt" if value else None
    if name == "suffix":
        return "kvrt does not insert text (no suffix)" if value else None
    if name == "modalities":
        return (f"only text is generated, not {sorted(set(value) - {'text'})}"
                if value and set(value) - {"text"} else None)
    if name == "best_of":
        return ("kvrt does not rank choices; ask for n choices instead"
                if value > 1 or value != body.n else None)
    raise AssertionError(name)


def check_refused(body: SamplingRequest) -> None:
    """A 400 naming the first field of REFUSED_FIELDS whose value asks for something."""
    for name in REFUSED_FIELDS:
        why = _refused_value(body, name)
        if why is not None:
            raise bad_request(f"`{name}` is not supported: {why}", param=name,
                              code="unsupported_field")


def _logit_bias(body: SamplingRequest, vocab: int | None = None
                ) -> tuple[tuple[int, float], ...]:
    """The body's logit_bias as (token id, bias) pairs; a 400 for a key that is no token id
    (below `vocab`, where given: check_common checks that)."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit() or (vocab is not None and int(key) >= vocab):
            raise bad_request("logit_bias keys are token ids as strings"
                              + (f" (0..{vocab - 1})" if vocab else "") + f"; got {key!r}",
                              param=f"logit_bias.{key}")
        pairs.append((int(key), bias))
    return tuple(pairs)


def check_message_count(count: int, max_messages: int, param: str,
                        what: str = "the request") -> None:
    """A 400 naming `param` if `count` messages exceed the server's `--max-messages`."""
    if count > max_messages:
        raise bad_request(f"{what} has {count} messages, more than this server's limit of "
                          f"{max_messages} (--max-messages)", param=param,
                          code="too_many_messages")


def chat_tools(body: ChatCompletionRequest) -> PromptTools | None:
    """The tools the prompt shows, or None (none offered, or tool_choice "none": the reply is
    then all content). "required" and a named function are enforced by the reply's grammar
    (grammars.py); they are also asked of the model in the prompt, so that it means the call."""
    tools = body.tools or []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in names:
            raise bad_request(f"two tools are named `{name}`; tool names must be unique",
                              param=f"tools[{i}].function.name")
        names.add(name)
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        offered = ", ".join(f"`{n}`" for n in sorted(names)) or "none"
        raise bad_request(
            f"tool_choice names the function `{choice.function.name}`, which is not among the "
            f"request's tools (offered: {offered})", param="tool_choice.function.name")
    if choice == "required" and not names:
        raise bad_request('tool_choice "required" needs tools; the request offers none',
                          param="tool_choice")
    if not tools or choice == "none":
        return None
    return PromptTools([msgspec.to_builtins(t) for t in tools],
                       _tool_instruction(choice, body.parallel_tool_calls is not False))


def _tool_instruction(choice: str | NamedToolChoice | None, parallel: bool) -> str | None:
    if isinstance(choice, NamedToolChoice):
        ask = f"You must call the function `{choice.function.name}` in your reply."
    elif choice == "required":
        ask = "You must call at least one of the functions in your reply."
    else:
        ask = ""
    once = "" if parallel else "Call at most one function in your reply."
    return " ".join(part for part in (ask, once) if part) or None


def message_dicts(messages: list[ChatMessage], param: str) -> list[dict[str, Any]]:
    """The messages as chat templates take them; `param` names them in a 400."""
    return [_message_dict(i, m, param) for i, m in enumerate(messages)]


def segment_marks(messages: list[ChatMessage], every_message_a_segment: bool) -> list[bool]:
    """Which messages are segments: those marked `kvrt.segment`, or all of them (the call's
    graph declared approximate reuse)."""
    return [every_message_a_segment or (m.kvrt is not None and m.kvrt.segment)
            for m in messages]


def _message_dict(index: int, message: ChatMessage, param: str) -> dict[str, Any]:
    """The message as chat templates take it: "developer" is OpenAI's new name for the system
    role (templates know only "system"), content is text, and a tool call's arguments are an
    object (Qwen2.5's template writes them with `tojson`), as transformers expects."""
    role = "system" if message.role == "developer" else message.role
    turn: dict[str, Any] = {"role": role, "content": _message_text(index, message, param)}
    where = f"{param}[{index}]"
    if message.tool_calls:
        if role != "assistant":
            raise bad_request(f"{where} has tool_calls, which only assistant messages carry",
                              param=f"{where}.tool_calls")
        turn["tool_calls"] = [_call_dict(call, f"{where}.tool_calls[{j}]")
                              for j, call in enumerate(message.tool_calls)]
    if role == "tool":
        if not message.tool_call_id:
            raise bad_request(f"{where} has role 'tool' but no tool_call_id; a tool message "
                              "answers one tool call by its id", param=f"{where}.tool_call_id")
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _call_dict(call: ToolCall, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise bad_request(f"{where}.function.arguments must be a JSON object, as text",
                          param=f"{where}.function.arguments")
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": arguments}}


def _message_text(index: int, message: ChatMessage, param: str) -> str:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"only text content parts are served; {param}[{index}].content[{j}] "
                    f"has type {part.type!r}",
                    param=f"{param}[{index}].content[{j}].type",
                )
            parts.append(part.text)
        text = "".join(parts)
    return text


# A token covers at most max_token_chars characters of the text as the vocabulary spells it;
# the factor leaves room for normalizers that compose characters before tokenizing.
_CHARS_PER_TOKEN_MARGIN = 2


def check_text_length(chars: int, engine: ServedModel, param: str) -> None:
    """A 400 for text too long for any tokenization to fit the context, decided from its length
    alone: tokenizing a text of megabytes would hold the event loop for seconds first."""
    most = engine.max_model_len * engine.tokenizer.max_token_chars * _CHARS_PER_TOKEN_MARGIN
    if chars > most:
        raise bad_request(
            f"This model's maximum context length is {engine.max_model_len} tokens, and the "
            f"prompt's text has {chars} characters: more than any {engine.max_model_len} "
            f"tokens of this model can spell ({most} characters at most). Shorten the prompt.",
            param=param, code="context_length_exceeded")


def text_length(messages: list[ChatMessage]) -> int:
    """The characters of the messages' text as `message_dicts` joins it (a part that is not
    text counts none: `message_dicts` refuses it)."""
    chars = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            chars += len(content)
        elif content is not None:
            chars += sum(len(part.text or "") for part in content)
    return chars


def completion_prompt_ids(body: CompletionRequest, engine: ServedModel) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)  # type: ignore[arg-type]
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        ids = prompt[0] if isinstance(prompt[0], list) else engine.tokenizer.encode(prompt[0])
    elif isinstance(prompt, list):
        raise bad_request(
            "prompt must be one string or one list of token ids; batches of prompts are not "
            "supported, send one request per prompt",
            param="prompt",
        )
    else:
        ids = engine.tokenizer.encode(prompt)
    if not ids:
        raise bad_request("prompt is empty", param="prompt")
    return list(ids)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int,
                       default: int | None, prompt_param: str) -> int:
    """The number of tokens to generate, or a 400 if prompt + max_tokens cannot fit."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens, leaving no room to generate. Shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_len} tokens and max_tokens asks for {requested}, so at most {room} "
            "can be generated. Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _logprobs_asked(body: SamplingRequest) -> int | None:
    """How many top tokens each sampled token's logprobs list (None: no logprobs)."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)  # a completion's is the count itself


def sampling_params(body: SamplingRequest, max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),  # vLLM clients send -1 for "off"; the engine uses 0
        seed=body.seed,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        n=body.n,
        logprobs=_logprobs_asked(body),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=_logit_bias(body),
        include_stop_str_in_output=body.include_stop_str_in_output,
    )
