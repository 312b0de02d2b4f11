"""Benchmark: lm-eval throughput on the fine-tuned model, as the evaluate stage runs it and alternatives.

In one run, on the same base, adapter, tasks, limit and batch size, each case in its own subprocess:
- `stage-merged`: the evaluate stage's path (`load_model_for_eval` merges the exported adapter into
  the base, then `run_lm_eval`);
- `stage-unmerged`: the same, with the adapter left as a PEFT wrapper (LoRA matmuls on every call);
- `lm-eval-cli`: lm-eval's own command line (`lm-eval run --model hf --model_args
  pretrained=BASE,peft=ADAPTER`) on the same offline task files.
- `backends`: lm-eval's `hf` backend against `olora-prefix` (`evaluate.backend: prefix`, the stage's
  default) on the same captured loglikelihood requests, task by task, alternating: requests/s of
  each, the speed-up, the largest log-likelihood difference and whether every question's decision
  (acc and acc_norm) is the same (its own table, `eval_backends_<device>`); `--repeats` times (default 3), the
  median ratio reported with the machine's load average, as the machine may be shared.
Requests are lm-eval's loglikelihood requests (one per answer choice), counted in the stage cases.
"load s" is model loading (+ merge); "lm-eval s" is lm-eval from its start to its scores (for the
CLI, lm-eval's own `total_evaluation_time_seconds`, which includes its model loading); "process s"
is the whole subprocess (interpreter, imports, load, evaluation), timed the same way for every
case: the fair whole-run comparison.

    python bench/bench_eval.py [--adapter models/exported] [--limit 20] [--cases ...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import device_label, publish, run_case

REPO = Path(__file__).resolve().parents[1]
CASES = ["stage-merged", "stage-unmerged", "lm-eval-cli", "backends"]


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
            "mean_acc": metrics.mean_acc, "device": str(runtime.device), "dtype": runtime.dtype_name,
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


def capture_requests(lm, evaluate_cfg) -> list:
    """The loglikelihood requests lm-eval builds for the offline tasks (captured; that run scores nothing)."""
    from lm_eval import simple_evaluate

    from olora.evaluation.tasks import tasks_for

    captured = []
    original = type(lm).loglikelihood
    type(lm).loglikelihood = lambda self, requests, *a, **kw: captured.extend(requests) or [(0.0, False)] * len(requests)
    try:
        with tempfile.TemporaryDirectory() as folder:
            manager, names, _ = tasks_for(evaluate_cfg.source, evaluate_cfg.tasks, Path(folder))
            simple_evaluate(model=lm, tasks=list(names.values()), task_manager=manager, num_fewshot=evaluate_cfg.num_fewshot,
                            limit=evaluate_cfg.limit or None, bootstrap_iters=0)
    finally:
        type(lm).loglikelihood = original
    return captured


def decisions(requests, results) -> dict:
    """Per question: the choice picked by log-likelihood (acc) and by length-normalised log-likelihood (acc_norm)."""
    by_question: dict = {}
    for request, (loglikelihood, _) in zip(requests, results):
        by_question.setdefault(request.doc_id, []).append((request.idx, loglikelihood, len(request.arguments[1])))
    return {doc: (max(c, key=lambda x: x[1])[0], max(c, key=lambda x: x[1] / x[2])[0]) for doc, c in by_question.items()}


def count_work(model) -> dict:
    """Count the forward passes, the tokens they encode (padding included) and the positions projected onto the vocabulary."""
    import torch

    work = {"passes": 0, "tokens": 0, "projected": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        keep = kwargs.get("logits_to_keep", 0)
        work["passes"] += 1
        work["tokens"] += ids.numel()
        work["projected"] += (int(keep.sum()) if keep.dtype == torch.bool else keep.numel() * ids.shape[0]) \
            if isinstance(keep, torch.Tensor) else ids.shape[0] * (keep or ids.shape[1])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return work


def run_backends_case(adapter: Path, limit: int, batch_size: int, repeats: int = 3) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    from olora.evaluation.harness import load_model_for_eval
    from olora.evaluation.prefix_lm import PrefixCachedLM
    from olora.modeling import models
    from olora.modeling.runtime import resolve_runtime

    cfg = eval_config(limit, batch_size)
    runtime = resolve_runtime(cfg.model)
    ref = models.resolve_model(cfg.model)
    model, tokenizer = load_model_for_eval(ref, runtime, adapter), models.load_tokenizer(ref)
    sync = (lambda: torch.cuda.synchronize(runtime.device)) if runtime.is_cuda else (lambda: None)
    backends = {name: cls(pretrained=model, tokenizer=tokenizer, batch_size=cfg.evaluate.batch_size, max_length=2048)
                for name, cls in (("hf", HFLM), ("prefix", PrefixCachedLM))}
    requests = capture_requests(backends["hf"], cfg.evaluate)
    by_task: dict[str, list] = {}
    for request in requests:
        by_task.setdefault(request.task_name.removesuffix("_olora_offline"), []).append(request)
    for lm in backends.values():  # warm-up: first-call allocations and kernel choices
        lm.loglikelihood(requests[:8], disable_tqdm=True)
    work = count_work(model)
    counted: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    seconds = {(task, name): [] for task in by_task for name in backends}
    results = {}
    for rep in range(repeats):  # task by task, alternating which backend goes first: drift hits both alike
        for t, (task, task_requests) in enumerate(by_task.items()):
            for name in (("hf", "prefix") if (rep + t) % 2 == 0 else ("prefix", "hf")):
                sync()
                before = dict(work)
                start = time.perf_counter()
                results[task, name] = backends[name].loglikelihood(task_requests, disable_tqdm=True)
                sync()
                seconds[task, name].append(time.perf_counter() - start)
                if rep == 0:
                    total = counted.setdefault(name, dict.fromkeys(work, 0))
                    for key in work:
                        total[key] += work[key] - before[key]
        load.append(os.getloadavg()[0])
        hf, prefix = (sum(seconds[task, name][rep] for task in by_task) for name in ("hf", "prefix"))
        print(f"  repeat {rep + 1}: hf {hf:6.1f} s  prefix {prefix:6.1f} s  {hf / prefix:.2f}x  load {load[-1]:.1f}", file=sys.stderr)
    tasks = []
    for task, task_requests in by_task.items():
        hf, prefix = results[task, "hf"], results[task, "prefix"]
        tasks.append({"task": task, "requests": len(task_requests), "questions": len({r.doc_id for r in task_requests}),
                      "hf_seconds": round(statistics.median(seconds[task, "hf"]), 3),
                      "prefix_seconds": round(statistics.median(seconds[task, "prefix"]), 3),
                      "speedup_median": round(statistics.median(a / b for a, b in zip(seconds[task, "hf"], seconds[task, "prefix"])), 3),
                      "max_abs_loglikelihood_diff": max(abs(a[0] - b[0]) for a, b in zip(hf, prefix)),
                      "greedy_equal": all(a[1] == b[1] for a, b in zip(hf, prefix)),
                      "decisions_equal": decisions(task_requests, hf) == decisions(task_requests, prefix)})
    totals = [sum(seconds[task, "hf"][r] for task in by_task) / sum(seconds[task, "prefix"][r] for task in by_task) for r in range(repeats)]
    return {"case": "backends", "tasks": tasks, "device": str(runtime.device), "dtype": runtime.dtype_name,
            "threads": torch.get_num_threads(), "batch_size": cfg.evaluate.batch_size, "limit": limit,
            "repeats": repeats, "speedups": [round(x, 3) for x in totals], "speedup_median": round(statistics.median(totals), 3),
            "load_average": [round(x, 2) for x in load], "cores": os.cpu_count(), "work": counted}


def backends_table(row: dict, adapter: Path) -> str:
    device = device_label(row["device"], row["dtype"], row.get("threads"))
    load = row.get("load_average", [])
    lines = [f"lm-eval loglikelihood backends on the same requests (base + {adapter}, {row['limit']} questions a task, "
             f"batch {row['batch_size']}), {device}; median of {row.get('repeats', 1)} alternating repeats, 1-minute load "
             f"average {min(load, default=float('nan')):.1f} to {max(load, default=float('nan')):.1f} on {row.get('cores', '?')} cores", "",
             "| task | questions | requests | hf req/s | olora-prefix req/s | speed-up | max abs loglik diff | same decisions |",
             "|---|---|---|---|---|---|---|---|"]
    for t in row["tasks"]:
        same = "yes" if t["decisions_equal"] and t["greedy_equal"] else "NO"
        lines.append(f"| {t['task']} | {t['questions']} | {t['requests']} | {t['requests'] / t['hf_seconds']:.1f} | "
                     f"{t['requests'] / t['prefix_seconds']:.1f} | {t.get('speedup_median', t['hf_seconds'] / t['prefix_seconds']):.2f}x | "
                     f"{t['max_abs_loglikelihood_diff']:.1e} | {same} |")
    n = sum(t["requests"] for t in row["tasks"])
    hf, prefix = sum(t["hf_seconds"] for t in row["tasks"]), sum(t["prefix_seconds"] for t in row["tasks"])
    same = all(t["decisions_equal"] and t["greedy_equal"] for t in row["tasks"])
    lines.append(f"| all seven | {sum(t['questions'] for t in row['tasks'])} | {n} | {n / hf:.1f} | {n / prefix:.1f} | "
                 f"{row.get('speedup_median', hf / prefix):.2f}x | {max(t['max_abs_loglikelihood_diff'] for t in row['tasks']):.1e} | {'yes' if same else 'NO'} |")
    if row.get("work"):
        lines += ["", "| backend | forward passes | tokens encoded (padding included) | positions projected onto the vocabulary |",
                  "|---|---|---|---|"]
        lines += [f"| {'olora-prefix' if name == 'prefix' else name} | {w['passes']} | {w['tokens']:,} | {w['projected']:,} |"
                  for name, w in row["work"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="models/exported", help="exported (plain LoRA) adapter of the train stage")
    parser.add_argument("--limit", type=int, default=20, help="questions per task")
    parser.add_argument("--batch-size", type=int, default=0, help="0: params.yaml's eval.batch_size")
    parser.add_argument("--model", default="", help="base model (default: params.yaml's model.name)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--repeats", type=int, default=3, help="backends case: alternating repeats (the median ratio is reported)")
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
               else run_backends_case(adapter, args.limit, args.batch_size, args.repeats) if args.one == "backends"
               else run_stage_case(args.one, adapter, args.limit, args.batch_size))
        print(json.dumps(row))
        return 0

    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--one", case, "--adapter", str(adapter), "--limit", str(args.limit),
               "--batch-size", str(args.batch_size), "--model", args.model, "--repeats", str(args.repeats)]
        start = time.perf_counter()
        row = run_case(cmd)
        if row is None:
            return 1
        row["process_seconds"] = round(time.perf_counter() - start, 2)
        print(f"  {case:<15} {row['process_seconds']:>8.1f} s", file=sys.stderr)
        if case == "backends":
            publish(args.out, "eval_backends_" + row["device"].split(":")[0], row, backends_table(row, adapter))
        else:
            rows.append(row)
    if not rows:
        return 0
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
