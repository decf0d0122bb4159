"""OpenAI wire schemas (chat completions, completions, models) as msgspec Structs.

Requests ignore unknown fields, since OpenAI clients send many we do not use, but a known field
of the wrong type or out of range fails decoding with msgspec's path (`$.messages[0].role`).
Constraints live in the types so that /openapi.json, generated from these Structs, shows them.
Responses follow OpenAI's shapes field for field; `UNSET` fields are left out of the JSON
(OpenAI sends `usage` in stream chunks only when `include_usage` is asked for).

Choices, logprobs and penalties (n, logprobs/top_logprobs, presence/frequency/repetition
penalties, logit_bias, include_stop_str_in_output) sit in blocks of their own below. Fields
kvrt does not serve (`REFUSED_FIELDS`) are decoded as raw JSON only to be refused with a 400
naming them (runtime/server/openai_requests.py), never silently ignored.

Tool calling follows OpenAI's function tools: a request offers `tools` and may steer with
`tool_choice`; an assistant message carries `tool_calls` (arguments as a JSON string, as OpenAI
sends them) and a `tool` message answers one by its `tool_call_id`. Checks that span fields
(a tool_choice naming an unknown tool, duplicate names) are the server's, not the schema's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from kvrt.sdk.protocol.errors import ErrorResponse

Role = Literal["system", "developer", "user", "assistant", "tool"]
PositiveInt = Annotated[int, Meta(ge=1)]
TokenId = Annotated[int, Meta(ge=0)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # what torch.Generator.manual_seed takes


# ---- requests ------------------------------------------------------------------------------


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class KvrtOptions(Struct, kw_only=True):
    """Which run and agent of a multi-agent application the call belongs to (wins over the
    X-Kvrt-Run / X-Kvrt-Agent headers)."""

    run: str | None = None
    agent: str | None = None


# A field kvrt refuses: decoded as raw JSON, only to be refused by name.
Refused = Annotated[msgspec.Raw, Meta(description="Not supported by kvrt: a request that sends "
                                      "it (other than null) gets a 400 naming the field.")]
Penalty = Annotated[float, Meta(ge=-2, le=2)]


class SamplingRequest(Struct, kw_only=True):
    """Fields shared by chat and text completions. top_k, stop_token_ids and ignore_eos are
    extensions."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None  # 0 or -1 disables it
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: PositiveInt = 1
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    kvrt: KvrtOptions | None = None
    # vLLM's field: salts the cache under the caller's own tenant salt, so only requests with
    # the same cache_salt (of the same tenant) share KV. It narrows sharing, never widens it.
    cache_salt: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    # ---- choices, penalties, stop strings (runtime/engine/penalties.py) ----
    presence_penalty: Penalty | None = None  # OpenAI's, over the generated tokens
    frequency_penalty: Penalty | None = None  # OpenAI's, over the generated tokens
    repetition_penalty: Annotated[float, Meta(gt=0, le=10)] | None = None  # vLLM's: prompt too
    # OpenAI's: token id (as a string) -> bias added to its logit.
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    include_stop_str_in_output: bool = False  # vLLM's: keep a matched stop string in the text
    best_of: PositiveInt | None = None  # only 1 (with n=1) is served: no best-of ranking
    # Sent by clients, and harmless: accepted and ignored (kvrt stores nothing, has one tier of
    # service; reasoning_effort: the model does not reason).
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    # ---- a conversation's identity and a call's priority, for clients that declare no run ----
    # OpenAI's field: a call with it (or the X-Session-Id header) and no `kvrt` run belongs to
    # the implicit run of this key in the caller's tenant (runtime/graph/implicit.py).
    prompt_cache_key: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    # vLLM's field: lower is served earlier. An unattributed call's kvrt priority is its
    # negation (higher first: runtime/server/model_calls.py); a run's calls ignore it.
    priority: Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)] = 0
    # ---- refused (openai_requests.REFUSED_FIELDS) ----
    echo: bool = False  # true is refused
    suffix: str | None = None  # refused
    functions: Refused | None = None
    function_call: Refused | None = None
    audio: Refused | None = None
    modalities: list[str] | None = None  # only ["text"]
    prediction: Refused | None = None
    web_search_options: Refused | None = None


# OpenAI's rule for function names; the name is also what the model must spell in its call.
FunctionName = Annotated[str, Meta(min_length=1, max_length=64, pattern="^[a-zA-Z0-9_-]+$")]


