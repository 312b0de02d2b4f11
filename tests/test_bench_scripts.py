"""`make bench` keeps working: each benchmark script runs for real on a tiny model and the report checks its goals.

These assert what the scripts produce (cases, counts, files, goal rows), never how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

from olora.config import PAPER_TASKS
from overlay import REPO

pytestmark = pytest.mark.integration


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OLORA_NUM_THREADS": os.environ["OLORA_NUM_THREADS"]}
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    from transformers import AutoModelForCausalLM

    from olora.modeling import peft_glue as adapters
    from olora.config import AdapterConfig

    out = tmp_path_factory.mktemp("adapter")
    model = adapters.initialise(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AdapterConfig(init="lora", r=4, alpha=8.0))
    torch.manual_seed(1)
    for layer in adapters.lora_layers(model).values():  # a non-zero update, so merged vs unmerged is a real check
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    model.save_pretrained(out)
    return out


def test_train_eval_benchmarks_and_report(tmp_path, tiny_model_dir, tiny_adapter):
    out = tmp_path / "results"
    table = bench("bench_train.py", "--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1",
                  "--max-examples", "300", "--micro-batch", "2", "--seq-len", "64", "--repeats", "2",
                  "--default-max-examples", "200", "--out", str(out))
    assert "| stage-olora |" in table and "| hand-olora |" in table and "OLoRA / LoRA time per token" in table
    assert "Embedded default train stage (params.yaml's data" in table and "padding-free batches) / the unpadded stage rate" in table
    train = json.loads((out / "train_cpu.json").read_text())
    assert {row["case"] for row in train["rows"]} == {"stage-olora", "stage-lora", "hand-olora", "default-olora"}
    default = next(row for row in train["rows"] if row["case"] == "default-olora")
    train["rows"].remove(default)
    # the default case: params.yaml's micro-batch and sequence length, packed, real tokens counted only
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert default["micro_batch"] == params["train"]["micro_batch_size"] and default["seq_len"] == params["data"]["max_seq_length"]
    assert default["padding_free"] is True and default["timed_steps"] == 2
    assert 0 < default["tokens"] <= 2 * default["micro_batch"] * default["seq_len"]  # real tokens of rows of every length
    for row in train["rows"]:  # every other case timed the same work: 2 steps x 2 examples x 64 tokens, no padding
        assert row["timed_steps"] == 2 and row["tokens"] == 2 * 2 * 64 and row["micro_batch"] == 2
        assert row["n_adapter"] > 0 and row["n_linear"] > row["n_adapter"]
        assert len(row["repeat_tokens_per_second"]) == 2
        assert row["profile"] is None  # profiled only when asked

    table = bench("bench_train.py", "--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1", "--max-examples", "300",
                  "--micro-batch", "2", "--seq-len", "64", "--repeats", "1", "--cases", "stage-olora", "hand-olora",
                  "--profile", "--out", str(out))
    assert "| case | tensor reads / step | CUDA syncs / step |" in table
    for row in json.loads((out / "train_cpu_profile.json").read_text())["rows"]:
        profile = row["profile"]  # the two timed steps, not the warm-up
        assert profile["profiled_steps"] == 2 and profile["host_reads_per_step"] >= 1 and profile["cuda_syncs_per_step"] is None
        assert profile["top_self_cpu"] and 0 < sum(share for _, share in profile["top_self_cpu"]) <= 1

    table = bench("bench_eval.py", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--limit", "2",
                  "--out", str(out))
    rows = {r["case"]: r for r in json.loads((out / "eval_cpu.json").read_text())["rows"]}
    assert set(rows) == {"stage-merged", "stage-unmerged", "lm-eval-cli"}
    # the same questions scored three ways give the same accuracy
    assert rows["stage-merged"]["mean_acc"] == pytest.approx(rows["stage-unmerged"]["mean_acc"])
    assert rows["stage-merged"]["mean_acc"] == pytest.approx(rows["lm-eval-cli"]["mean_acc"])
    assert rows["stage-merged"]["requests"] == rows["stage-unmerged"]["requests"] > 7 * 2
    backends = json.loads((out / "eval_backends_cpu.json").read_text())
    assert sorted(t["task"] for t in backends["tasks"]) == sorted(PAPER_TASKS)
    assert sum(t["requests"] for t in backends["tasks"]) == rows["stage-merged"]["requests"]  # the same requests
    assert all(t["decisions_equal"] and t["greedy_equal"] and t["max_abs_loglikelihood_diff"] < 1e-4 for t in backends["tasks"])
    assert "olora-prefix req/s" in table and "| all seven |" in table
    assert backends["repeats"] == 3 and len(backends["speedups"]) == 3 and len(backends["load_average"]) == 4  # the default
    assert "median of 3 alternating repeats" in table

    template = tmp_path / "prompt_template.json"
    from olora.data.templates import resolve_template

    template.write_text(json.dumps(resolve_template("alpaca").to_dict()))
    table = bench("bench_serve.py", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--template",
                  str(template), "--max-new-tokens", "4", "--repeats", "1", "--out", str(out))
    serve = json.loads((out / "serve.json").read_text())
    assert [r["case"] for r in serve["rows"]] == ["batch of 8", "one by one", "batch of 8, merged", "one by one, merged"]
    assert serve["identical_answers"] and serve["merge_speedup"] > 0
    assert "batch speed-up" in table and "merged vs unmerged, one by one" in table

    report = bench("report.py", "--results", str(out))
    assert "train stage >= 0.9x a hand-written PEFT loop" in report
    assert "eval: merged adapter vs unmerged" in report and "lm-eval CLI, whole process" in report
    assert "olora-prefix >= 2x hf requests/s" in report and "decides as hf on every question" in report
    assert (out / "REPORT.md").is_file()


def test_paired_benchmark_prints_its_table(tmp_path):
    table = bench("bench_paired.py", "--questions", "70", "700", "--resamples", "1000", "--repeats", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "paired.json").read_text())["rows"]
    assert [r["questions"] for r in rows] == [70, 700] and all(r["resamples"] == 1000 for r in rows)
    assert all(r["interval"][0] <= r["gain"] <= r["interval"][1] for r in rows)
    assert "| questions | resamples | median s |" in table


def test_eval_benchmark_refuses_a_missing_adapter(tmp_path):
    env = {**os.environ, "OLORA_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_eval.py"), "--adapter", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "run `dvc repro`" in done.stderr
