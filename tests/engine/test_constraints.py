"""Constrained decoding in the engine: a random-weight model under a grammar writes only what
the grammar allows, free rows of the same batch are untouched, and EOS waits for the grammar.

Validity is checked with an independent validator (jsonschema_rs), never with the grammar."""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
import torch

from kvrt.runtime.engine.constraints import Constraints, Matcher
from kvrt.runtime.engine.engine import Engine
from kvrt.runtime.engine.protocol import SamplingParams
from kvrt.runtime.server.grammars import Grammars
from tests.engine.helpers import make_engine, request, run

# Bounded (maxLength, maxItems, ranges, enums) so that a random model's output ends well within
# max_tokens; each exercises a different part of JSON Schema.
SCHEMAS = {
    "enum_and_range": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["unit", "days"], "additionalProperties": False},
    "nested_arrays": {
        "type": "object",
        "properties": {"grid": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": {"type": "array", "maxItems": 3,
                                          "items": {"type": "boolean"}}}},
        "required": ["grid"]},
    "refs_and_anyof": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -9,
                                                 "maximum": 9},
                                           "y": {"anyOf": [{"type": "null"},
                                                           {"enum": [1, 2, 3]}]}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"]},
    "pattern_and_strings": {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "name": {"type": "string", "minLength": 1, "maxLength": 6}},
        "required": ["zip", "name"]},
    "array_of_objects": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                   "tag": {"const": "t"}},
                  "required": ["ok", "tag"]}},
    "oneof_and_formats": {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date"},
            "pet": {"oneOf": [
                {"type": "object", "properties": {"cat": {"type": "boolean"}},
                 "required": ["cat"], "additionalProperties": False},
                {"type": "object", "properties": {"dog": {"enum": ["rex", "fido"]}},
                 "required": ["dog"], "additionalProperties": False}]},
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
        # Closed by hand: a schema with a oneOf is generated as given (grammars.generated).
        "required": ["when", "pet", "score"], "additionalProperties": False},
    "open_map": {
        "type": "object", "maxProperties": 3,
        "patternProperties": {"^[a-z]{1,4}$": {"type": "integer", "minimum": 0, "maximum": 9}},
        "additionalProperties": False},
}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_dir) -> Engine:
    return make_engine(tiny_checkpoint_dir(), max_model_len=1024)


@pytest.fixture(scope="module")
def grammars(engine) -> Grammars:
    return Grammars(engine)


def sampled(max_tokens: int, seed: int, grammar=None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=grammar)


def test_a_random_model_under_a_schema_always_writes_valid_json(engine, grammars) -> None:
    """Every schema, several seeds, all in one batch: each reply stops on its own and
    validates against its schema."""
    prompt = engine.tokenizer.encode_piece("Answer in JSON:")
    requests, schemas = [], {}
    for name, schema in SCHEMAS.items():
        grammar = grammars.json_schema(schema, "schema")
        for seed in range(4):
            rid = f"{name}-{seed}"
            requests.append(request(rid, prompt, sampled(400, seed, grammar)))
            schemas[rid] = schema
    results = run(engine, requests)
    for rid, result in results.items():
        assert result.final.finish_reason == "stop", (rid, result.text)
        reply = json.loads(result.text)
        assert jsonschema_rs.validator_for(schemas[rid]).is_valid(reply), (rid, reply)
    assert engine.kv.usage().in_use == 0


def test_a_free_row_samples_the_same_beside_constrained_rows(engine, grammars) -> None:
    prompt = engine.tokenizer.encode_piece("Tell me a story")
    free = sampled(24, seed=7)
    alone = run(engine, [request("free", prompt, free)])["free"].token_ids
    grammar = grammars.json_schema(SCHEMAS["enum_and_range"], "schema")
    mixed = run(engine, [request("c1", prompt, sampled(60, 1, grammar)),
                         request("free", prompt, free),
                         request("c2", prompt, sampled(60, 2, grammar))])
    assert mixed["free"].token_ids == alone
    assert all(mixed[c].final.finish_reason == "stop" for c in ("c1", "c2"))


def test_eos_is_allowed_only_where_the_grammar_may_end(engine, grammars) -> None:
    grammar = grammars.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "required": ["a"]}, "schema")
    [eos] = sorted(engine.tokenizer.eos_token_ids)[:1]
    constraints, matcher = Constraints(engine.vocab_size), Matcher(grammar)
    logits = torch.zeros(2, engine.vocab_size)
    logits[:, eos] = 100.0  # EOS by far the likeliest, in both rows
    constraints.mask(logits, [matcher, None])
    assert logits[0, eos] == float("-inf")  # nothing written yet: no stop
    assert logits[1].eq(torch.zeros(engine.vocab_size).index_fill(0, torch.tensor(eos),
                                                                  100.0)).all()  # free row
    for token in engine.tokenizer.encode_piece('{"a": 12}'):
        assert matcher.accept(token)
    logits = torch.zeros(1, engine.vocab_size)
    constraints.mask(logits, [matcher])
    assert logits[0, eos] == 0.0  # complete: the stop is allowed
    assert matcher.accept(eos) and matcher.terminated


