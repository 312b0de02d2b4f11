"""Combine the benchmark results under bench/results into one markdown report with the goals checked.

    python bench/report.py [--results bench/results]   # writes bench/results/REPORT.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from olora.core.study import mean_se
import sys
from pathlib import Path

SECTIONS = [
    ("init_", "OLoRA initialisation (bench_init.py)"),
    ("train_", "Training throughput (bench_train.py)"),
    ("eval_", "Evaluation throughput (bench_eval.py)"),
    ("overheads", "Orchestration overheads (bench_overheads.py)"),
    ("prefect", "Prefect overhead (bench_prefect.py)"),
    ("serve", "Serving: batched generation and HTTP load (bench_serve.py)"),
    ("stack", "Shared stack and isolated runs (bench_stack.py)"),
    ("continuous", "Continuous training latencies (bench_continuous.py)"),
]


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _rel_se(values: list[float]) -> float:
    """Relative standard error of the mean of `values` (infinite for a single value)."""
    mean, se = mean_se(values)
    return math.inf if math.isnan(se) else se / mean


def goals(results: Path) -> list[tuple[str, str, str, str]]:
    """(goal, where, measured, met?) rows from the JSON results present."""
    out = []
    for path in sorted(results.glob("init_*.json")):
        data = _load(path)
        by = {(r["r"], r["method"]): r for r in data["rows"]}
        for r in sorted({r for r, _ in by}):
            ours, peft, floor = by.get((r, "ours")), by.get((r, "peft_olora")), by.get((r, "matmul_floor"))
            where = f"{data['device']}, r={r}"
            if ours and peft:
                speed = peft["seconds"] / ours["seconds"]
                out.append(("init >= 20x faster than PEFT olora", where, f"{speed:.1f}x", "yes" if speed >= 20 else "no"))
                key = "peak_cuda_growth_mb" if "peak_cuda_growth_mb" in ours else "peak_rss_growth_mb"
                out.append(("init peak memory <= PEFT's", where, f"{ours[key]:.0f} vs {peft[key]:.0f} MB",
                            "yes" if ours[key] <= peft[key] else "no"))
            if ours and floor:
                ratio = ours["seconds"] / floor["seconds"]
                out.append(("init within 2x of a 4mnr matmul", where, f"{ratio:.2f}x", "yes" if ratio <= 2 else "no"))
    for path in sorted(results.glob("train_*.json")):
        data = _load(path)
        by = {r["case"]: r for r in data["rows"]}
        if "stage-olora" in by and "hand-olora" in by:
            ratio = by["stage-olora"]["tokens_per_second"] / by["hand-olora"]["tokens_per_second"]
            where = data["device"] + (", both under torch.profiler" if path.stem.endswith("_profile") else "")
            out.append(("train stage >= 0.9x a hand-written PEFT loop", where, f"{ratio:.2f}x", "yes" if ratio >= 0.9 else "no"))
        if "default-olora" in by and "stage-olora" in by:
            ratio = by["default-olora"]["tokens_per_second"] / by["stage-olora"]["tokens_per_second"]
            out.append(("embedded default train >= 0.8x the unpadded rate", data["device"], f"{ratio:.2f}x",
                        "yes" if ratio >= 0.8 else "no"))
        if "stage-olora" in by and "stage-lora" in by:
            so, sl = by["stage-olora"], by["stage-lora"]
            # process-to-process spread (fresh processes differ more than steps within one do)
            key = "repeat_seconds_per_token" if len(so.get("repeat_seconds_per_token", [])) > 1 else None
            a, b = (so[key], sl[key]) if key else (so["step_seconds"], sl["step_seconds"])
            ratio = statistics.median(a) / statistics.median(b) if key else (so["seconds"] / so["tokens"]) / (sl["seconds"] / sl["tokens"])
            noise = 2 * math.hypot(_rel_se(a), _rel_se(b))
            out.append(("OLoRA step time = LoRA's within noise (2 s.e., over processes)", data["device"],
                        f"{ratio:.3f}x (noise +-{100 * noise:.1f} %)", "yes" if abs(ratio - 1) <= noise else "no"))
            share = so["model_gflops"] / so["matmul_gflops"]
            out.append(("achieved model FLOP/s vs matmul rate (reported)", data["device"],
                        f"{so['model_gflops']:.1f} of {so['matmul_gflops']:.0f} GFLOP/s ({100 * share:.0f} %)", "-"))
    for path in sorted(results.glob("eval_backends_*.json")):
        data = _load(path)
        n = sum(t["requests"] for t in data["tasks"])
        ratio = data.get("speedup_median") or sum(t["hf_seconds"] for t in data["tasks"]) / sum(t["prefix_seconds"] for t in data["tasks"])
        same = all(t["decisions_equal"] and t["greedy_equal"] for t in data["tasks"])
        worst = max(t["max_abs_loglikelihood_diff"] for t in data["tasks"])
        load = data.get("load_average")
        where = f"{data['device']}, {n} requests" + (f", median of {data['repeats']}, load {min(load):.1f}-{max(load):.1f}" if load else "")
        out.append(("eval: olora-prefix >= 2x hf requests/s over the seven tasks", where, f"{ratio:.2f}x",
                    "yes" if ratio >= 2 else "no"))
        out.append(("eval: olora-prefix decides as hf on every question, loglik within 2e-4", where,
                    f"{'same' if same else 'DIFFERENT'}, max {worst:.1e}", "yes" if same and worst < 2e-4 else "no"))
    for path in sorted(p for p in results.glob("eval_*.json") if not p.name.startswith("eval_backends_")):
        data = _load(path)
        by = {r["case"]: r for r in data["rows"]}
        if "stage-merged" in by and "stage-unmerged" in by:
            ratio = by["stage-unmerged"]["eval_seconds"] / by["stage-merged"]["eval_seconds"]
            out.append(("eval: merged adapter vs unmerged, lm-eval time (speed-up)", data["device"], f"{ratio:.2f}x", "-"))
        if "stage-merged" in by and "lm-eval-cli" in by:
            ratio = by["lm-eval-cli"]["process_seconds"] / by["stage-merged"]["process_seconds"]
            out.append(("eval: evaluate stage vs lm-eval CLI, whole process (speed-up)", data["device"], f"{ratio:.2f}x", "-"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="bench/results")
    args = parser.parse_args()
    results = Path(args.results)
    lines = ["# Benchmark report", "", "Made by `make bench` (bench/*.py); each table compares its cases within one run "
             "on one machine. Regenerate this page with `python bench/report.py`.", "", "## Goals", "",
             "| goal | where | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g} | {w} | {m} | {ok} |" for g, w, m, ok in goals(results)]
    for prefix, title in SECTIONS:
        files = sorted(results.glob(f"{prefix}*.md"))
        for path in files:
            lines += ["", f"## {title}: `{path.name}`", "", path.read_text().strip()]
    report = results / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
