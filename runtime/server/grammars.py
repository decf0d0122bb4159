"""The grammar a chat call's reply must follow, compiled (llguidance) for the served model.

What a chat asks for decides it:

    tools offered, tool_choice          reply                                   grammar
    ----------------------------------  --------------------------------------  -------------
    named function                      one valid call of it                    call
    "required"                          calls only: one, or several with        calls
                                        parallel_tool_calls, each a valid call
                                        of an offered tool
    "auto" (or unset)                   free text; a call, once the parser's    text, calls
                                        opening is written, completed validly   when opened
    "auto" + response_format json       the JSON, or calls                      json | calls
    none / "none"                       response_format's JSON, or free text    json, or none

A call's form is the tool parser's (`ToolParser.call_form`), so what the grammar lets the model
write is what the parser reads back as `tool_calls`. Schemas are closed (`closed_schema`) and
written on one line with json.dumps' separators. Compiling happens on the prompt workers'
threads (model_calls.chat_call), never on the event loop, and each grammar is compiled once: a
cache keyed by its text. A schema llguidance cannot compile is a 400 naming its field.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from kvrt.runtime.engine.constraints import Grammar
from kvrt.runtime.server.errors import bad_request
from kvrt.sdk.protocol.openai_api import ChatCompletionRequest, NamedToolChoice

if TYPE_CHECKING:
    from kvrt.runtime.model.tokenizer import Tokenizer
    from kvrt.runtime.server.tool_parsers import ToolParser

# Grammars kept compiled (an agent framework sends the same tools with every call).
CACHE_ENTRIES = 512
# One line, as json.dumps writes JSON (and as the tools prompt shows calls): no free whitespace,
# which a small model could spend its whole max_tokens on.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any object: OpenAI's json_object mode, and a function without parameters.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
RESPONSE_SCHEMA = "response_format.json_schema.schema"


class CompiledFor(Protocol):
    """What the grammars are compiled for: the served model (an AsyncEngine is one)."""

    tokenizer: Tokenizer
    vocab_size: int


class Grammars:
    """Compiles grammars for one model. Built with the app; llguidance's view of the tokenizer
    (which reads the whole vocabulary: ~0.5 s) on the first constrained call. Thread-safe."""

    def __init__(self, model: CompiledFor) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()

    def json_schema(self, schema: dict[str, Any], param: str) -> Grammar:
        """The grammar of JSON valid against `schema` (closed: see `closed_schema`)."""
        from llguidance import LLMatcher

        try:
            lark = LLMatcher.grammar_from_json_schema(generated(schema))
        except (ValueError, TypeError) as exc:
            raise bad_request(f"{param} is not a JSON schema llguidance can compile: {exc}",
                              param=param) from None
        return self.compile(lark, param)

    def compile(self, grammar: str, param: str) -> Grammar:
        """A grammar (llguidance's Lark, or its JSON form) compiled; a 400 naming `param` if it
        does not compile."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                return cached
        from llguidance import LLMatcher

        tokenizer = self.tokenizer()
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        template = None if error else LLMatcher(tokenizer, grammar, log_level=0)
        if template is None or template.is_error():
            reason = error or template.get_error()  # type: ignore[union-attr]
            raise bad_request(f"{param} cannot be compiled into a grammar: {reason}",
                              param=param)
        compiled = Grammar(template, self._model.vocab_size, grammar)
        with self._lock:
            self._cache[grammar] = compiled
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return compiled

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                from llguidance.hf import from_tokenizer

                tokenizer = self._model.tokenizer
                self._tokenizer = from_tokenizer(tokenizer.hf, n_vocab=self._model.vocab_size,
                                                 eos_token=sorted(tokenizer.eos_token_ids))
            return self._tokenizer


GRAMMARS = web.AppKey("grammars", Grammars)


def generated(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as llguidance compiles it: closed, and written as JSON_OPTIONS say. A schema
    with a oneOf anywhere stays open: an object that matches one closed branch may match two of
    the branches as given, which oneOf forbids."""
    has_one_of = '"oneOf"' in json.dumps(schema)
    return {**(schema if has_one_of else closed_schema(schema)), "x-guidance": JSON_OPTIONS}


def closed_schema(schema: Any) -> Any:
    """`schema` with `"additionalProperties": false` on each object schema that lists its
    properties and says nothing of others: what OpenAI's strict mode asks of a schema. Every
    output stays valid against the schema as given; a model is kept from inventing keys (a
    small one could go on inventing them to max_tokens). allOf's branches are left as they are:
    closing each would forbid the keys the others add."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_schema(sub) for name, sub in closed[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [closed_schema(sub) for sub in closed[key]]
    for key in _SCHEMAS:
        if key in closed:
            sub = closed[key]
            closed[key] = ([closed_schema(s) for s in sub] if isinstance(sub, list)
                           else closed_schema(sub))
    if "properties" in closed and not any(key in closed for key in _OPEN_KEYS):
        closed["additionalProperties"] = False
    return closed


# The keywords whose values are schemas that an output must match (closing them only narrows
# what is generated): by name, in a list, or one (or a list: old `items`). `not` and `if` are
# left alone: closing a schema there would widen what passes.
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "additionalItems", "then", "else", "contains",
            "unevaluatedItems", "unevaluatedProperties")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def chat_grammar(body: ChatCompletionRequest, parser: ToolParser,
                 grammars: Grammars) -> Grammar | None:
    """The grammar of a chat's reply (see the module docstring), or None for free text. Run
    off the event loop: compiling a large schema takes a while."""
    content = _content_schema(body, grammars)
    tools = body.tools or []
    if not tools or body.tool_choice == "none":
        return None if content is None else grammars.json_schema(*content)
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    specs = []
    for i, tool in enumerate(tools):
        parameters = tool.function.parameters
        schema = ANY_OBJECT if parameters is None else parameters
        param = f"tools[{i}].function.parameters"
        if schema.get("type", "object") != "object":  # arguments are an object (OpenAI's rule)
            raise bad_request(f"{param} must be an object schema (type \"object\"), as a call's "
                              "arguments are an object", param=param)
        # Each schema alone first, so that a 400 names the tool whose schema fails.
        grammars.json_schema(schema, param)
        if named is None or tool.function.name == named:
            specs.append((tool.function.name, generated(schema)))
    form = parser.call_form(specs)
    # A named function is called once, as vLLM's named tool choice does (a small model would
    # otherwise repeat the call until max_tokens).
    one = body.parallel_tool_calls is False or named is not None
    calls = "call" if one else 'call ("\\n" call)*'
    if named is not None or choice == "required":
        start = f"start: {calls}"
    elif content is not None:
        schema = json.dumps(generated(content[0]), ensure_ascii=False)
        start = f"start: answer | {calls}\nanswer: %json {schema}"
    else:
        start = form.free_text_start(one)
    return grammars.compile(form.lark(start), "tools")


def _content_schema(body: ChatCompletionRequest,
                    grammars: Grammars) -> tuple[dict[str, Any], str] | None:
    """The schema the reply's content must follow and the field that holds it (None: free
    text). Compiled alone here, so that a 400 names response_format's field."""
    spec = body.response_format
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return ANY_OBJECT, "response_format"
    if spec.json_schema is None or spec.json_schema.schema is None:
        raise bad_request('response_format of type "json_schema" needs json_schema.schema',
                          param=RESPONSE_SCHEMA)
    grammars.json_schema(spec.json_schema.schema, RESPONSE_SCHEMA)
    return spec.json_schema.schema, RESPONSE_SCHEMA
