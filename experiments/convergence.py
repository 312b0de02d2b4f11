"""The paper's convergence claim at small scale: OLoRA vs LoRA as DVC experiments tracked in MLflow.

    python experiments/convergence.py                 # run (or resume) the whole study, then write docs/results.md
    python experiments/convergence.py --report-only   # rebuild docs/results.md and figures from the recorded runs

Protocol (same budget, data and seeds for both methods, on the embedded default model and data):
1. learning-rate sweep per method at `--sweep-rank`, seed 0; a best rate on the grid's edge extends
   the grid by one step (x3) so neither method is compared at a rate cut off by the grid;
2. each method at its own best rate, every rank in `--ranks`, seeds `--seeds`.
Every run is one `dvc exp run -n NAME -S ...` of the whole pipeline (init, train, evaluate on the
seven benchmarks, register) in this workspace, so each is a DVC experiment (`dvc exp show --all-commits`) and an
MLflow run in experiment `--experiment` (adapters registered as `--experiment` too). After each run
its metrics, curves and MLflow run id are recorded in `--out/results/convergence_runs.json`, so an
interrupted study resumes where it stopped. At the end params.yaml, dvc.lock and the git-tracked
metrics are restored to HEAD (`dvc exp apply NAME` brings any run back).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from olora import dvc
from olora.core import study
from olora.layout import RUN_FILE

ROOT = Path(__file__).resolve().parents[1]
RESTORE = ["params.yaml", "dvc.lock", "metrics", "plots", "reports"]


def run_name(method: str, r: int, lr: float, seed: int) -> str:
    return f"conv-{method}-r{r}-lr{lr:.0e}-s{seed}".replace("e-0", "e-")


def overrides(args, method: str, r: int, lr: float, seed: int) -> dict[str, object]:
    return {
        "adapter.init": method,
        "adapter.r": r,
        "adapter.alpha": float(args.scale * r),  # s = alpha / r fixed across ranks
        "adapter.seed": seed,
        "train.seed": seed,
        "train.learning_rate": lr,
        "train.max_steps": args.steps,
        "train.micro_batch_size": args.micro_batch,
        "train.warmup_steps": max(1, args.steps // 10),
        "train.eval_steps": args.eval_every,
        "train.save_steps": args.steps,
        "train.max_eval_examples": args.eval_examples,
        "evaluate.limit": args.eval_limit,
        "tracking.experiment": args.experiment,
        "register.model_name": args.experiment,
    }


def read_csv(path: Path) -> list[tuple[int, float]]:
    with path.open() as handle:
        rows = list(csv.reader(handle))[1:]
    return [(int(r[0]), float(r[1])) for r in rows]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=dvc.env(), text=True, **kw)


def tee(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd`, echoing its output live; return its exit code and the last lines it printed."""
    import collections

    tail: collections.deque[str] = collections.deque(maxlen=200)
    with subprocess.Popen(cmd, cwd=ROOT, env=dvc.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    sys.stdout.flush()
    return proc.returncode, "".join(tail)


def run_experiment(args, manifest: dict, manifest_path: Path, method: str, r: int, lr: float, seed: int) -> dict:
    name = run_name(method, r, lr, seed)
    if name in manifest["runs"]:
        return manifest["runs"][name]
    values = overrides(args, method, r, lr, seed)
    cmd = [dvc.executable(), "exp", "run", "-n", name] + [x for k, v in values.items() for x in ("-S", f"{k}={v}")]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    returncode, tail = tee(cmd)
    if returncode != 0:
        if "non-finite training loss" not in tail:  # anything but divergence is not a result: stop, resume later
            raise SystemExit(f"{name} failed (exit {returncode}) for a reason other than divergence; "
                             "fix it and run the study again (recorded runs are kept)")
        # a diverged run is a result: record it, go on
        record = {"method": method, "r": r, "lr": lr, "seed": seed, "failed": True, "returncode": returncode}
    else:
        record = {
            "method": method, "r": r, "lr": lr, "seed": seed, "failed": False,
            "seconds": round(time.perf_counter() - start, 1),
            "train": json.loads((ROOT / "metrics/train.json").read_text()),
            "val_curve": read_csv(ROOT / "plots/val_loss.csv"),
            "train_curve": read_csv(ROOT / "plots/train_loss.csv"),
            "eval": json.loads((ROOT / "metrics/eval_adapter.json").read_text()),
            "eval_base": json.loads((ROOT / "metrics/eval_base.json").read_text()),
            "mlflow": json.loads((ROOT / "models/adapter" / RUN_FILE).read_text()),
            "registration": json.loads((ROOT / "reports/registration.json").read_text()),
        }
    manifest["runs"][name] = record
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(manifest_path)
    return record


def final_loss(record: dict) -> float:
    return math.inf if record.get("failed") else float(record["train"]["final_val_loss"])


def sweep(args, manifest, manifest_path, method: str) -> float:
    def loss(lr: float) -> float:
        return final_loss(run_experiment(args, manifest, manifest_path, method, args.sweep_rank, lr, args.seeds[0]))

    names = {run_name(method, args.sweep_rank, lr, args.seeds[0]) for lr in args.lrs}
    if len(names) != len(args.lrs):
        raise SystemExit(f"learning rates {args.lrs} give clashing run names {sorted(names)}: use rates that differ "
                         "in their first significant digit or exponent")
    losses = {lr: loss(lr) for lr in args.lrs}
    extra = study.grid_extension(list(args.lrs), study.pick_learning_rate(losses))
    if extra is not None:  # at most one extension
        losses[extra] = loss(extra)
    return study.pick_learning_rate(losses)


def main() -> int:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["olora", "lora"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--sweep-rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0, help="alpha / r (kept fixed across ranks)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--eval-limit", type=int, default=40, help="questions per benchmark (lm-eval --limit)")
    parser.add_argument("--experiment", default="olora-convergence", help="MLflow experiment and registered model")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--root", default=str(ROOT), help="the DVC project to run in (default: this checkout)")
    args = parser.parse_args()
    ROOT = Path(args.root).resolve()

    out = ROOT / args.out
    manifest_path = out / "results" / "convergence_runs.json"
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "report_only", "root")}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"settings": settings, "runs": {}}
    if not args.report_only:
        if manifest["settings"] != settings:
            sys.exit(f"{manifest_path} was recorded with other settings {manifest['settings']}; "
                     "move it away to start a new study, or pass the same options to resume")
        dirty = sh(["git", "status", "--porcelain", "--untracked-files=no", "--", *RESTORE], capture_output=True).stdout.strip()
        if dirty:
            sys.exit(f"uncommitted changes in {RESTORE} would be overwritten by the experiments:\n{dirty}\n"
                     "commit or stash them first")
        try:
            best = {m: sweep(args, manifest, manifest_path, m) for m in args.methods}
            manifest["best_lr"] = best
            for r in args.ranks:
                for seed in args.seeds:
                    for method in args.methods:
                        run_experiment(args, manifest, manifest_path, method, r, best[method], seed)
        finally:
            tracked = sh(["git", "ls-files", "--", *RESTORE], capture_output=True).stdout.split()
            if tracked and sh(["git", "checkout", "HEAD", "--", *tracked]).returncode != 0:
                print(f"note: could not restore {tracked} from HEAD", file=sys.stderr)
            if sh([dvc.executable(), "checkout", "--quiet"], capture_output=True).returncode != 0:
                print("note: `dvc checkout` could not restore every output of HEAD (not in the cache); "
                      "`dvc repro` rebuilds them", file=sys.stderr)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    from convergence_report import write_report

    write_report(manifest, out)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
