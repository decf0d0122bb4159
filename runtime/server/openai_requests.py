"""From a decoded OpenAI request to the engine's GenerateRequest.

Everything a request can get wrong is checked here, before the engine sees it, so a bad request
is answered at once with a 400 and never queued (a prompt longer than the context included).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec
from jinja2 import TemplateError

from kvrt.runtime.engine.protocol import (
    Attribution,
    EngineClient,
    GenerateRequest,
    SamplingParams,
)
from kvrt.runtime.model.tool_prompt import PromptTools
from kvrt.runtime.server.auth import request_salt
from kvrt.runtime.server.errors import APIError, bad_request
from kvrt.sdk.protocol.openai_api import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    KvrtOptions,
    NamedToolChoice,
    SamplingRequest,
    ToolCall,
)

RUN_HEADER = "X-Kvrt-Run"
AGENT_HEADER = "X-Kvrt-Agent"

# OpenAI's legacy completions endpoint generates 16 tokens unless told otherwise; chat runs to
# the end of the context, as OpenAI and vLLM do.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_common(body: SamplingRequest, engine: EngineClient) -> None:
    """Checks that do not need the prompt: the model name and unsupported options."""
    if body.model is not None and body.model != engine.model_name:
        raise APIError(
            404,
            f"The model `{body.model}` does not exist; this server serves `{engine.model_name}`",
            param="model",
            code="model_not_found",
        )
    if body.n != 1:
        raise bad_request(f"n={body.n} is not supported yet; send n=1 (or leave it out)", param="n")


def check_message_count(count: int, max_messages: int, param: str,
                        what: str = "the request") -> None:
    """A 400 naming `param` if `count` messages exceed the server's `--max-messages`."""
    if count > max_messages:
        raise bad_request(f"{what} has {count} messages, more than this server's limit of "
                          f"{max_messages} (--max-messages)", param=param,
                          code="too_many_messages")


def chat_tools(body: ChatCompletionRequest) -> PromptTools | None:
    """The tools the prompt shows, or None (none offered, or tool_choice "none": the reply is
    then all content). "required" and a named function cannot be enforced without constrained
    decoding, which kvrt does not have: they become an instruction in the prompt, and the
    model may still answer in prose."""
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


def chat_prompt_ids(body: ChatCompletionRequest, engine: EngineClient,
                    tools: PromptTools | None = None) -> list[int]:
    return messages_prompt_ids(body.messages, engine, "messages", tools)


def messages_prompt_ids(messages: list[ChatMessage], engine: EngineClient, param: str,
                        tools: PromptTools | None = None) -> list[int]:
    """The templated prompt of these messages; `param` names them in a 400."""
    turns = [_message_dict(i, m, param) for i, m in enumerate(messages)]
    try:
        return list(engine.tokenizer.encode_chat(turns, tools))
    except (ValueError, TemplateError) as exc:  # no template, or the template refuses the turns
        raise bad_request(f"cannot apply the chat template: {exc}", param=param) from None


def segment_spans(messages: list[ChatMessage], marked: list[bool], prompt_ids: list[int],
                  engine: EngineClient,
                  tools: PromptTools | None = None) -> tuple[tuple[int, int], ...]:
    """The token spans of the marked messages in `prompt_ids`: each message as the template
    renders it (its role header included), tokenized on its own. () when the pieces do not
    add up to the prompt (a template that rewrites earlier turns, or merges tokens across
    them): the call then reuses KV only by exact prefix."""
    if not any(marked):
        return ()
    tokenizer = engine.tokenizer
    turns = [_message_dict(i, m, "messages") for i, m in enumerate(messages)]
    spans, ids, before = [], [], ""
    for i, is_segment in enumerate(marked):
        rendered = tokenizer.render_chat(turns[: i + 1], add_generation_prompt=False,
                                         tools=tools)
        if not rendered.startswith(before):
            return ()
        start = len(ids)
        ids += tokenizer.encode_piece(rendered[len(before):])
        if is_segment:
            spans.append((start, len(ids)))
        before = rendered
    return tuple(spans) if prompt_ids[: len(ids)] == ids else ()


def marked_segments(messages: list[ChatMessage], every: bool = False) -> list[bool]:
    """Which messages are segments: those marked `kvrt.segment`, or all (`every`: the call's
    graph declared approximate reuse)."""
    return [every or (m.kvrt is not None and m.kvrt.segment) for m in messages]


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


def completion_prompt_ids(body: CompletionRequest, engine: EngineClient) -> list[int]:
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
    )


def attribution(options: KvrtOptions | None, headers: Mapping[str, str]) -> Attribution:
    """The body's `kvrt` object wins over the headers, field by field. A run needs an agent and
    an agent a run: a call belongs to one agent of one run, or to none."""
    run = options.run if options is not None and options.run is not None else None
    agent = options.agent if options is not None and options.agent is not None else None
    run = run if run is not None else headers.get(RUN_HEADER)
    agent = agent if agent is not None else headers.get(AGENT_HEADER)
    if (run is None) != (agent is None):
        missing = "agent" if agent is None else "run"
        raise bad_request(
            f"a call attributed to a {'run' if agent is None else 'agent'} must name its "
            f"{missing} too (kvrt.{missing} or the X-Kvrt-{missing.capitalize()} header)",
            param=f"kvrt.{missing}")
    return Attribution(run=run, agent=agent)


def build_request(
    request_id: str,
    body: SamplingRequest,
    prompt_ids: list[int],
    max_tokens: int | None,
    engine: EngineClient,
    headers: Mapping[str, str],
    *,
    default_max_tokens: int | None,
    prompt_param: str,
    segments: tuple[tuple[int, int], ...] = (),
    tenant: str,
) -> GenerateRequest:
    """`tenant`: the caller's (auth.tenant_of); with the body's cache_salt it makes the salt."""
    resolved = resolve_max_tokens(
        max_tokens, len(prompt_ids), engine.max_model_len, default_max_tokens, prompt_param
    )
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        params=sampling_params(body, resolved),
        salt=request_salt(tenant, body.cache_salt),
        attribution=attribution(body.kvrt, headers),
        segments=segments,
    )


def chat_generate_request(
    body: ChatCompletionRequest, engine: EngineClient, headers: Mapping[str, str],
    every_message_a_segment: bool = False, tools: PromptTools | None = None, *,
    tenant: str, max_messages: int,
) -> GenerateRequest:
    """`tools`: what `chat_tools(body)` returned (the caller also needs it to read the reply).
    `tenant`: the caller's; `max_messages`: the server's limit (ServerLimits)."""
    check_common(body, engine)
    check_message_count(len(body.messages), max_messages, "messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    prompt = chat_prompt_ids(body, engine, tools)
    return build_request(
        new_request_id("chatcmpl"), body, prompt, max_tokens, engine, headers,
        default_max_tokens=None, prompt_param="messages",
        segments=segment_spans(
            body.messages, marked_segments(body.messages, every_message_a_segment), prompt,
            engine, tools),
        tenant=tenant,
    )


def completion_generate_request(
    body: CompletionRequest, engine: EngineClient, headers: Mapping[str, str], *,
    tenant: str,
) -> GenerateRequest:
    check_common(body, engine)
    return build_request(
        new_request_id("cmpl"), body, completion_prompt_ids(body, engine), body.max_tokens,
        engine, headers, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS, prompt_param="prompt",
        tenant=tenant,
    )
