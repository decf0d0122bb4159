"""How segments are reused: the mode and its parameters (a policy chooses them)."""

from __future__ import annotations

from dataclasses import dataclass

REUSE_MODES = ("off", "per-request", "collective")


@dataclass(frozen=True, slots=True)
class ReuseConfig:
    """Position-independent reuse of segments (planner.py)."""

    mode: str = "off"  # one of REUSE_MODES; "off": exact prefix reuse only
    # A reused segment's first ceil(ratio * length) tokens are computed again in the reader's
    # context (EPIC-style). On the default model, round prompts with persona-length private
    # histories: top-1 agreement with full prefill 0.926 at the first 15%, 0.905 shift only
    # (`python -m kvrt.runtime.bench.reuse_quality --memory-words 150`, README).
    recompute_ratio: float = 0.15
    # A reuse shorter than this (in tokens, after the recompute) is computed instead: below a
    # block, a splice saves less than the partial blocks it leaves behind cost.
    min_reused_tokens: int = 16
    # Of the rows a reader recomputed, the share it keeps as its diff once its prompt is
    # computed: those that changed most from the master's; the others read the master's rows.
    diff_keep: float = 1 / 3

    def __post_init__(self) -> None:
        if self.mode not in REUSE_MODES:
            raise ValueError(f"reuse mode must be one of {REUSE_MODES}, not {self.mode!r}")
        if (not 0 <= self.recompute_ratio <= 1 or not 0 <= self.diff_keep <= 1
                or self.min_reused_tokens < 1):
            raise ValueError(f"bad reuse config: {self}")
