"""Turns a sequence's new tokens into text increments, and decides when it stops.

Stop strings are cut from the text (kept, with what comes before them, when the request asks
`include_stop_str_in_output`, vLLM's field), and text that might be the start of a stop string
is held back until it is known not to be one, so a streaming client never sees part of a stop
string it will not get whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrt.runtime.engine.protocol import FinishReason, SamplingParams


@dataclass(slots=True)
class OutputText:
    params: SamplingParams
    detokenizer: object  # IncrementalDetokenizer: push(token_id) -> str, flush() -> str
    eos_token_ids: frozenset[int]
    held: str = ""  # decoded text not yet emitted (could begin a stop string)

    def add_token(self, token_id: int, num_output: int) -> tuple[str, FinishReason | None]:
        """Feeds one sampled token; returns (text to emit now, finish reason or None)."""
        p = self.params
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            return self._flush(), "stop"
        self.held += self.detokenizer.push(token_id)
        for stop in p.stop:
            cut = self.held.find(stop)
            if cut >= 0:
                text, self.held = self.held[: self._end_at(cut, stop)], ""
                return text, "stop"
        if num_output >= p.max_tokens:
            return self._flush(), "length"
        return self._release(), None

    def finish_text(self) -> str:
        """Whatever is still held when the sequence ends for another reason (context full)."""
        return self._flush()

    def _release(self) -> str:
        keep = max((len(s) - 1 for s in self.params.stop), default=0)
        keep = max((k for k in range(keep, 0, -1) if self._could_start_stop(k)), default=0)
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text

    def _could_start_stop(self, tail_len: int) -> bool:
        tail = self.held[-tail_len:] if tail_len <= len(self.held) else None
        return tail is not None and any(s.startswith(tail) for s in self.params.stop)

    def _flush(self) -> str:
        text = self.held + self.detokenizer.flush()
        self.held = ""
        for stop in self.params.stop:  # the flushed tail may complete a stop string
            cut = text.find(stop)
            if cut >= 0:
                text = text[: self._end_at(cut, stop)]
        return text

    def _end_at(self, cut: int, stop: str) -> int:
        """Where the text ends when `stop` matched at `cut`."""
        return cut + len(stop) if self.params.include_stop_str_in_output else cut
