"""xgrammar beside llguidance on the default model's tokenizer (SmolLM2-135M, 49,152 tokens):
the measurement behind kvrt's choice of llguidance (docs/structured_output.md).

    pip install --no-deps xgrammar apache-tvm-ffi   # llguidance is in kvrt's serve extra
    PYTHONSAFEPATH=1 python docs/benchmarks/grammar_libraries.py [--out docs/benchmarks]

Per schema: compile time (grammar + first matcher), whether a valid instance's tokens are all
accepted and the grammar then takes EOS, and the per-token cost of one matcher (fill the
bitmask, then advance by the token; median over the instance's tokens). Then a batch of 16
matchers over 16 schemas (fill each, apply to [16, vocab] logits, advance each), per step.
Then correctness probes: strings must not take raw control characters (JSON forbids them), and
bad schemas must be refused. Writes grammar_libraries.json and grammar_libraries.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

VOCAB = 49152
SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "flat": ({"type": "object", "properties": {"city": {"type": "string"},
              "days": {"type": "integer", "minimum": 1, "maximum": 14}},
              "required": ["city", "days"], "additionalProperties": False},
             {"city": "Paris", "days": 3}),
    "enum+anyOf": ({"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                    "v": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
                    "required": ["unit", "v"]}, {"unit": "c", "v": 12.5}),
    "$ref/$defs": ({"$defs": {"pt": {"type": "object", "properties": {
                    "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"},
                                                     "b": {"$ref": "#/$defs/pt"}},
                    "required": ["a", "b"]}, {"a": {"x": 1, "y": 2}, "b": {"x": 3.5, "y": -1}}),
    "nested arrays": ({"type": "object", "properties": {"grid": {"type": "array", "items": {
                       "type": "array", "items": {"type": "integer"}, "minItems": 1,
                       "maxItems": 3}, "minItems": 2}}, "required": ["grid"]},
                      {"grid": [[1, 2], [3], [4, 5, 6]]}),
    "additionalProperties": ({"type": "object", "additionalProperties": {"type": "integer"}},
                             {"apples": 3, "pears": 4}),
    "pattern": ({"type": "object", "properties": {
                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                 "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"}},
                 "required": ["zip", "code"]}, {"zip": "75001", "code": "FR-12"}),
    "recursive": ({"$defs": {"node": {"type": "object", "properties": {
                   "name": {"type": "string"},
                   "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                   "required": ["name", "children"]}}, "$ref": "#/$defs/node"},
                  {"name": "root", "children": [{"name": "a", "children": []}]}),
    "oneOf/allOf/const": ({"type": "object", "properties": {"kind": {"const": "pet"},
                           "animal": {"oneOf": [
                               {"type": "object", "properties": {"cat": {"type": "boolean"}},
                                "required": ["cat"], "additionalProperties": False},
                               {"type": "object", "properties": {"dog": {
                                   "type": "string", "minLength": 2, "maxLength": 8}},
                                "required": ["dog"], "additionalProperties": False}]},
                           "tags": {"allOf": [{"type": "array", "items": {"type": "string"}}]}},
                           "required": ["kind", "animal"]},
                          {"kind": "pet", "animal": {"dog": "rex"}, "tags": ["a"]}),
    "format": ({"type": "object", "properties": {
                "at": {"type": "string", "format": "date-time"},
                "mail": {"type": "string", "format": "email"}}, "required": ["at", "mail"]},
               {"at": "2026-12-07T12:00:00Z", "mail": "a@b.co"}),
    "long text": ({"type": "object", "properties": {"summary": {"type": "string"},
                   "items": {"type": "array", "items": {"type": "object", "properties": {
                       "title": {"type": "string"}, "score": {"type": "number"},
                       "ok": {"type": "boolean"}}, "required": ["title", "score", "ok"]}}},
                   "required": ["summary", "items"]},
                  {"summary": "The quick brown fox jumps over the lazy dog while the weather "
                   "in Paris stays mild and the market opens.",
                   "items": [{"title": "first item here", "score": 0.5, "ok": True},
                             {"title": "second", "score": 12, "ok": False}]}),
}
BAD = {"unknown type": {"type": "bogus"}, "dangling $ref": {"$ref": "#/$defs/missing"},
       "bad pattern": {"type": "string", "pattern": "(unclosed"}}
CONTROL_PROBES = {"string": {"type": "string"},
                  "string with maxLength": {"type": "string", "maxLength": 6}}


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf, eos: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=os.cpu_count())

    def matcher(self, schema):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, strict_mode=False))

    def bitmask(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, VOCAB)

    def fill(self, m, bitmask, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def apply(self, logits, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def advance(self, m, token: int) -> bool:
        return bool(m.accept_token(token))

    def done(self, m) -> bool:
        return bool(m.is_terminated())


class Llguidance:
    name = "llguidance"

    def __init__(self, hf, eos: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=VOCAB, eos_token=eos)
        self.executor = llguidance.LLExecutor()

    def matcher(self, schema):
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        m = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def bitmask(self, rows: int):
        return self.lt.allocate_token_bitmask(rows, VOCAB)

    def fill(self, m, bitmask, row: int) -> None:
        self.lt.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, ms, bitmask) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)],
                                            bitmask)

    def apply(self, logits, bitmask) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)

    def advance(self, m, token: int) -> bool:
        return bool(m.consume_token(token))

    def done(self, m) -> bool:
        return bool(m.is_stopped())


def per_schema(lib, hf, eos: int) -> dict[str, Any]:
    out = {}
    for name, (schema, instance) in SCHEMAS.items():
        start = time.perf_counter()
        m = lib.matcher(schema)
        compile_ms = 1e3 * (time.perf_counter() - start)
        tokens = hf.encode(json.dumps(instance), add_special_tokens=False) + [eos]
        bitmask, costs, accepted = lib.bitmask(1), [], True
        for token in tokens:
            start = time.perf_counter()
            lib.fill(m, bitmask, 0)
            allowed = bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)
            ok = lib.advance(m, token)
            costs.append(time.perf_counter() - start)
            if not (allowed and ok):
                accepted = False
                break
        out[name] = {"compile_ms": round(compile_ms, 2), "accepts_instance":
                     accepted and lib.done(m), "us_per_token":
                     round(1e6 * statistics.median(costs), 1)}
    return out


def batch16(lib, hf, eos: int) -> dict[str, float]:
    names = list(SCHEMAS)
    pairs = [SCHEMAS[names[i % len(names)]] for i in range(16)]
    ms = [lib.matcher(schema) for schema, _ in pairs]
    seqs = [hf.encode(json.dumps(inst), add_special_tokens=False) for _, inst in pairs]
    bitmask, logits = lib.bitmask(16), torch.randn(16, VOCAB)
    fill, fill_batch, apply, advance = [], [], [], []
    for k in range(min(len(s) for s in seqs)):
        t0 = time.perf_counter()
        for i, m in enumerate(ms):
            lib.fill(m, bitmask, i)
        t1 = time.perf_counter()
        lib.fill_batch(ms, bitmask)
        t2 = time.perf_counter()
        lib.apply(logits, bitmask)
        t3 = time.perf_counter()
        for m, seq in zip(ms, seqs):
            lib.advance(m, seq[k])
        t4 = time.perf_counter()
        fill.append(t1 - t0)
        fill_batch.append(t2 - t1)
        apply.append(t3 - t2)
        advance.append(t4 - t3)
    return {key: round(1e3 * statistics.median(v), 3) for key, v in (
        ("fill_loop_ms", fill), ("fill_batch_ms", fill_batch), ("apply_ms", apply),
        ("advance_ms", advance))}


def probes(lib, hf) -> dict[str, Any]:
    out = {}
    for name, schema in CONTROL_PROBES.items():
        m = lib.matcher(schema)
        tokens = hf.encode('"a\x07', add_special_tokens=False)
        out[f"takes a raw control character ({name})"] = all(lib.advance(m, t) for t in tokens)
    for name, schema in BAD.items():
        try:
            lib.matcher(schema)
            out[f"refuses {name}"] = False
        except Exception:  # noqa: BLE001 - each library raises its own
            out[f"refuses {name}"] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    from kvrt.runtime.model.checkpoint import load_checkpoint

    hf = load_checkpoint(None).tokenizer.hf
    eos = hf.eos_token_id
    result: dict[str, Any] = {"load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    for cls in (Xgrammar, Llguidance):
        start = time.perf_counter()
        lib = cls(hf, eos)
        result[cls.name] = {"tokenizer_s": round(time.perf_counter() - start, 2),
                            "schemas": per_schema(lib, hf, eos),
                            "batch16": batch16(lib, hf, eos), "probes": probes(lib, hf)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grammar_libraries.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "grammar_libraries.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    x, g = r["xgrammar"], r["llguidance"]
    lines = [f"SmolLM2-135M tokenizer ({VOCAB} tokens); load average {r['load_avg_1m']:.1f} "
             f"on {r['cpus']} CPUs.", "",
             "| schema | compile ms (xgr / llg) | us per token (xgr / llg) | valid instance "
             "accepted (xgr / llg) |", "|---|---|---|---|"]
    for name in SCHEMAS:
        a, b = x["schemas"][name], g["schemas"][name]
        lines.append(f"| {name} | {a['compile_ms']} / {b['compile_ms']} | {a['us_per_token']} "
                     f"/ {b['us_per_token']} | {a['accepts_instance']} / "
                     f"{b['accepts_instance']} |")
    lines += ["", "| batch of 16, per step (ms) | xgrammar | llguidance |", "|---|---|---|"]
    for key in x["batch16"]:
        lines.append(f"| {key} | {x['batch16'][key]} | {g['batch16'][key]} |")
    lines += ["", "| probe | xgrammar | llguidance |", "|---|---|---|"]
    for key in x["probes"]:
        lines.append(f"| {key} | {x['probes'][key]} | {g['probes'][key]} |")
    lines += ["", f"Tokenizer setup: xgrammar {x['tokenizer_s']} s, llguidance "
              f"{g['tokenizer_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
