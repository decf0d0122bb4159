"""From one policy's raw records to the figures of the report, and the ideal they aim at.

Definitions (the README repeats them):
- a job is a run of the workload's graph (a round, for generative-agents); JCT is its
  wall-clock time (simulated time under `kvrt sim`);
- TTFT is from submitting a call to its first streamed text; TPOT is the rest of the call per
  further token; a job's prefill time is from its start to the last of its calls' first text
  (a round's: until every agent has started to answer);
- prefill tokens are prompt tokens the engine computed (prompt minus cached; recomputation
  after a preemption is counted in `preemptions`, not here);
- KV bytes are device blocks x bytes per block, sampled every 50 ms (of simulated time under
  `kvrt sim`): `kv_peak_bytes` and `kv_mean_bytes` count blocks referenced by live requests (or
  pinned), the peak also at every engine step; `kv_resident_peak_bytes` adds the cached ones;
  `kv_bytes_per_agent` is the mean over samples of the mean device blocks an agent holding KV
  owns.
- upload landing: for each upload the policy planned ahead of a tool's predicted return (not
  one the tool's finish or an admission asked for), the engine's clock when it landed minus
  when the tool's finish reached the engine (negative: in time). `count` such uploads;
  `early_returns` of them had the tool return before its predicted time (no upload planned for
  the prediction could beat it): left out of `in_time_fraction` (landed at or before the
  return) and of the percentiles `p5_ms`, `p50_ms`, `p95_ms`; over the same cases, the
  landing minus the predicted return (`vs_predicted_in_time_fraction`: at or before it,
  `vs_predicted_p50_ms`, `vs_predicted_p95_ms`): what the upload's lead controls, without the
  prediction's error (a tool that returns exactly on time). None when there were none.
- replicas (with `kvrt sim --replicas N` only): per replica, the calls routed to it, their
  prompt and prefill tokens (these add up to the run's), the distinct agents it served, its own
  KV peak, preemptions and evictions; `agents_on_several_replicas` counts the agents whose
  calls went to more than one replica (0 when every agent stayed home), and `calls_imbalance`
  is the busiest replica's calls over the mean (1: even).
- ideal: prefill tokens if every distinct text were computed once, wherever it sits in a
  prompt: only tokens that no run of 16 tokens seen before (in a prompt, or generated) covers,
  nor an earlier prompt's prefix; and the KV bytes of that distinct content (those tokens plus
  the generated ones). Beside it, the limit of exact prefix reuse: every distinct prompt prefix
  computed once (unbounded memory, token-granular), and its KV bytes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvrt.runtime.engine.landing import LandingSample

if TYPE_CHECKING:
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
    first_tokens: dict[str, float] = {}
    for c in calls:
        first_tokens[c.job] = max(first_tokens.get(c.job, c.first_token), c.first_token)
    prefill_by_job = {j.name: first_tokens[j.name] - j.started for j in run.jobs
                      if j.name in first_tokens}
    job_prefill = list(prefill_by_job.values())
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
        "job_prefill_mean_s": statistics.fmean(job_prefill) if job_prefill else float("nan"),
        "job_prefill_s": prefill_by_job,  # each job's (a round's), by name
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
        "backup_bytes": run.backup_bytes,
        "preemptions": run.preemptions,
        "evicted_blocks": run.evicted_blocks,
        # The pool filled: cached KV had to go, or a call had to wait for blocks. Without it no
        # policy has a decision to make, and their figures can differ only by noise.
        "memory_pressure": bool(run.evicted_blocks or run.preemptions),
        "upload_landing": upload_landing(run.upload_landings),
        "calls": len(calls),
        "jobs": len(jct),
        "wall_s": run.wall_s,
        "max_agents_within_slo": None,
        **run.extra,
        **(replica_figures(run) if run.replicas else {}),
    }


def replica_figures(run: PolicyRun) -> dict[str, Any]:
    """Each replica's share of the run, and how evenly and stickily the calls were spread."""
    bb = run.block_bytes
    homes: dict[tuple[str, str], int] = {}
    for replica in run.replicas:
        for agent in replica.agents:
            homes[agent] = homes.get(agent, 0) + 1
    calls = [replica.calls for replica in run.replicas]
    mean = statistics.fmean(calls)
    return {
        "replicas": [{"calls": r.calls, "prompt_tokens": r.prompt_tokens,
                      "prefill_tokens": r.prefill_tokens, "agents": len(r.agents),
                      "kv_peak_bytes": r.kv_peak_blocks * bb, "preemptions": r.preemptions,
                      "evicted_blocks": r.evicted_blocks} for r in run.replicas],
        "agents_served": len(homes),
        "agents_on_several_replicas": sum(1 for n in homes.values() if n > 1),
        "calls_imbalance": max(calls) / mean if mean else float("nan"),
    }


