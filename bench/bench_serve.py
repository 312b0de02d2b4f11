"""Benchmark: serving the registered model, in process and over HTTP.

Two parts:

- batch: the serving code path (`olora.serving.pyfunc.generate` on base + exported adapter,
  prompts rendered with the training template) in this process on the same 8 prompts, greedy, up
  to a fixed number of new tokens, each case repeated; prints prompts/s for a batch of 8 in one
  padded `generate` vs one by one, each with the adapter's PEFT layers (unmerged) and merged into
  the base (as the served pyfunc loads it), and checks that all four return the same answers
  (`serve.json`/`.md`).
- http: starts `olora serve` (MLflow's scoring app under uvicorn) on a free loopback port, then this
  process (not the server's) sends a bounded number of requests, one prompt each, at each
  concurrency, after a warm-up; prints requests/s and latency p50/p90/p99 and checks every
  request was answered with 200 (`serve_http.json`/`.md`).

Which parts run: after `dvc repro` (no --model/--adapter/--template), both, on the project's
`models/exported` and its registered model (`--alias`, default challenger, the alias `register`
sets). With --model/--adapter/--template (an adapter folder, not a registered model), batch only.
With --tiny, http only, on a tiny registered model built in a temporary project (~1 min on CPU);
with --url, http only, against a server already running there.

    python bench/bench_serve.py [--model embedded:SmolLM2-135M-Instruct] [--adapter models/exported]
                                [--template data/prepared/prompt_template.json] [--out bench/results]
    python bench/bench_serve.py --tiny [--requests 64] [--concurrency 1 4] [--max-new-tokens 16]
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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import device_label, publish

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from ports import free_port  # noqa: E402 - the tests' one free-port helper

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "What is 2 + 2?",
           "Name a colour of the sky.", "Who wrote Hamlet?", "What do bees make?",
           "What is the opposite of hot?", "Name an animal that barks."]


def batch_part(args) -> bool:
    import torch
    from peft import PeftModel

    from olora.config import ModelConfig
    from olora.data.templates import PromptTemplate, render_prompt
    from olora.modeling.merge import merged
    from olora.modeling.models import load_base, load_tokenizer, resolve_model
    from olora.modeling.runtime import resolve_runtime, set_threads
    from olora.serving.pyfunc import generate

    set_threads()
    model_cfg = ModelConfig(name=args.model)
    ref, runtime = resolve_model(model_cfg), resolve_runtime(model_cfg)
    tokenizer = load_tokenizer(ref)
    model = PeftModel.from_pretrained(load_base(ref, runtime), args.adapter).eval()
    # what the served pyfunc runs: the same adapter merged into its own copy of the base (merge_and_unload)
    merged_model = merged(load_base(ref, runtime), args.adapter)
    template = PromptTemplate.from_dict(json.loads(Path(args.template).read_text()))
    texts = [render_prompt(template, p, "", tokenizer) for p in PROMPTS]

    def batch(m=model):
        return generate(m, tokenizer, texts, args.max_new_tokens, template.stop)

    def one_by_one(m=model):
        return [generate(m, tokenizer, [t], args.max_new_tokens, template.stop)[0] for t in texts]

    cases = {"batch of 8": batch, "one by one": one_by_one,
             "batch of 8, merged": lambda: batch(merged_model), "one by one, merged": lambda: one_by_one(merged_model)}
    batch(), batch(merged_model)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in cases}
    answers = {}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every case alike
        for name in ("one by one", "batch of 8", "one by one, merged", "batch of 8, merged"):
            start = time.perf_counter()
            answers[name] = cases[name]()
            timings[name].append(time.perf_counter() - start)
    rows = []
    for name, seconds in timings.items():
        median = statistics.median(seconds)
        rows.append({"case": name, "seconds": round(median, 3), "prompts_per_second": round(len(PROMPTS) / median, 2)})
    rate = {r["case"]: r["prompts_per_second"] for r in rows}
    speedup = rate["batch of 8"] / rate["one by one"]
    merge_speedup = rate["one by one, merged"] / rate["one by one"]
    same = len({json.dumps(a) for a in answers.values()}) == 1
    table = "\n".join([
        f"Serving: {len(PROMPTS)} prompts, greedy, up to {args.max_new_tokens} new tokens, {template.kind} template, "
        f"median of {args.repeats}, {device_label(str(runtime.device), runtime.dtype_name, torch.get_num_threads())}; "
        "unmerged: base + PEFT adapter layers; merged: the adapter merged into the base, as `olora serve` loads it",
        "", "| case | seconds | prompts/s |", "|---|---|---|",
        *[f"| {r['case']} | {r['seconds']} | {r['prompts_per_second']} |" for r in rows], "",
        f"batch speed-up: **{speedup:.2f}×**; merged vs unmerged, one by one: **{merge_speedup:.2f}×**; "
        f"identical answers in all four cases: {same}",
    ])
    publish(args.out, "serve", {"rows": rows, "speedup": round(speedup, 3), "merge_speedup": round(merge_speedup, 3),
                                "identical_answers": same, "answers": answers["batch of 8"], "prompts": PROMPTS}, table)
    return same


def tiny_project(folder: Path) -> Path:
    """A tiny project (random 2-layer Llama, 6 training steps) whose adapter is its registered model's champion."""
    from olora.config import load_config
    from olora.layout import Layout
    from olora.overlay import build_tiny_llama, write_params
    from olora.stages import STAGES
    from olora.tracking import gate
    from olora.tracking.client import Tracking

    model_dir = build_tiny_llama(folder / "tiny-llama-untied", tie_word_embeddings=False)
    root = folder / "project"
    root.mkdir()
    write_params(root, model_dir, {"evaluate.tasks": ["arc_easy"]})
    layout = Layout(root)
    for stage in ("prepare", "init", "train", "evaluate_base", "evaluate", "register"):
        STAGES[stage].run(layout)
    gate.promote(load_config(layout.params), Tracking.of(load_config(layout.params), root), force=True)
    return root


