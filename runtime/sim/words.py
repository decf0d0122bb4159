"""The tokens a simulated model says: whole words that survive a trip through text.

A real model's output is text: the next prompt quotes it, and the tokenizer reads it again. The
reuse planner finds a quoted output by its token ids (`SegmentIndex.find_within`), so that each
speaker's decode KV serves as the master copy of what it said, and it finds it only because
a real model's text re-tokenizes to the ids it was decoded from. Hashed ids drawn from the whole
vocabulary do not (" qu" + "ick" comes back as " quick"), so in a simulation the quote would not
be found and the first reader would compute every speaker's text: one master per round, not one
per speaker.

So the simulated executor samples only word tokens: ids that decode to a space and ASCII
letters, and that the tokenizer encodes back to that one id. Byte-level BPE tokenizers (GPT-2's,
SmolLM2's, Llama 3's, Qwen2's) split text into pre-tokens at spaces before merging (a space
begins a pre-token: ` ?\\p{L}+`), so any sequence of such tokens is its own tokenization, at the
start of a text or after other text ("name:" + " w1 w2 ..."). tests/sim/test_words.py checks
that on the tokenizers the simulation uses.
"""

from __future__ import annotations

import re

from kvrt.runtime.model.tokenizer import Tokenizer

_WORD = re.compile(r" [A-Za-z]+")


def word_token_ids(tokenizer: Tokenizer, limit: int) -> list[int]:
    """The ids below `limit` that are a space and ASCII letters and encode back to themselves,
    ascending; never an end-of-sequence id. ValueError when there is none."""
    limit = min(limit, tokenizer.vocab_size)
    candidates = [(i, text) for i in range(limit) if i not in tokenizer.eos_token_ids
                  for text in (tokenizer.decode([i], skip_special_tokens=False),)
                  if _WORD.fullmatch(text)]
    encoded = tokenizer.encode_pieces([text for _, text in candidates])
    ids = [i for (i, _), again in zip(candidates, encoded) if again == [i]]
    if not ids:
        raise ValueError(f"no token among the tokenizer's first {limit} is a whole word that "
                         "re-tokenizes to itself: a simulated output could not be quoted")
    return ids
