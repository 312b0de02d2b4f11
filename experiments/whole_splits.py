"""The whole validation splits, timed (issue 32, item 4): each evaluation's time and rate, and each model against the base.

    python experiments/whole_splits.py [eval/whole] [--base base] [--out docs/results/whole-splits.md]

The folder holds one sub-folder per evaluation, at `evaluate.limit: 0` for the whole splits (`samples.csv` and `metrics.json`: the evaluate
stages' per-question results and metrics, `eval/<side>_samples.csv` and `metrics/eval_<side>.json`, copied there;
DVC-tracked as `eval/whole.dvc`). Prints a table of what each evaluation asked and spent (questions, log-likelihood
requests, seconds, requests per second, both means), then each model against the base on the same questions, paired
(`olora.core.paired`, the evaluate stage's comparison) for the mean over tasks and the question-weighted mean, with
intervals and minimum detectable effects; and writes each model's `report.md` (the evaluate stage's per-task report,
`olora.evaluation.report`) beside its results. Reads results only: no model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(folder: Path):
    from olora.evaluation import samples
    from olora.evaluation.result import EvalResult

    metrics = EvalResult.from_json(json.loads((folder / "metrics.json").read_text()), str(folder / "metrics.json"))
    rows = samples.read_samples(folder / "samples.csv")
    samples.check_matches(rows, metrics.questions or {}, str(folder / "samples.csv"))
    return metrics, rows


def table(folder: Path, base_name: str, register) -> str:
    """The tables; `register`: the project's `register` settings (confidence, resamples)."""
    from dataclasses import replace

    from olora.core.paired import compare
    from olora.evaluation import samples
    from olora.evaluation.report import paired_with_base, report_markdown, with_deltas

    evaluations = {p.name: _load(p) for p in sorted(folder.iterdir()) if (p / "metrics.json").is_file()}
    if base_name not in evaluations:
        raise SystemExit(f"no base evaluation {folder / base_name}; evaluated: {sorted(evaluations)}")
    base, base_rows = evaluations[base_name]
    lines = ["| evaluation | evaluate.limit | questions | requests | seconds | requests/s | mean acc | question-weighted acc |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (m, rows) in evaluations.items():
        lines.append(f"| {name} | {m.limit or '0 (all)'} | {len(rows)} | {m.timing.requests} | {m.timing.seconds:.0f} | "
                     f"{m.timing.requests / m.timing.seconds:.1f} | {m.mean_acc:.4f} | "
                     f"{sum(r['acc'] for r in rows) / len(rows):.4f} |")
    confidence, resamples = register.confidence, register.resamples
    lines += ["", f"Against {base_name}, on the same questions ({confidence * 100:g} % intervals, paired bootstrap stratified "
              f"by task, {resamples} resamples; MDE at 80 % power):", "",
              "| model | metric | n | difference | interval | MDE | significant |", "|---|---|---|---|---|---|---|"]
    for name, (m, rows) in evaluations.items():
        if name == base_name:
            continue
        ours, theirs = samples.table(rows), samples.table(base_rows)
        pooled = {t: float(len(q)) for t, q in ours.items()}
        for metric, weights in (("mean_acc", None), ("pooled_acc", pooled)):
            c = compare(theirs, ours, confidence, resamples, weights=weights)
            lines.append(f"| {name} | {metric} | {c.n} | {c.diff * 100:+.2f} | [{c.low * 100:+.2f}, {c.high * 100:+.2f}] | "
                         f"{c.mde * 100:.2f} | {'yes' if c.significant else 'no'} |")
        paired = paired_with_base(with_deltas(replace(m, vs_base_missing=None), base), base, base_rows, rows, register)
        (folder / name / "report.md").write_text(report_markdown(base, paired, f"{name} on the whole validation splits"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="eval/whole")
    parser.add_argument("--root", default=".", help="the project whose params.yaml sets register.confidence, resamples")
    parser.add_argument("--base", default="base", help="the sub-folder of the base model's evaluation")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)
    from olora.config import load_config

    text = table(Path(args.folder), args.base, load_config(Path(args.root) / "params.yaml").register)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