class FunctionDefinition(Struct, kw_only=True, omit_defaults=True):
    """`parameters` is a JSON Schema object, passed to the prompt as given. omit_defaults keeps
    absent fields out of what a chat template sees (no `"description": null`)."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(Struct, kw_only=True):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(Struct, kw_only=True):
    """One call of a function: in an assistant message of a request, and in a response."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(Struct, kw_only=True):
    type: str  # only "text" is served; others are rejected with a clear 400
    text: str | None = None


class MessageOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    """kvrt's per-message extension: `segment` marks text other prompts may hold too (a
    shared block of a round), whose KV the runtime may reuse at another position."""

    segment: bool = False


class ChatMessage(Struct, kw_only=True):
    """`tool_calls` only on assistant messages (whose content may then be null), and
    `tool_call_id` on every `tool` message: the server refuses either out of place."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    kvrt: MessageOptions | None = None


# ---- response_format (structured output: runtime/server/grammars.py) ----------------------


class JsonSchemaFormat(Struct, kw_only=True):
    """OpenAI's `response_format.json_schema`: the reply's content is JSON valid against
    `schema`. kvrt always generates strictly (no keys or items the schema does not name), so
    `strict` changes nothing."""

    name: FunctionName
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    """`tool_choice` "required" and a named function are enforced by constrained decoding: the
    reply is then one or more valid calls (one with `parallel_tool_calls: false`); with "auto"
    a call the model begins is completed validly. `response_format` makes the content JSON."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name; wins if both given
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" when tools are given
    parallel_tool_calls: bool | None = None  # None: true
    # ---- logprobs (runtime/engine/logprobs.py): the model's raw distribution ----
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # needs logprobs: true
    response_format: ResponseFormat | None = None  # None: text (runtime/server/grammars.py)


class CompletionRequest(SamplingRequest, kw_only=True):
    """`prompt` is one string or one list of token ids; a batch of prompts is rejected."""

    prompt: str | list[int | str | list[int]]
    # ---- logprobs (runtime/engine/logprobs.py): the model's raw distribution ----
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # the sampled token and k more


# ---- responses -----------------------------------------------------------------------------


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(Struct, kw_only=True):
    """`content` is null when the reply is only tool calls; `tool_calls` is left out when
    there are none."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET


# ---- logprobs in responses: OpenAI's chat shape and the legacy completions shape ----


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text in UTF-8


class ChatTokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class CompletionLogprobs(Struct, kw_only=True):
    """Parallel lists, one entry per token; text_offset: where the token starts in the
    choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatChoice(Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ToolCallDelta(Struct, kw_only=True):
    """A streamed tool call. kvrt sends each call whole, in one delta, once its closing tag is
    read; OpenAI's clients also accept a call spread over several deltas of the same index."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Delta(Struct, kw_only=True):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct, kw_only=True):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: None = None


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Struct, kw_only=True):
    """A text completion, and also each chunk of a streamed one (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: None = None


class ModelCard(Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvrt"
    max_model_len: int  # extension, as vLLM reports it


class ModelList(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReplicaHealth(Struct, kw_only=True):
    """One engine replica behind the daemon (`kvrt serve --replicas N`)."""

    name: str
    state: Literal["starting", "ready", "down"]  # down: died; Ray restarts it
    restarts: int = 0  # times it came back after dying
    runs: int = 0  # live runs with agents placed on it
    agents: int = 0  # live agents placed on it
    requests_in_flight: int = 0
    kv_cache_usage: float | None = None  # fraction of its KV blocks live calls hold


class Health(Struct, kw_only=True):
    status: Literal["ok"] = "ok"
    # kvrt extensions: what the daemon serves with, so an application can say when the server
    # cannot show what it is about (a round's reuse needs `kvrt`, an offload a host tier).
    policy: str | None = None  # the engine's KV policy (`kvrt serve --policy`)
    host_cache_bytes: int | None = None  # the host tier (`--host-cache-memory`); 0: none
    replicas: list[ReplicaHealth] | None = None  # each engine replica; None: one engine


# Decoders are built once: msgspec compiles the type into a fast validator.
chat_request_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_request_decoder = msgspec.json.Decoder(CompletionRequest)

# For /openapi.json: every Struct the OpenAI routes read or write.
SCHEMA_TYPES = (
    ChatCompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    CompletionRequest,
    Completion,
    ModelList,
    Health,
    ErrorResponse,
)
