"""A model call built once: prompt, segment spans, sampling, salt and context, checked here and
given its time limit at admission, where it becomes the engine's GenerateRequest.

The chat and round routes build theirs from messages (`messages_call`): the messages become
template turns once and are rendered once for the prompt's ids and segment spans together
(model/chat_prompt.py). The prompt's length is checked once here (`resolve_max_tokens`, a 400
naming the prompt or max_tokens); admission asks the engine once more (`validate`: can the KV
pool ever hold it).

An unattributed call takes its priority from vLLM's `priority` field (lower is served earlier)
as kvrt's priority, higher first: `-priority` (so vLLM's default 0 is kvrt's 0, the priority
every unattributed call had before). Whatever the policy, the engine admits waiting calls class
by class of that field, as vLLM's "priority" scheduling does, and preempts from the last class
first; the policy orders the calls within a class (engine/sequence.py's `request_rank`). A call
of a run (declared or implicit) has its agent's graph priority, is in class 0, and the field is
ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from jinja2 import TemplateError

from kvrt.runtime.engine.constraints import Grammar
from kvrt.runtime.engine.protocol import Attribution, GenerateRequest, SamplingParams
from kvrt.runtime.model.chat_prompt import Span, render_prompt
from kvrt.runtime.model.tool_prompt import PromptTools
from kvrt.runtime.server.auth import request_salt
from kvrt.runtime.server.call_context import CallContext
from kvrt.runtime.server.errors import bad_request
from kvrt.runtime.server.generation import CallObserver
from kvrt.runtime.server.openai_requests import (
    ServedModel,
    check_common,
    check_message_count,
    check_text_length,
    completion_prompt_ids,
    message_dicts,
    resolve_max_tokens,
    sampling_params,
    segment_marks,
    text_length,
)
from kvrt.runtime.server.priority_sync import PrioritySync, SyncedCall
from kvrt.sdk.protocol.openai_api import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)
from kvrt.sdk.protocol.rounds import RoundRequest

# OpenAI's legacy completions endpoint generates 16 tokens unless told otherwise; chat runs to
# the end of the context, as OpenAI and vLLM do.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """A call built and checked, waiting for admission to give it its time limit."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str  # the caller's (auth.tenant_of)
    salt: bytes  # the tenant's, narrowed by the body's cache_salt
    segments: tuple[Span, ...]
    context: CallContext | None  # None: the call belongs to no run
    priority: float = 0.0  # kvrt's (higher first) for a call of no run: -(vLLM's priority)

    def request(self, timeout_s: float | None) -> GenerateRequest:
        attribution = (Attribution(priority=self.priority) if self.context is None
                       else self.context.attribution)
        return GenerateRequest(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            params=self.params, salt=self.salt, tenant=self.tenant, attribution=attribution,
            segments=self.segments, timeout_s=timeout_s)

    def submit(self, sync: PrioritySync) -> CallObserver | None:
        """Tells the call's run, if any, that the call is queued (once it is admitted); the
        observer follows the call, and its end moves the run's priorities."""
        if self.context is None:
            return None
        return SyncedCall(self.context.submit(self.request_id), self.context.run, sync)


def submit_calls(calls: list[PreparedCall], sync: PrioritySync) -> list[CallObserver | None]:
    """Submits calls admitted together (a chat call, or a round's: one run), then pushes their
    run's priorities from the criticality their contexts were read from: one critical path for
    the stamps and the push. A call of a done agent revives it: its stamp (0) and that push
    predate the revival, so the run is pushed again at the loop's next turn, from a critical
    path that counts the agent's work again (the first call of each LangGraph invocation,
    whose agents the adapter reported done at the end of the last one)."""
    contexts = [call.context for call in calls if call.context is not None]
    revived = any(c.run.agents[c.index].done for c in contexts)
    observers = [call.submit(sync) for call in calls]
    if contexts:
        sync.push(contexts[0].run, contexts[0].criticality)
        if revived:
            sync.soon(contexts[0].run)
    return observers


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_chat(body: ChatCompletionRequest, engine: ServedModel, max_messages: int) -> None:
    """What a chat call can get wrong before its prompt is built (cheap: the handler checks it
    on the loop, and builds the call off it). `max_messages`: the server's limit."""
    check_common(body, engine)
    check_message_count(len(body.messages), max_messages, "messages")
    check_text_length(text_length(body.messages), engine, "messages")