def test_the_engine_refuses_a_grammar_for_another_vocabulary(engine, grammars) -> None:
    from dataclasses import replace

    from kvrt.runtime.engine.protocol import RequestRejected

    grammar = replace(grammars.json_schema({"type": "object"}, "schema"), vocab_size=7)
    with pytest.raises(RequestRejected, match="vocabulary"):
        engine.validate(request("r", [1, 2], sampled(4, 0, grammar)))


# ---- tool calls under "auto": free text, and a call once begun -------------------------------

WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                      "required": ["city", "days"]}


def auto_tools_grammar(grammars: Grammars, **fields):
    from kvrt.runtime.server.grammars import chat_grammar
    from kvrt.runtime.server.tool_parsers import make_tool_parser
    from kvrt.sdk.protocol.openai_api import chat_request_decoder

    body = chat_request_decoder.decode(json.dumps({
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": WEATHER_PARAMETERS}},
                  {"type": "function", "function": {"name": "get_time"}}],
        **fields}))
    return chat_grammar(body, make_tool_parser("hermes"), grammars)


def sample_to_the_end(engine: Engine, matcher: Matcher, seed: int, limit: int = 300) -> list[int]:
    """Draws tokens from random logits under the matcher's mask until the grammar ends."""
    constraints, generator = Constraints(engine.vocab_size), torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while not matcher.terminated and len(tokens) < limit:
        logits = torch.randn(1, engine.vocab_size, generator=generator)
        constraints.mask(logits, [matcher])
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        assert matcher.accept(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("seed", range(6))
def test_a_call_begun_under_auto_is_completed_validly(engine, grammars, seed) -> None:
    from kvrt.runtime.server.tool_parsers import make_tool_parser

    matcher = Matcher(auto_tools_grammar(grammars, tool_choice="auto",
                                         parallel_tool_calls=False))
    begun = "Let me look that up. <tool_call>"
    for token in engine.tokenizer.encode_piece(begun):
        assert matcher.accept(token)  # free text, then the opening
    tokens = sample_to_the_end(engine, matcher, seed)
    assert matcher.terminated
    reply = make_tool_parser("hermes").parse(begun + engine.tokenizer.hf.decode(tokens))
    assert len(reply.calls) == 1, reply
    call = reply.calls[0]
    schema = WEATHER_PARAMETERS if call.name == "get_weather" else {"type": "object"}
    assert call.name in ("get_weather", "get_time")
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(call.arguments))


def test_auto_leaves_text_without_an_opening_free(engine, grammars) -> None:
    matcher = Matcher(auto_tools_grammar(grammars))
    text = 'Any text at all: {"not": "a call"} <tool> </tool_call> done.'
    assert all(matcher.accept(t) for t in engine.tokenizer.encode_piece(text))
    [eos] = sorted(engine.tokenizer.eos_token_ids)[:1]
    assert matcher.accept(eos) and matcher.terminated


def test_a_named_choice_allows_only_that_function(engine, grammars) -> None:
    grammar = auto_tools_grammar(grammars, tool_choice={"type": "function",
                                                        "function": {"name": "get_time"}})
    begun = engine.tokenizer.encode_piece('<tool_call>\n{"name": "get_')
    for name, allowed in (("time", True), ("weather", False)):
        matcher = Matcher(grammar)
        assert all(matcher.accept(t) for t in begun)
        assert all(matcher.accept(t) for t in engine.tokenizer.encode_piece(name)) == allowed


@pytest.mark.parametrize("vocab", [32, 100, 49152])
def test_the_bitmask_forbids_exactly_its_zero_bits(vocab: int) -> None:
    """The byte-table apply against a bit-by-bit reference, over a vocabulary that is not a
    multiple of 32 too."""
    from kvrt.runtime.engine.constraints import ByteMask

    byte_mask = ByteMask(torch.device("cpu"))
    for seed in range(2):  # twice: the second call reuses the buffers
        generator = torch.Generator().manual_seed(vocab + seed)
        words = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32,
                              generator=generator)
        logits = torch.randn(3, vocab, generator=generator)
        expected = logits.clone()
        for r in range(3):
            for t in range(vocab):
                if not (int(words[r, t // 32]) >> (t % 32)) & 1:
                    expected[r, t] = float("-inf")
        assert torch.equal(logits + byte_mask.biases(words, vocab), expected)
