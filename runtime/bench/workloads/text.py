"""Seeded filler text for the workloads: plain English words, so any tokenizer splits it into a
realistic number of tokens (about 1.3 per word for BPE vocabularies)."""

from __future__ import annotations

import random

_WORDS = """
the a of to and in that it for on with as was at by an be this from or have not are but
which one all their there been has more when will would who so if out up about into than
them can only other new some could time these two may first then do any like my now over
such our man me even most made after also did many before must through back years where
much your way well down should because each just those people how too little state good
very make world still own see men work long get here between both life being under never
day same another know while last might us great old year off come since against go came
right used take three village market river garden letter bridge winter summer harbor
lantern orchard library workshop painter baker farmer teacher sailor doctor merchant
council festival rumor secret promise journey storm harvest debt friendship quarrel
""".split()


def words(rng: random.Random, count: int) -> str:
    """`count` words in sentences of 6 to 14 words."""
    out: list[str] = []
    while len(out) < count:
        sentence = [rng.choice(_WORDS) for _ in range(min(rng.randint(6, 14), count - len(out)))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out.extend(sentence)
    return " ".join(out)


def name(rng: random.Random) -> str:
    first = ["Ada", "Bo", "Cyr", "Dana", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
    last = ["Moss", "Reed", "Stone", "Vale", "Wren", "Hart", "Lind", "Cole", "Frey", "Park"]
    return f"{rng.choice(first)} {rng.choice(last)}"
