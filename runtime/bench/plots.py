"""The report's two figures, drawn to be read with a dozen policies side by side.

- summary.png: four panels (completion time, time to first token, prompt tokens, KV), each a
  pair of bars per policy; the policy names slanted so that long ones do not run together,
  each panel's legend above its data, not on it.
- kv_timeline.png: small multiples, one panel per policy on shared axes, the same two lines in
  each (KV in use, KV resident), so no two policies have to share a colour; each panel says
  whether its run filled the pool (memory pressure: cached KV evicted or a call preempted),
  and draws the pool's size when the run came near it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Policies a timeline row holds; more rows past that.
TIMELINE_COLUMNS = 3
# The pool's line is drawn where resident KV reached this fraction of it; below, it would only
# flatten the curves (the panel says how full the pool got instead).
POOL_LINE_FROM = 0.5

_SUMMARY_PANELS = [  # (title, [(label, key)], scale)
    ("completion time (s)", [("mean", "jct_mean_s"), ("p95", "jct_p95_s")], 1),
    ("time to first token (ms)", [("p50", "ttft_p50_ms"), ("p99", "ttft_p99_ms")], 1),
    ("prompt tokens", [("computed", "prefill_tokens"), ("cached", "cached_tokens")], 1),
    ("device KV (MiB)", [("peak in use", "kv_peak_bytes"),
                         ("peak resident", "kv_resident_peak_bytes")], 2**-20),
]


def plot(out: Path, results: dict[str, Any], timelines: dict[str, list[tuple]],
         pool_bytes: int | None) -> None:
    """`timelines`: per policy, (seconds since start, in-use MiB, resident MiB) samples;
    `pool_bytes`: the device KV pool (None: unknown)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    summary(out / "summary.png", results)
    timeline(out / "kv_timeline.png", results, timelines, pool_bytes)


def summary(path: Path, results: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    rows = results["policies"]
    policies = list(rows)
    width = 0.4
    figure, axes = plt.subplots(2, 2, figsize=(max(10.0, 0.9 * len(policies) * 2), 8.5))
    for ax, (title, bars, scale) in zip(axes.flat, _SUMMARY_PANELS):
        for i, (label, key) in enumerate(bars):
            values = [_number(rows[p].get(key)) * scale for p in policies]
            ax.bar([x + i * width for x in range(len(policies))], values, width, label=label)
        if title == "prompt tokens":
            ax.axhline(results["ideal"]["prefill_tokens"], color="black", linestyle="--",
                       linewidth=1, label="ideal prefill")
            ax.axhline(results["ideal"]["prefill_tokens_prefix_reuse"], color="grey",
                       linestyle=":", linewidth=1, label="prefix reuse at best")
        ax.set_xticks([x + width / 2 for x in range(len(policies))], policies, rotation=30,
                      ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_title(title, pad=24)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8,
                  frameon=False)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{results['workload']} ({results['machine']['description']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def timeline(path: Path, results: dict[str, Any], timelines: dict[str, list[tuple]],
             pool_bytes: int | None) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    policies = list(timelines) or ["(no policy)"]
    columns = min(TIMELINE_COLUMNS, len(policies))
    rows = math.ceil(len(policies) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows + 1.0),
                                sharex=True, sharey=True, squeeze=False)
    pool_mib = None if pool_bytes is None else pool_bytes / 2**20
    for ax, policy in zip(axes.flat, policies):
        points = timelines.get(policy, [])
        if points:
            seconds = [p[0] for p in points]
            ax.plot(seconds, [p[1] for p in points], color="C0", label="in use")
            ax.plot(seconds, [p[2] for p in points], color="C1", linestyle=":",
                    label="resident (in use + cached)")
        row = results["policies"].get(policy, {})
        resident = max((p[2] for p in points), default=0.0)
        if pool_mib and resident >= POOL_LINE_FROM * pool_mib:
            ax.axhline(pool_mib, color="grey", linestyle="--", linewidth=1, label="pool")
        ax.set_title(policy, fontsize=9)
        ax.text(0.98, 0.04, panel_note(row, resident, pool_mib), transform=ax.transAxes,
                fontsize=7, ha="right", va="bottom", color="dimgrey",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(policies):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    for ax in axes[:, 0]:
        ax.set_ylabel("device KV (MiB)")
    handles, labels = _legend_entries(axes)
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
                  frameon=False, bbox_to_anchor=(0.5, 0.99))
    figure.suptitle(f"{results['workload']}: device KV over time, one panel per policy",
                    fontsize=10, y=0.995, va="bottom")
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def panel_note(row: dict[str, Any], resident_mib: float, pool_mib: float | None) -> str:
    """What a timeline panel says of its run's memory: pressure, or how full the pool got."""
    if row.get("memory_pressure"):
        return (f"memory pressure: {row.get('evicted_blocks') or 0} blocks evicted, "
                f"{row.get('preemptions') or 0} preemptions")
    if pool_mib:
        return f"no memory pressure: at most {resident_mib / pool_mib:.0%} of the pool"
    return "no memory pressure"


def _legend_entries(axes) -> tuple[list, list[str]]:
    """Each line's label once, from whichever panels drew it."""
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    return list(entries.values()), list(entries)


def _number(value: Any) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return float(value)
