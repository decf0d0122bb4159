"""Writes a benchmark's report: results.json (one documented shape for `kvrt bench` and `kvrt
sim`), results.md (a Markdown table) and two PNG plots (plots.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kvrt.runtime.bench.plots import plot

_COLUMNS = [  # (key, header, scale, format)
    ("jct_mean_s", "JCT mean (s)", 1, "{:.2f}"),
    ("jct_p95_s", "JCT p95 (s)", 1, "{:.2f}"),
    ("job_prefill_mean_s", "prefill/job (s)", 1, "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", 1, "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", 1, "{:.0f}"),
    ("tpot_ms", "TPOT (ms)", 1, "{:.1f}"),
    ("prefill_tokens", "prefill tokens", 1, "{:,.0f}"),
    ("cached_tokens", "cached tokens", 1, "{:,.0f}"),
    ("kv_peak_bytes", "KV peak (MiB)", 2**-20, "{:.1f}"),
    ("kv_bytes_per_agent", "KV/agent (MiB)", 2**-20, "{:.2f}"),
    ("preemptions", "preemptions", 1, "{:.0f}"),
    ("offload_bytes", "offload (MiB)", 2**-20, "{:.1f}"),
    ("upload_bytes", "upload (MiB)", 2**-20, "{:.1f}"),
]
# Where calls mark segments: in blocks as the pool holds them, and as the tokens stored (which
# miss partial blocks).
_SHARED_KV_COLUMNS = [
    ("shared_kv_bytes_per_agent", "shared KV/agent (MiB)", 2**-20, "{:.2f}"),
    ("shared_kv_token_bytes_per_agent", "shared KV/agent, tokens (MiB)", 2**-20, "{:.2f}"),
]
GAIN_BASELINE = "lru-offload"  # the write-through without the graph: what the graph adds to
TIE = 0.03  # JCT means within this fraction of the baseline's: the policies tie


def write_report(out: Path, results: dict[str, Any], timelines: dict[str, list[tuple]]) -> None:
    """`timelines`: per policy, (seconds since start, in-use MiB, resident MiB) samples."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    (out / "results.md").write_text(markdown(results))
    plot(out, results, timelines, pool_bytes(results))


