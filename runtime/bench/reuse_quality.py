"""How good is approximate reuse? `python -m kvrt.runtime.bench.reuse_quality [--model PATH]`.

Multi-agent round prompts: each persona's system prompt, then one shared message holding every
agent's words of the last round, then an instruction. For each ordered pair of personas, the
shared message's KV is taken from the donor's prompt and reused in the reader's at its new
position (`runtime/model/blend.py`), with each recompute ratio (0: shift only) and EPIC-style
first-k at the default ratio's token count; with `--per-message`, also the diff encode (after
the prompt, only a share of the recomputed rows is kept). Against full prefill of the reader's
prompt:
- top-1 agreement: full prefill's 32 greedy tokens are fed to both paths (teacher forcing) and
  the argmax compared at each position;
- KL(full || approximate) of the first generated token's distribution.
Means over the pairs go to stdout (markdown) and `--out` (JSON). `--memory-words N` adds N
words of seeded memories to each persona (as `kvrt bench generative-agents` does), so the
private history the reused block never saw is longer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvrt.runtime.bench.workloads import text
from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.executor import ModelExecutor
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.model.blend import Blend, blend_prefill
from kvrt.runtime.model.dense_forward import DenseKV, dense_forward

PERSONAS = [
    "You are Mara Quinn, the town's baker. You are warm, practical and worried about the price "
    "of flour. You speak plainly and like to offer people bread.",
    "You are Tomas Reyes, a retired sea captain. You are gruff, tell long stories about storms, "
    "and distrust anything built after 1980.",
    "You are Ines Kowalski, a young software engineer who moved here last spring. You are "
    "curious, precise, and you want the town to get faster internet.",
    "You are Father Adebayo, the parish priest. You are patient, quietly funny, and you try to "
    "keep the peace between neighbours.",
    "You are Lena Ortiz, who runs the hardware store. You are blunt, busy, and you keep a list "
    "of everyone who owes you money.",
    "You are Sam Whitfield, a twelve-year-old who walks to school over the Mill Road bridge. "
    "You are excited by anything unusual and you ask a lot of questions.",
]
SHARED = (
    "Here is what everyone said at the town meeting:\n"
    "Mara: The bridge on Mill Road has been closed for a week and my deliveries take twice as "
    "long. Someone has to talk to the county.\n"
    "Tomas: In '74 we had the same trouble and we ran a ferry across the river for a month. It "
    "worked fine, and nobody needed permission.\n"
    "Ines: The county posted on its website that repairs start next Monday and should take ten "
    "days. I can print the notice for the café.\n"
    "Father Adebayo: Then we have ten days to be kind to each other. The parish hall can store "
    "Mara's flour so she makes fewer trips.\n"
    "Mayor Lind: I will call the county tomorrow about a temporary footbridge for the school "
    "children."
)
INSTRUCTION = "It is your turn. In two or three sentences, say what you will do this week."
STEPS = 32  # generated tokens compared, as the issue asks
RATIOS = (0.0, 0.05, 0.15, 0.3, 0.5)
PER_MESSAGE_RATIOS = (0.05, 0.1, 0.15, 0.25)
DIFF_KEEPS = (0.5, 1 / 3, 0.0)  # of the default ratio's recomputed rows, kept after the prompt
DEFAULT_RATIO = 0.15


def pieces(tokenizer, persona: str, per_message: bool = False, messages: list[str] | None = None,
           question: str = INSTRUCTION) -> tuple[list[int], list[int], list[int], list[int]]:
    """(prefix, segment, suffix, message lengths) token ids: the templated prompt split at
    message boundaries, each message tokenized alone (as the runtime's segment finder does).
    `per_message`: the shared text is one message per line (as `kvrt bench generative-agents`
    sends it), each a segment. `messages` and `question` replace the shared text and the
    instruction (`answer_quality.py`'s rounds)."""
    system = {"role": "system", "content": persona}
    if messages is None:
        messages = SHARED.split("\n") if per_message else [SHARED]
    shared = [{"role": "user", "content": line} for line in messages]
    instruction = {"role": "user", "content": question}

    def encode(text: str) -> list[int]:
        return list(tokenizer.hf.encode(text, add_special_tokens=False))

    turns, ids, lengths = [system], [], []
    rendered = tokenizer.render_chat(turns, add_generation_prompt=False)
    prefix = encode(rendered)
    for message in shared:
        turns.append(message)
        longer = tokenizer.render_chat(turns, add_generation_prompt=False)
        assert longer.startswith(rendered)
        piece = encode(longer[len(rendered):])
        ids += piece
        lengths.append(len(piece))
        rendered = longer
    full = tokenizer.render_chat([*turns, instruction])
    assert full.startswith(rendered)
    return prefix, ids, encode(full[len(rendered):]), lengths


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    logits, past = dense_forward(model, prompt, torch.arange(len(prompt)))
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        position = torch.tensor([len(prompt) + len(tokens) - 1])
        logits, new = dense_forward(model, torch.tensor(tokens[-1:]), position, past)
        past = DenseKV.concat([past, new])
        tokens.append(int(logits[-1].argmax()))
    return torch.tensor(tokens)


def segment_kv(model, prefix: torch.Tensor, segment: torch.Tensor) -> DenseKV:
    """The segment's KV as its donor computed it: after the donor's own `prefix`."""
    prompt = torch.cat([prefix, segment])
    _, kv = dense_forward(model, prompt, torch.arange(len(prompt)))
    return kv.select(torch.arange(len(prefix), len(prompt)))


def teacher_forced(model, blend: Blend, reference: torch.Tensor) -> torch.Tensor:
    """[len(reference), vocab]: the logits of each reference token after the blended prompt,
    the reference's earlier tokens decoded over the KV the prompt left (teacher forcing)."""
    start = int(blend.kv.positions[-1]) + 1
    decode_at = torch.arange(start, start + len(reference) - 1)
    decoded, _ = dense_forward(model, reference[:-1], decode_at, blend.kv)
    return torch.cat([blend.logits[-1:], decoded])


def personas(memory_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [p if not memory_words else f"{p}\nYou remember: {text.words(rng, memory_words)}"
            for p in PERSONAS]


def measure(model, tokenizer, pairs: list[tuple[int, int]], memory_words: int = 0,
            per_message: bool = False) -> dict[str, Any]:
    split = {k: pieces(tokenizer, p, per_message)
             for k, p in enumerate(personas(memory_words))}
    if per_message:  # the runtime's selection: the first `ratio` of each message
        lengths = split[0][3]
        modes = {"shift only": {"ratio": 0.0, "pieces": lengths}} | {
            f"first {r:.0%} of each message": {"ratio": r, "pieces": lengths}
            for r in PER_MESSAGE_RATIOS} | {
            f"first {DEFAULT_RATIO:.0%}, keeping {keep:.0%} of the diff": {
                "ratio": DEFAULT_RATIO, "pieces": lengths, "diff_keep": keep}
            for keep in DIFF_KEEPS}
    else:
        modes = {f"ratio {r}": {"ratio": r} for r in RATIOS}
        k_default = math.ceil(DEFAULT_RATIO * len(split[0][1]))
        modes[f"first {k_default} tokens"] = {"first_k": k_default}
    rows: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for donor_index, reader_index in pairs:
        d_prefix, segment, _ = (torch.tensor(x) for x in split[donor_index][:3])
        prefix, segment_r, suffix = (torch.tensor(x) for x in split[reader_index][:3])
        assert torch.equal(segment, segment_r)  # the same words at another position
        reference = greedy(model, torch.cat([prefix, segment, suffix]), STEPS)
        prompt = torch.cat([prefix, segment, suffix, reference[:-1]])
        full, _ = dense_forward(model, prompt, torch.arange(len(prompt)))
        full = full[len(prefix) + len(segment) + len(suffix) - 1:]
        donor_kv = segment_kv(model, d_prefix, segment)
        for mode, how in modes.items():
            blend = blend_prefill(model, prefix, segment, donor_kv, suffix, **how)
            approx = teacher_forced(model, blend, reference)
            agreement = float((approx.argmax(-1) == reference).float().mean())
            kl = float(F.kl_div(F.log_softmax(approx[0], -1), F.log_softmax(full[0], -1),
                                log_target=True, reduction="sum"))
            rows[mode].append((agreement, kl))
    return {
        "pairs": len(pairs), "steps": STEPS, "segment_tokens": len(split[0][1]),
        "message_tokens": split[0][3],
        "prefix_tokens": [len(split[k][0]) for k in split],
        "modes": {mode: {"top1_agreement": sum(a for a, _ in r) / len(r),
                         "first_token_kl": sum(k for _, k in r) / len(r),
                         "min_agreement": min(a for a, _ in r)}
                  for mode, r in rows.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrt.runtime.bench.reuse_quality")
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    parser.add_argument("--memory-words", type=int, default=0,
                        help="seeded memory words added to each persona (default: none)")
    parser.add_argument("--per-message", action="store_true",
                        help="the shared text as one message per speaker, each a segment")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    engine, _ = build_engine(EngineConfig(model=args.model, dtype="float32",
                                          kv_cache_memory=16 * 1024**2))
    assert isinstance(engine.executor, ModelExecutor)
    model, tokenizer = engine.executor.model, engine.tokenizer
    pairs = list(itertools.permutations(range(len(PERSONAS)), 2))
    started = time.perf_counter()
    results = measure(model, tokenizer, pairs, args.memory_words, args.per_message)
    results["seconds"] = time.perf_counter() - started
    print(f"{results['pairs']} donor -> reader pairs; a shared block of "
          f"{results['segment_tokens']} tokens after private prompts of "
          f"{results['prefix_tokens']} tokens; {STEPS} teacher-forced tokens each\n")
    print("| reuse | top-1 agreement (mean / min) | first-token KL |")
    print("|---|---:|---:|")
    for mode, row in results["modes"].items():
        print(f"| {mode} | {row['top1_agreement']:.3f} / {row['min_agreement']:.3f} | "
              f"{row['first_token_kl']:.4f} |")
    write_results(args.out, results)
    return 0


def write_results(out: str | None, results: dict[str, Any]) -> None:
    """The results as JSON at `out` (--out), if given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