def upload_landing(samples: Sequence[LandingSample]) -> dict[str, Any] | None:
    """The distribution of predictive uploads' landing minus the tools' actual return (see
    the module's definitions); None without any."""
    if not samples:
        return None
    kept = [s for s in samples if not s.early_return]
    timed = [s.landed_after_s * 1e3 for s in kept]
    due = [s.after_due_s * 1e3 for s in kept]
    return {
        "count": len(samples),
        "in_time_fraction": (sum(1 for ms in timed if ms <= 0) / len(timed)) if timed else None,
        "early_returns": len(samples) - len(timed),
        **{f"p{q}_ms": percentile(timed, q) if timed else None for q in (5, 50, 95)},
        "vs_predicted_in_time_fraction": (sum(1 for ms in due if ms <= 0) / len(due)
                                          if due else None),
        **{f"vs_predicted_p{q}_ms": percentile(due, q) if due else None for q in (50, 95)},
    }


REUSE_SPAN = 16  # tokens: the shortest run the any-position ideal reuses (one KV block)


def ideal(tokens: Sequence[tuple[Sequence[int], Sequence[int]]], bytes_per_token: float,
          span: int = REUSE_SPAN) -> dict[str, float]:
    """Walks every (prompt, output) in submission order. Per call:
    - exact prefix reuse computes the tokens past the longest prefix an earlier sequence
      shares with it (one prefix trie);
    - any-position reuse computes only the tokens that neither that prefix nor a run of `span`
      tokens seen anywhere before (in a prompt, or generated) covers.
    The last prompt token is always computed; generated tokens have their KV from decoding
    (all but the very last)."""
    children: dict[tuple[int, int], int] = {}
    seen: set[int] = set()  # hashes of every run of `span` tokens with KV so far
    prefix_total = any_total = generated = 0

    def walk(ids: Sequence[int]) -> int:
        node, new = 0, 0
        for token in ids:
            key = (node, token)
            if key not in children:
                children[key] = len(children) + 1
                new += 1
            node = children[key]
        return new

    def runs(ids: Sequence[int]) -> list[int]:
        return [hash(tuple(ids[i:i + span])) for i in range(len(ids) - span + 1)]

    for prompt, output in tokens:
        new = walk(prompt)  # the trie's path is unique: the new tokens are a suffix
        covered = [i < len(prompt) - new for i in range(len(prompt))]
        for i, run in enumerate(runs(prompt)):
            if run in seen:
                covered[i:i + span] = [True] * span
        prefix_total += max(new, 1)
        any_total += max(covered.count(False), 1)
        with_kv = [*prompt, *output[:-1]]
        walk(with_kv)
        seen.update(runs(with_kv))
        generated += max(len(output) - 1, 0)
    return {"prefill_tokens": any_total, "kv_bytes": (any_total + generated) * bytes_per_token,
            "prefill_tokens_prefix_reuse": prefix_total,
            "kv_bytes_prefix_reuse": len(children) * bytes_per_token}
