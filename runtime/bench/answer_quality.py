"""Quality measured on answers: `python -m kvrt.runtime.bench.answer_quality [--model PATH]`.

Seeded rounds: each round has its own personas (name and job) and a town meeting whose
speakers plant facts (a day, a number, a name, a place); the meeting is the shared text, one
message per line, each a segment (as `kvrt bench generative-agents` sends it). Each persona is
asked one question about a planted fact, or, once a round, about its own persona. For each
ordered pair of the round's personas, the meeting's KV is taken from the donor's prompt and
reused in the reader's as the runtime does (`reuse_quality.py`'s per-message mode: the first
`ratio` of each message recomputed, `diff_keep` of those rows kept; with `--reads run`, as a
collective round reads the meeting, one copy of the run of messages: the first `ratio` of its
first message recomputed), and the reader's answer
is generated greedily (up to 24 tokens, to a newline or EOS) from that KV and from full
prefill. Per ratio:
- exact match: the two answers equal after strip;
- fact recall: the planted key word (the day, the number...) is in the answer, with reuse and
  with full prefill, separately (a model may get a fact wrong either way);
- top-1 agreement: full prefill's answer tokens fed to the blended KV (teacher forcing,
  `reuse_quality.teacher_forced`), so both figures come from one run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvrt.runtime.bench.reuse_quality import pieces, segment_kv, teacher_forced, write_results
from kvrt.runtime.config import EngineConfig
from kvrt.runtime.engine.executor import ModelExecutor
from kvrt.runtime.engine.factory import build_engine
from kvrt.runtime.kv.reuse.config import ReuseConfig
from kvrt.runtime.model.blend import blend_prefill
from kvrt.runtime.model.dense_forward import DenseKV, dense_forward

MAX_TOKENS = 24
RATIOS = (0.0, ReuseConfig().recompute_ratio, 0.3)
FIRST = ["Mara", "Tomas", "Ines", "Omar", "Lena", "Sam", "Greta", "Yusuf", "Nadia", "Piet"]
LAST = ["Quinn", "Reyes", "Kowalski", "Adebayo", "Ortiz", "Whitfield", "Lind", "Novak", "Brandt"]
JOBS = ["baker", "fisherman", "nurse", "postman", "carpenter", "teacher", "pharmacist", "farmer"]
TRAITS = ["warm and practical", "gruff and stubborn", "curious and precise",
          "patient and quietly funny", "blunt and busy", "cheerful and talkative"]
DRAWS = {
    "street": ["Mill Road", "Harbor Lane", "Oak Street", "Station Road", "Church Lane"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "hour": [str(h) for h in range(1, 12)],
    "event": ["spring fair", "book sale", "harvest dinner", "chess tournament", "choir concert"],
    "place": ["library", "firehouse", "gym", "chapel", "boathouse", "bakery"],
    "number": [str(n) for n in range(12, 98)],
    "owner": FIRST,
    "dog": ["Biscuit", "Pepper", "Otto", "Maple", "Ziggy", "Nutmeg"],
    "city": ["Leeds", "Porto", "Lyon", "Bergen", "Tampere", "Gdansk"],
    "platform": [str(n) for n in range(2, 10)],
    "role": ["treasurer", "fire chief", "librarian", "harbor master"],
    "chosen": LAST,
}
# (statement, question, the draw whose value the answer must hold)
FACTS = [
    ("The bridge on {street} closes on {day} at {hour} pm.",
     "On which day does the bridge on {street} close?", "day"),
    ("The {event} will be held at the {place} this year.",
     "Where will the {event} be held this year?", "place"),
    ("The new roof for the school cost {number} thousand dollars.",
     "How many thousand dollars did the new roof for the school cost?", "number"),
    ("{owner}'s new dog is called {dog}.", "What is {owner}'s new dog called?", "dog"),
    ("The train to {city} now leaves from platform {platform}.",
     "From which platform does the train to {city} leave now?", "platform"),
    ("The council chose Mr {chosen} as the new {role}.",
     "Whom did the council choose as the new {role}?", "chosen"),
]
ANSWER = "Answer in a few words, from what was said at the meeting. {}"


@dataclass(frozen=True, slots=True)
class Question:
    text: str  # the reader's instruction
    key: str  # the word a right answer holds
    about: str  # "fact" or "persona"


@dataclass(frozen=True, slots=True)
class Round:
    personas: list[str]  # system prompts
    messages: list[str]  # the shared meeting, one message per line
    questions: list[Question]  # one per persona


def make_round(rng: random.Random, agents: int) -> Round:
    """Personas with distinct names and jobs; a meeting where each speaker plants one fact
    (facts and values drawn from the lists above); each persona asked about one of them, and
    one persona (drawn) about its own job or name instead."""
    firsts, lasts = rng.sample(FIRST, agents), rng.sample(LAST, agents)
    jobs = rng.sample(JOBS, agents)
    personas = [f"You are {f} {s}, the town's {j}. You are {rng.choice(TRAITS)}, and you "
                f"speak plainly." for f, s, j in zip(firsts, lasts, jobs)]
    lines, asked = ["Here is what everyone said at the town meeting:"], []
    for speaker, (statement, question, key) in zip(firsts, rng.sample(FACTS, agents)):
        values = {name: rng.choice(choices) for name, choices in DRAWS.items()}
        lines.append(f"{speaker}: {statement.format(**values)}")
        asked.append(Question(ANSWER.format(question.format(**values)), values[key], "fact"))
    own = rng.randrange(agents)
    job = rng.random() < 0.5
    asked[own] = Question("Answer in a few words. " + ("What is your job?" if job
                                                      else "What is your family name?"),
                          jobs[own] if job else lasts[own], "persona")
    return Round(personas, lines, asked)


def make_rounds(seed: int, count: int, agents: int) -> list[Round]:
    rng = random.Random(seed)
    return [make_round(rng, agents) for _ in range(count)]


def answer(model, tokenizer, logits: torch.Tensor, kv: DenseKV) -> list[int]:
    """Greedy tokens after a prompt whose last logits and KV are given, up to MAX_TOKENS; the
    token that ends the answer (EOS, or one holding a newline) is the last one."""
    tokens = [int(logits.argmax())]
    while len(tokens) < MAX_TOKENS and not ends(tokenizer, tokens[-1]):
        position = torch.tensor([int(kv.positions[-1]) + 1])
        logits, new = dense_forward(model, torch.tensor(tokens[-1:]), position, kv)
        kv = DenseKV.concat([kv, new])
        tokens.append(int(logits[-1].argmax()))
    return tokens


def ends(tokenizer, token: int) -> bool:
    return token in tokenizer.eos_token_ids or "\n" in tokenizer.decode([token])


def measure(model, tokenizer, rounds: list[Round], ratios: tuple[float, ...],
            diff_keep: float, run: bool = False) -> dict[str, Any]:
    rows: dict[float, list[dict[str, Any]]] = {r: [] for r in ratios}
    for number, round_ in enumerate(rounds):
        split = [pieces(tokenizer, p, messages=round_.messages, question=q.text)
                 for p, q in zip(round_.personas, round_.questions)]
        for donor, reader in itertools.permutations(range(len(split)), 2):
            d_prefix, segment = (torch.tensor(x) for x in split[donor][:2])
            prefix, segment_r, suffix = (torch.tensor(x) for x in split[reader][:3])
            assert torch.equal(segment, segment_r)  # the same meeting at another position
            prompt = torch.cat([prefix, segment, suffix])
            logits, kv = dense_forward(model, prompt, torch.arange(len(prompt)))
            reference = answer(model, tokenizer, logits[-1], kv)
            donor_kv = segment_kv(model, d_prefix, segment)
            question, full_text = round_.questions[reader], text_of(tokenizer, reference)
            for ratio in ratios:
                messages = split[reader][3]
                how = ({"first_k": math.ceil(ratio * messages[0])} if run
                       else {"ratio": ratio, "pieces": messages})
                blend = blend_prefill(model, prefix, segment, donor_kv, suffix,
                                      diff_keep=diff_keep, **how)
                reused = answer(model, tokenizer, blend.logits[-1], blend.kv)
                forced = teacher_forced(model, blend, torch.tensor(reference)).argmax(-1)
                reused_text = text_of(tokenizer, reused)
                rows[ratio].append({
                    "round": number, "donor": donor, "reader": reader, "about": question.about,
                    "key": question.key, "full": full_text, "reused": reused_text,
                    "exact": reused_text == full_text,
                    "recall_full": recalls(question.key, full_text),
                    "recall_reused": recalls(question.key, reused_text),
                    "agreement": float((forced == torch.tensor(reference)).float().mean())})
    return {"ratios": {str(r): summary(rs) for r, rs in rows.items()},
            "answers": {str(r): rs for r, rs in rows.items()}}


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens).strip()


def recalls(key: str, text: str) -> bool:
    """The key as a word ("9" is not recalled by "90")."""
    return re.search(rf"\b{re.escape(key)}\b", text, re.IGNORECASE) is not None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(field: str, about: str | None = None) -> float:
        some = [r for r in rows if about is None or r["about"] == about]
        return sum(r[field] for r in some) / len(some) if some else float("nan")

    return {"pairs": len(rows), "exact": rate("exact"),
            "exact_fact": rate("exact", "fact"), "exact_persona": rate("exact", "persona"),
            "recall_reused": rate("recall_reused"), "recall_full": rate("recall_full"),
            "top1_agreement": rate("agreement"),
            "min_agreement": min(r["agreement"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrt.runtime.bench.answer_quality")
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--agents", type=int, default=3, help="personas per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--diff-keep", type=float, default=ReuseConfig().diff_keep,
                        help="share of the recomputed rows kept after the prompt")
    parser.add_argument("--reads", choices=("messages", "run"), default="messages",
                        help="the meeting read message by message, or as one run")
    parser.add_argument("--out", default=None, help="write the results here (JSON)")
    args = parser.parse_args(argv)
    if not 2 <= args.agents <= len(FACTS):
        parser.error(f"--agents must be between 2 and {len(FACTS)}")
    engine, _ = build_engine(EngineConfig(model=args.model, dtype="float32",
                                          kv_cache_memory=16 * 1024**2))
    assert isinstance(engine.executor, ModelExecutor)
    rounds = make_rounds(args.seed, args.rounds, args.agents)
    started = time.perf_counter()
    results = measure(engine.executor.model, engine.tokenizer, rounds, tuple(args.ratios),
                      args.diff_keep, args.reads == "run")
    results |= {"seconds": time.perf_counter() - started, "seed": args.seed,
                "diff_keep": args.diff_keep, "reads": args.reads,
                "rounds": [asdict(r) for r in rounds]}
    print(f"{args.rounds} rounds of {args.agents} personas (seed {args.seed}), every ordered "
          f"pair; answers of up to {MAX_TOKENS} greedy tokens; diff keep {args.diff_keep:.3g}; "
          f"the meeting read by {args.reads}\n")
    print("| recompute ratio | pairs | exact answers (all / fact / persona) | "
          "fact recall, reuse / full | top-1 agreement (mean / min) |")
    print("|---:|---:|---:|---:|---:|")
    for ratio, row in results["ratios"].items():
        print(f"| {ratio} | {row['pairs']} | {row['exact']:.3f} / {row['exact_fact']:.3f} / "
              f"{row['exact_persona']:.3f} | {row['recall_reused']:.3f} / "
              f"{row['recall_full']:.3f} | {row['top1_agreement']:.3f} / "
              f"{row['min_agreement']:.3f} |")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
