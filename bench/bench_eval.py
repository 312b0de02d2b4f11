"""Benchmark: lm-eval throughput on the fine-tuned model, as the evaluate stage runs it and alternatives.

In one run, on the same base, adapter, tasks, limit and batch size, each case in its own subprocess:
- `stage-merged`: the evaluate stage's path (`load_model_for_eval` merges the exported adapter into
  the base, then `run_lm_eval`);
- `stage-unmerged`: the same, with the adapter left as a PEFT wrapper (LoRA matmuls on every call);
- `lm-eval-cli`: lm-eval's own command line (`lm-eval run --model hf --model_args
  pretrained=BASE,peft=ADAPTER`) on the same offline task files.
Requests are lm-eval's loglikelihood requests (one per answer choice), counted in the stage cases.
"load s" is model loading (+ merge); "lm-eval s" is lm-eval from its start to its scores (for the
CLI, lm-eval's own `total_evaluation_time_seconds`, which includes its model loading); "process s"
is the whole subprocess (interpreter, imports, load, evaluation), timed the same way for every
case: the fair whole-run comparison.

    python bench/bench_eval.py [--adapter models/exported] [--limit 20] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import device_label, publish, run_case

REPO = Path(__file__).resolve().parents[1]
CASES = ["stage-merged", "stage-unmerged", "lm-eval-cli"]


MODEL = ""  # --model: base model override (default: params.yaml's model.name)


def eval_config(limit: int, batch_size: int):
    from olora.config import load_config

    overrides = {"evaluate.limit": limit, **({"model.name": MODEL} if MODEL else {})}
    if batch_size:
        overrides["evaluate.batch_size"] = batch_size
    return load_config(REPO / "params.yaml", overrides)


def count_requests():
    """Wrap HFLM.loglikelihood so the number of requests it serves is counted."""
    from lm_eval.models.huggingface import HFLM

    counter = {"requests": 0}
    original = HFLM.loglikelihood

    def counted(self, requests, *a, **kw):
        counter["requests"] += len(requests)
        return original(self, requests, *a, **kw)

    HFLM.loglikelihood = counted
    return counter


def run_stage_case(case: str, adapter: Path, limit: int, batch_size: int) -> dict:
    import torch
    from peft import PeftModel

    from olora.modeling import models
    from olora.evaluation.harness import load_model_for_eval, run_lm_eval
    from olora.modeling.runtime import resolve_runtime

    cfg = eval_config(limit, batch_size)
    runtime = resolve_runtime(cfg.model)
    ref = models.resolve_model(cfg.model)
    counter = count_requests()
    sync = (lambda: torch.cuda.synchronize(runtime.device)) if runtime.is_cuda else (lambda: None)
    start = time.perf_counter()
    if case == "stage-merged":
        model = load_model_for_eval(ref, runtime, adapter)
    else:
        model = PeftModel.from_pretrained(models.load_base(ref, runtime), str(adapter)).eval()
    sync()
    loaded = time.perf_counter()
    metrics = run_lm_eval(model, models.load_tokenizer(ref), cfg.evaluate).metrics
    sync()
    done = time.perf_counter()
    return {"case": case, "requests": counter["requests"], "load_seconds": round(loaded - start, 2),
            "eval_seconds": round(done - loaded, 2), "total_seconds": round(done - start, 2),
            "mean_acc": metrics["mean_acc"], "device": str(runtime.device), "dtype": runtime.dtype_name,
            "threads": torch.get_num_threads()}


def run_cli_case(adapter: Path, limit: int, batch_size: int) -> dict:
    from olora.modeling import models
    from olora.evaluation.tasks import write_offline_tasks
    from olora.modeling.runtime import resolve_runtime

    cfg = eval_config(limit, batch_size)
    runtime = resolve_runtime(cfg.model)
    ref = models.resolve_model(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        names = write_offline_tasks(cfg.evaluate.tasks, Path(tmp))
        out = Path(tmp) / "out"
        cmd = [str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "hf",
               "--model_args", f"pretrained={ref.path},peft={Path(adapter).resolve()},dtype={runtime.dtype_name}",
               "--tasks", *names.values(), "--include_path", tmp, "--limit", str(cfg.evaluate.limit),
               "--batch_size", str(cfg.evaluate.batch_size), "--device", str(runtime.device),
               "--num_fewshot", str(cfg.evaluate.num_fewshot), "--seed", str(cfg.evaluate.seed), "--output_path", str(out)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        total = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"lm-eval CLI failed:\n{done.stderr[-3000:]}")
        result = json.loads(next(out.rglob("results*.json")).read_text())
    accs = [v["acc,none"] for k, v in result["results"].items() if "acc,none" in v]
    return {"case": "lm-eval-cli", "requests": None, "load_seconds": None,
            "eval_seconds": round(float(result.get("total_evaluation_time_seconds", "nan")), 2),
            "total_seconds": round(total, 2), "mean_acc": sum(accs) / len(accs), "device": str(runtime.device),
            "dtype": runtime.dtype_name, "command": " ".join(cmd[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="models/exported", help="exported (plain LoRA) adapter of the train stage")
    parser.add_argument("--limit", type=int, default=20, help="questions per task")
    parser.add_argument("--batch-size", type=int, default=0, help="0: params.yaml's eval.batch_size")
    parser.add_argument("--model", default="", help="base model (default: params.yaml's model.name)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"{adapter} holds no exported adapter: run `dvc repro` (or `make run`) first, or pass --adapter")
    if args.one:
        row = (run_cli_case(adapter, args.limit, args.batch_size) if args.one == "lm-eval-cli"
               else run_stage_case(args.one, adapter, args.limit, args.batch_size))
        print(json.dumps(row))
        return 0

    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", case, "--adapter", str(adapter), "--limit", str(args.limit),
               "--batch-size", str(args.batch_size), "--model", args.model]
        start = time.perf_counter()
        row = run_case(cmd)
        if row is None:
            return 1
        row["process_seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        print(f"  {case:<15} {row['process_seconds']:>8.1f} s", file=sys.stderr)
    requests = next((r["requests"] for r in rows if r["requests"]), None)
    first = rows[0]
    device = device_label(first["device"], first["dtype"], first.get("threads"))
    cfg = eval_config(args.limit, args.batch_size)
    lines = [
        f"lm-eval on base + {adapter} ({len(cfg.evaluate.tasks)} tasks x {args.limit} questions = {requests} loglikelihood "
        f"requests, batch {cfg.evaluate.batch_size}), {device}",
        "",
        "| case | load s | lm-eval s | process s | requests/s, lm-eval | requests/s, process | mean acc |",
        "|---|---|---|---|---|---|---|",
    ]

    def rate(seconds):
        return "-" if not requests or not seconds else f"{requests / seconds:.1f}"

    for row in rows:
        cli = row["load_seconds"] is None
        load = "(in lm-eval s)" if cli else f"{row['load_seconds']:.1f}"
        lines.append(f"| {row['case']} | {load} | {row['eval_seconds']:.1f} | {row['process_seconds']:.1f} | "
                     f"{'-' if cli else rate(row['eval_seconds'])} | {rate(row['process_seconds'])} | {row['mean_acc']:.3f} |")
    publish(args.out, "eval_" + first["device"].split(":")[0], {"device": device, "requests": requests, "rows": rows},
            "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
