"""Time the paired comparison (`olora.core.paired.compare`) that the promotion gate and the evaluate stage run.

Goal: under a second for ten thousand questions at 10,000 bootstrap resamples (seven tasks, as the
paper's benchmarks). Prints a table and writes bench/results/paired.json; times are medians of
`--repeats` runs in this process.

    .venv/bin/python bench/bench_paired.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from olora.core.paired import compare

TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]


def tables(questions: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    per_task = questions // len(TASKS)
    champion, challenger = {}, {}
    for task in TASKS:
        shared = rng.random(per_task)
        champion[task] = {f"{i}:h": float(v) for i, v in enumerate(shared < 0.5)}
        challenger[task] = {f"{i}:h": float(v) for i, v in enumerate(shared < 0.53)}
    return champion, challenger


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, nargs="+", default=[350, 10_000, 50_000])
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = []
    for n in args.questions:
        champion, challenger = tables(n)
        seconds = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            result = compare(champion, challenger, resamples=args.resamples, seed=repeat)
            seconds.append(time.perf_counter() - start)
        rows.append({"questions": result.n, "resamples": args.resamples, "median_seconds": round(statistics.median(seconds), 4),
                     "max_seconds": round(max(seconds), 4), "gain": round(result.diff, 4),
                     "interval": [round(result.low, 4), round(result.high, 4)], "mde": round(result.mde, 4)})
    lines = ["| questions | resamples | median s | max s | gain | 95 % interval | MDE |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['questions']} | {r['resamples']} | {r['median_seconds']} | {r['max_seconds']} | {r['gain']:+.4f} | "
              f"[{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}] | {r['mde']:.4f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paired.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (args.out / "paired.md").write_text("# Paired comparison timing\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