def pool_bytes(results: dict[str, Any]) -> int | None:
    """The device KV pool each policy had: the simulated device's under `kvrt sim`, else the
    engine's setting."""
    return (results.get("sim", {}).get("kv_cache_bytes")
            or results.get("engine", {}).get("kv_cache_memory"))


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# `{results['workload']}` on {results['machine']['description']}", ""]
    params = ", ".join(f"{k}={v}" for k, v in results["params"].items())
    lines += [f"Parameters: {params}.", ""]
    columns = list(_COLUMNS)
    if any("shared_kv_token_bytes_per_agent" in row for row in results["policies"].values()):
        columns += _SHARED_KV_COLUMNS
    if results.get("slo_ttft_ms") is not None:
        columns.append(("max_agents_within_slo",
                        f"agents within SLO (TTFT p99 <= {results['slo_ttft_ms']:g} ms)", 1,
                        "{:.0f}"))
    compared = results.get("compared", "policy")
    if compared == "router":
        setup = results["replicas"]
        lines += [f"{setup['replicas']} replicas, each a whole device; the routers compared "
                  f"under the `{setup['policy']}` policy.", ""]
    lines.append(f"| {compared} | " + " | ".join(h for _, h, _, _ in columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    for name, row in results["policies"].items():
        cells = [_cell(row.get(key), scale, fmt) for key, _, scale, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ideal = results["ideal"]
    lines += ["", f"Ideal: {ideal['prefill_tokens']:,} prefill tokens (every distinct text "
              f"computed once, wherever it sits), {ideal['kv_bytes'] / 2**20:.1f} MiB of distinct "
              f"KV; exact prefix reuse at best: {ideal['prefill_tokens_prefix_reuse']:,} prefill "
              "tokens.", ""]
    lines += pressure_markdown(results["policies"], pool_bytes(results))
    lines += landing_markdown(results["policies"])
    if compared == "router":
        lines += router_markdown(results["policies"])
    else:
        lines += gain_markdown(results["policies"])
    if "comparison" in results:
        lines.append(comparison_markdown(results["comparison"]))
    return "\n".join(lines)


def pressure_markdown(rows: dict[str, dict[str, Any]], pool: int | None) -> list[str]:
    """Says which runs had no memory pressure (no cached KV evicted, no call preempted): there
    the pool never filled, no policy had KV to decide about, and they can differ only by the
    order of calls and what their moves between tiers cost."""
    calm = [name for name, row in rows.items() if row.get("memory_pressure") is False]
    if not calm:
        return []
    peak = max(rows[name].get("kv_resident_peak_bytes") or 0 for name in calm)
    of_pool = f" of the {pool / 2**20:,.0f} MiB pool ({peak / pool:.0%})" if pool else ""
    if len(calm) == len(rows):
        return [f"**No memory pressure**: in no run did the KV pool fill (no cached KV evicted, "
                f"no call preempted; resident KV peaked at {peak / 2**20:,.1f} MiB{of_pool}), so "
                "the policies had no KV to decide about and could not differ but by the order "
                "of calls. Lower `--kv-cache-memory` or raise the load to compare them.", ""]
    names = ", ".join(f"`{name}`" for name in calm)
    return [f"No memory pressure under {names} (no cached KV evicted, no call preempted; "
            f"resident KV peaked at {peak / 2**20:,.1f} MiB{of_pool}).", ""]


def landing_markdown(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per policy that planned uploads ahead of its tools' predicted returns: when
    they landed, against the actual return."""
    lines = []
    for name, row in rows.items():
        landing = row.get("upload_landing")
        if not landing:
            continue
        fraction = landing["in_time_fraction"]
        in_time = "-" if fraction is None else f"{fraction:.0%}"
        spread = "/".join(_cell(landing[k], 1, "{:+.0f}") for k in ("p5_ms", "p50_ms", "p95_ms"))
        vs_due = "/".join(_cell(landing[k], 1, "{:+.0f}")
                          for k in ("vs_predicted_p50_ms", "vs_predicted_p95_ms"))
        before_due = _cell(landing["vs_predicted_in_time_fraction"], 100, "{:.0f}%")
        lines.append(f"- `{name}`: {landing['count']} predictive uploads, {in_time} landed in "
                     f"time ({landing['early_returns']} early returns left out); landing minus "
                     f"the tool's return p5/p50/p95: {spread} ms; minus its predicted return "
                     f"p50/p95: {vs_due} ms ({before_due} at or before it)")
    if not lines:
        return []
    return ["Predictive uploads (negative: landed before the tool returned):", "", *lines, ""]


def gain_markdown(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The graph-aware gain: each other policy's JCT mean and prefill tokens as a fraction of
    `lru-offload`'s (when it was run), the figure to compare between two workloads."""
    base = rows.get(GAIN_BASELINE)
    others = [name for name in rows if name != GAIN_BASELINE]
    if base is None or not others:
        return []
    lines = [f"Against `{GAIN_BASELINE}` (below 1: better):", "",
             "| policy | JCT mean | prefill tokens |", "|---|---:|---:|"]
    for name in others:
        cells = [_ratio(rows[name].get(key), base.get(key))
                 for key in ("jct_mean_s", "prefill_tokens")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, "", *verdict(rows), ""]


ROUTER_BASELINES = ("round-robin", "prefix")  # the graph-blind routers affinity is held to


def router_markdown(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Each router against the graph-blind ones (JCT mean and prefill tokens as fractions of
    theirs), then each router's spread over the replicas: calls and prefill per replica, the
    agents served on more than one, the busiest replica's calls over the mean."""
    lines = []
    for base_name in ROUTER_BASELINES:
        base = rows.get(base_name)
        others = [name for name in rows if name != base_name]
        if base is None or not others:
            continue
        lines += [f"Against `{base_name}` (below 1: better):", "",
                  "| router | JCT mean | prefill tokens |", "|---|---:|---:|"]
        for name in others:
            cells = [_ratio(rows[name].get(key), base.get(key))
                     for key in ("jct_mean_s", "prefill_tokens")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Per replica (calls / prefill tokens / KV peak MiB):", "",
              "| router | replicas | agents on several replicas | calls max/mean |",
              "|---|---|---:|---:|"]
    for name, row in rows.items():
        spread = ", ".join(f"{r['calls']:,} / {r['prefill_tokens']:,} / "
                           f"{r['kv_peak_bytes'] / 2**20:,.0f}" for r in row.get("replicas", []))
        lines.append(f"| {name} | {spread} | {row.get('agents_on_several_replicas', 0):,} of "
                     f"{row.get('agents_served', 0):,} | "
                     f"{_cell(row.get('calls_imbalance'), 1, '{:.2f}')} |")
    return [*lines, ""]


def verdict(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Says so when the policies tie (every JCT mean within TIE of the baseline's), and whether
    there was anything to gain: memory pressure (the baseline evicted cached KV or preempted a
    call) or none, where no policy has KV to decide about and only the order of calls differs."""
    base = rows[GAIN_BASELINE]
    pressure = bool(base.get("evicted_blocks") or base.get("preemptions"))
    ratios = [rows[n]["jct_mean_s"] / base["jct_mean_s"] for n in rows
              if n != GAIN_BASELINE and rows[n].get("jct_mean_s") and base.get("jct_mean_s")]
    if not ratios or any(abs(r - 1) > TIE for r in ratios):
        return []
    spread = max(abs(r - 1) for r in ratios)
    if pressure:
        return [f"The policies tie: every JCT mean is within {spread:.1%} of `{GAIN_BASELINE}`'s "
                f"(under {TIE:.0%}), with memory pressure present."]
    return [f"Nothing to gain here: `{GAIN_BASELINE}` evicted no cached KV and preempted no call "
            f"(no memory pressure), so the policies tie: every JCT mean is within {spread:.1%} "
            f"of `{GAIN_BASELINE}`'s (under {TIE:.0%}: noise)."]


def _ratio(value: Any, base: Any) -> str:
    if value is None or not base or any(isinstance(v, float) and math.isnan(v)
                                        for v in (value, base)):
        return "-"
    return f"{value / base:.2f}"


def comparison_markdown(comparison: dict[str, Any]) -> str:
    lines = [f"## Against `{comparison['against']}` ({comparison['bench_machine']})", "",
             "| policy | metric | bench | sim | error |", "|---|---|---:|---:|---:|"]
    figures = {key: (header, scale, fmt)
               for key, header, scale, fmt in _COLUMNS + _SHARED_KV_COLUMNS}
    for policy, row in comparison["policies"].items():
        for key, m in row.items():
            header, scale, fmt = figures.get(key, (key, 1, "{:.2f}"))
            lines.append(f"| {policy} | {header} | {_cell(m['bench'], scale, fmt)} | "
                         f"{_cell(m['sim'], scale, fmt)} | {m['error']:+.1%} |")
    verdict = "within" if comparison["within_tolerance"] else "NOT within"
    lines += ["", f"Largest error {comparison['max_abs_error']:.1%}: {verdict} "
              f"{comparison['tolerance']:.0%}.", ""]
    return "\n".join(lines)



def _cell(value: Any, scale: float, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value * scale)
