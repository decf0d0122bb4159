"""From one policy's raw records to the figures of the report, and the ideal they aim at.

Definitions (the README repeats them):
- a job is a run of the workload's graph (a round, for generative-agents); JCT is its
  wall-clock time (simulated time under `kvrt sim`);
- TTFT is from submitting a call to its first streamed text; TPOT is the rest of the call per
  further token;
- prefill tokens are prompt tokens the engine computed (prompt minus cached; recomputation
  after a preemption is counted in `preemptions`, not here);
- KV bytes are device blocks x bytes per block, sampled every 50 ms (of simulated time under
  `kvrt sim`): `kv_peak_bytes` and `kv_mean_bytes` count blocks referenced by live requests (or
  pinned), the peak also at every engine step; `kv_resident_peak_bytes` adds the cached ones;
  `kv_bytes_per_agent` is the mean over samples of the mean device blocks an agent holding KV
  owns.
- ideal: prefill tokens if every distinct prompt prefix were computed exactly once (exact reuse
  with unbounded memory, token-granular; generated tokens already have KV), and the KV bytes of
  all distinct content.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from kvrt.runtime.bench.runner import PolicyRun


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(run: PolicyRun) -> dict[str, Any]:
    calls, bb = run.calls, run.block_bytes
    jct = [j.finished - j.started for j in run.jobs]
    ttft = [(c.first_token - c.submitted) * 1e3 for c in calls]
    tpot = [(c.finished - c.first_token) * 1e3 / (c.completion_tokens - 1)
            for c in calls if c.completion_tokens > 1]
    prompt = sum(c.prompt_tokens for c in calls)
    cached = sum(c.cached_tokens for c in calls)
    in_use = [s.in_use_blocks for s in run.samples] or [0]
    resident = [s.in_use_blocks + s.cached_blocks for s in run.samples] or [0]
    per_agent = [statistics.fmean(s.agent_blocks) for s in run.samples if s.agent_blocks]
    return {
        "jct_mean_s": statistics.fmean(jct) if jct else float("nan"),
        "jct_p95_s": percentile(jct, 95),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_ms": percentile(tpot, 50),
        "prompt_tokens": prompt,
        "prefill_tokens": prompt - cached,
        "cached_tokens": cached,
        "completion_tokens": sum(c.completion_tokens for c in calls),
        "kv_peak_bytes": max(*in_use, run.peak_in_use_blocks) * bb,
        "kv_mean_bytes": statistics.fmean(in_use) * bb,
        "kv_resident_peak_bytes": max(resident) * bb,
        "kv_bytes_per_agent": (statistics.fmean(per_agent) if per_agent else 0.0) * bb,
        "offload_bytes": run.offload_bytes,
        "upload_bytes": run.upload_bytes,
        "preemptions": run.preemptions,
        "calls": len(calls),
        "jobs": len(jct),
        "wall_s": run.wall_s,
        "max_agents_within_slo": None,
        **run.extra,
    }


def ideal(tokens: Sequence[tuple[Sequence[int], Sequence[int]]], bytes_per_token: float
          ) -> dict[str, float]:
    """Walks every (prompt, output) in submission order through one prefix trie."""
    children: dict[tuple[int, int], int] = {}
    prefill = 0

    def walk(ids: Sequence[int]) -> int:
        node, new = 0, 0
        for token in ids:
            key = (node, token)
            if key not in children:
                children[key] = len(children) + 1
                new += 1
            node = children[key]
        return new

    for prompt, output in tokens:
        prefill += max(walk(prompt), 1)  # the last prompt token is always computed
        walk([*prompt, *output[:-1]])  # decode gave these their KV (not the very last token)
    return {"prefill_tokens": prefill, "kv_bytes": len(children) * bytes_per_token}