def get_json(url: str, payload=None) -> tuple[int, dict]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")[:500]}


def start_server(root: Path, alias: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(BIN / "olora"), "--root", str(root), "serve", "--alias", alias, "--port", str(port)],
                                  cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"olora serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=2)
            return server, base
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise SystemExit(f"olora serve did not answer within 600 s:\n{log_path.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def load_test(base: str, requests: int, concurrencies: list[int], max_new_tokens: int) -> list[dict]:
    def ask(i: int) -> tuple[float, int]:
        payload = {"inputs": {"prompt": [PROMPTS[i % len(PROMPTS)]]},
                   "params": {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}}
        start = time.perf_counter()
        status, _ = get_json(f"{base}/invocations", payload)
        return time.perf_counter() - start, status

    rows = []
    for concurrency in concurrencies:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(ask, range(2 * concurrency)))  # warm-up, not timed
            start = time.perf_counter()
            results = list(pool.map(ask, range(requests)))
            seconds = time.perf_counter() - start
        latencies = sorted(1000 * s for s, _ in results)
        rows.append({"concurrency": concurrency, "requests": requests, "ok": sum(status == 200 for _, status in results),
                     "seconds": round(seconds, 3), "requests_per_second": round(requests / seconds, 2),
                     **{f"p{q}_ms": round(percentile(latencies, q), 1) for q in (50, 90, 99)}})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _default_threads() -> int:
    """torch's default thread count on this machine: what the server uses when nothing sets it."""
    import torch

    return torch.get_num_threads()


def http_part(args) -> bool:
    from olora.config import load_config
    from olora.modeling.runtime import resolve_runtime
    from olora.tracking.registry import model_name

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.url:
            base, subject = args.url.rstrip("/"), "a running server"
        else:
            root = tiny_project(Path(tmp)) if args.tiny else Path(args.root).resolve()
            alias = "champion" if args.tiny else args.alias
            cfg = load_config(root / "params.yaml")
            runtime = resolve_runtime(cfg.model, cfg.runtime)
            threads = cfg.runtime.num_threads or int(os.environ.get("OLORA_NUM_THREADS") or 0) or _default_threads()
            subject = ("a tiny random Llama (2 layers, hidden 64) + adapter" if args.tiny else cfg.model.name) + \
                f", {device_label(str(runtime.device), runtime.dtype_name, threads)}"
            server, base = start_server(root, alias, Path(tmp) / "serve.log")
        try:
            _, served = get_json(f"{base}/served")
            rows = load_test(base, args.requests, args.concurrency, args.max_new_tokens)
        finally:
            if server is not None:
                stop_server(server)
    ok = all(r["ok"] == r["requests"] for r in rows)
    where = f"models:/{served.get('name')}@{served.get('alias')} (version {served.get('version')})"
    table = "\n".join([
        f"Serving over HTTP: `olora serve` {where}, {subject}; {args.requests} requests per row after a warm-up, "
        f"one prompt each, greedy, max_new_tokens = min_new_tokens = {args.max_new_tokens}; the client is a separate process",
        "", "| concurrency | requests | answered 200 | seconds | requests/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['seconds']} | {r['requests_per_second']} | "
          f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} |" for r in rows],
    ])
    publish(args.out, "serve_http", {"rows": rows, "served": served, "subject": subject, "max_new_tokens": args.max_new_tokens,
                                     "command": ["python", "bench/bench_serve.py", *sys.argv[1:]]}, table)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model of the batch part (default: embedded:SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="adapter folder of the batch part (default: models/exported)")
    parser.add_argument("--template", help="prompt template of the batch part (default: data/prepared/prompt_template.json)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=str(REPO), help="project whose registered model the http part serves")
    parser.add_argument("--alias", default="challenger", help="alias the http part serves (default: challenger)")
    parser.add_argument("--tiny", action="store_true", help="http part only, on a tiny registered model")
    parser.add_argument("--url", help="http part only, against a server already running at this URL")
    parser.add_argument("--requests", type=int, default=64, help="timed requests per concurrency (default: 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    explicit_adapter = any(v is not None for v in (args.model, args.adapter, args.template))
    args.model = args.model or "embedded:SmolLM2-135M-Instruct"
    args.adapter = args.adapter or str(REPO / "models/exported")
    args.template = args.template or str(REPO / "data/prepared/prompt_template.json")
    ok = True
    if not (args.tiny or args.url):
        ok = batch_part(args) and ok
    if args.tiny or args.url or not explicit_adapter:
        ok = http_part(args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