def chat_call(body: ChatCompletionRequest, tools: PromptTools | None,
              context: CallContext | None, engine: ServedModel, *, tenant: str,
              grammar: Callable[[], Grammar | None] | None = None) -> PreparedCall:
    """A call of a body that passed `check_chat`. `tools`: what `chat_tools(body)` returned (the
    caller also needs it to read the reply). `tenant`: the caller's (auth.tenant_of).
    `grammar` compiles the grammar the reply must follow (grammars.chat_grammar), if any: here,
    off the event loop."""
    approximate = context is not None and context.approximate_reuse
    compiled = None if grammar is None else grammar()
    call = messages_call(
        body.messages, segment_marks(body.messages, approximate), body,
        body.max_completion_tokens or body.max_tokens, context, engine,
        request_id=new_request_id("chatcmpl"), param="messages", tenant=tenant, tools=tools)
    if compiled is None:
        return call
    return replace(call, params=replace(call.params, grammar=compiled))


def round_agent_call(body: RoundRequest, agent: str, context: CallContext, engine: ServedModel,
                     *, tenant: str) -> PreparedCall:
    """One agent's call of a round: its own messages, the shared ones (segments by definition),
    then its `after` or the round's instruction."""
    spec = body.agents[agent]
    after = spec.after if spec.after is not None else (body.instruction or [])
    approximate = context.approximate_reuse
    marked = [*segment_marks(spec.messages, approximate), *[True] * len(body.shared),
              *segment_marks(after, approximate)]
    return messages_call([*spec.messages, *body.shared, *after], marked, body, body.max_tokens,
                         context, engine, request_id=new_request_id("round"),
                         param=f"agents.{agent}", tenant=tenant)


def messages_call(messages: list[ChatMessage], marked: list[bool], body: SamplingRequest,
                  max_tokens: int | None, context: CallContext | None, engine: ServedModel, *,
                  request_id: str, param: str, tenant: str,
                  tools: PromptTools | None = None) -> PreparedCall:
    """A call whose prompt is `messages` in the chat template, `marked[i]` saying whether
    message i is a segment; `param` names the messages in a 400. Their text's length was
    checked by the caller, on the loop (`check_text_length`)."""
    turns = message_dicts(messages, param)
    try:
        prompt = render_prompt(engine.tokenizer, turns, marked, tools)
    except (ValueError, TemplateError) as exc:  # no template, or the template refuses the turns
        raise bad_request(f"cannot apply the chat template: {exc}", param=param) from None
    return prepare_call(request_id, body, prompt.token_ids, max_tokens, context, engine,
                        default_max_tokens=None, prompt_param=param, segments=prompt.segments,
                        tenant=tenant)


def check_completion(body: CompletionRequest, engine: ServedModel) -> None:
    """What a completion can get wrong before its prompt is tokenized (see `check_chat`)."""
    check_common(body, engine)
    if isinstance(body.prompt, str):
        check_text_length(len(body.prompt), engine, "prompt")


def completion_call(body: CompletionRequest, context: CallContext | None, engine: ServedModel,
                    *, tenant: str) -> PreparedCall:
    """A call of a body that passed `check_completion`."""
    return prepare_call(new_request_id("cmpl"), body, completion_prompt_ids(body, engine),
                        body.max_tokens, context, engine,
                        default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS, prompt_param="prompt",
                        tenant=tenant)


def prepare_call(request_id: str, body: SamplingRequest, prompt_ids: list[int],
                 max_tokens: int | None, context: CallContext | None, engine: ServedModel, *,
                 default_max_tokens: int | None, prompt_param: str, segments: tuple[Span, ...] = (),
                 tenant: str) -> PreparedCall:
    """`tenant`: the caller's; with the body's cache_salt it makes the salt."""
    resolved = resolve_max_tokens(
        max_tokens, len(prompt_ids), engine.max_model_len, default_max_tokens, prompt_param)
    return PreparedCall(request_id, prompt_ids, sampling_params(body, resolved), tenant,
                        request_salt(tenant, body.cache_salt), segments, context,
                        priority=float(-body.priority))
