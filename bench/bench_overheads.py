"""Benchmark: what the orchestration around the stages costs.

- DVC: `dvc status` and a no-op `dvc repro` on this project (median of `--repeats`), when the
  pipeline is up to date (run `dvc repro` once first; `make bench` does);
- MLflow: the logging share of training time recorded by the last `train` stage
  (`metrics/train.json`), and the cost of one batched per-step log call against a fresh SQLite
  store, as a share of that run's mean step time;
- Prefect: see bench_prefect.py (`bench/results/prefect.md`).

    python bench/bench_overheads.py [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish

from olora import dvc

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=dvc.env(), capture_output=True, text=True)
    return time.perf_counter() - start, done


def dvc_rows(repeats: int) -> list[dict]:
    seconds, status = timed(["dvc", "status", "--json"])
    if status.returncode != 0:
        return [{"what": "dvc status", "note": f"failed: {status.stderr.strip()[-300:]}"}]
    changed = json.loads(status.stdout or "{}")
    if changed:
        return [{"what": "no-op dvc repro", "note": f"pipeline not up to date ({', '.join(changed)}): run `dvc repro` first"}]
    rows = []
    for what, cmd in (("dvc status", ["dvc", "status"]), ("no-op dvc repro", ["dvc", "repro"])):
        times = []
        for _ in range(repeats):
            t, done = timed(cmd)
            if done.returncode != 0:
                return rows + [{"what": what, "note": f"failed: {done.stderr.strip()[-300:]}"}]
            times.append(t)
        rows.append({"what": what, "seconds": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times]})
    return rows


def mlflow_rows(repeats: int) -> list[dict]:
    train = REPO / "metrics" / "train.json"
    if not train.is_file():
        return [{"what": "MLflow logging share of training", "note": "no metrics/train.json: run `dvc repro` first"}]
    metrics = json.loads(train.read_text())
    step_seconds = metrics["train_seconds"] / max(metrics["steps"], 1)
    rows = [{"what": "MLflow logging share of training (recorded by the train stage)",
             "share": metrics.get("tracking_share_of_train_time"), "seconds": metrics.get("tracking_seconds"),
             "note": f"{metrics['steps']} steps, {metrics['train_seconds']:.0f} s of training"}]
    from mlflow import MlflowClient

    from olora.tracking.runs import log_metric_series

    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        run_id = client.create_run(client.create_experiment("bench")).info.run_id
        keys = ["train/loss", "train/learning_rate", "train/grad_norm", "val/loss"]
        log_metric_series(client, run_id, {k: [(0, 1.0)] for k in keys})  # schema warm-up
        times = [log_metric_series(client, run_id, {k: [(i, 1.0)] for k in keys}) for i in range(1, repeats * 10 + 1)]
    per_call = statistics.median(times)
    rows.append({"what": "one per-step log_batch (4 metrics, SQLite)", "seconds": round(per_call, 4),
                 "share": round(per_call / step_seconds, 6),
                 "note": f"vs a mean step of {step_seconds:.2f} s; the stage batches every 30 s, so it pays this far less often"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = dvc_rows(args.repeats) + mlflow_rows(args.repeats)
    lines = ["Orchestration overheads (this project, this machine)", "", "| what | seconds | share of training time | note |",
             "|---|---|---|---|"]
    for row in rows:
        seconds = "-" if row.get("seconds") is None else f"{row['seconds']:.3f}"
        share = "-" if row.get("share") is None else f"{100 * row['share']:.3f} %"
        lines.append(f"| {row['what']} | {seconds} | {share} | {row.get('note', '')} |")
    lines += ["", "Prefect: `bench/results/prefect.md` (bench_prefect.py)."]
    publish(args.out, "overheads", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
