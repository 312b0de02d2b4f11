"""The convergence study driver for real: DVC experiments + MLflow runs in a temp repo on the tiny overlay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlay import REPO, copy_project, write_params

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": os.environ["OLORA_NUM_THREADS"]}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_study_runs_dvc_experiments_tracked_in_mlflow_and_resumes(tmp_path, tiny_model_dir):
    root = tmp_path / "project"
    root.mkdir()
    copy_project(root)
    write_params(root, tiny_model_dir)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(cmd, root)
    params_before = (root / "params.yaml").read_text()
    study = [sys.executable, str(REPO / "experiments" / "convergence.py"), "--root", str(root), "--out", "docs",
             "--ranks", "4", "--seeds", "0", "--lrs", "1e-3", "--sweep-rank", "4", "--steps", "4",
             "--eval-every", "2", "--eval-examples", "8", "--eval-limit", "2"]
    sh(study, root)

    manifest = json.loads((root / "docs/results/convergence_runs.json").read_text())
    assert set(manifest["runs"]) == {"conv-olora-r4-lr1e-3-s0", "conv-lora-r4-lr1e-3-s0"}
    assert manifest["best_lr"] == {"olora": 1e-3, "lora": 1e-3}
    for name, run in manifest["runs"].items():
        assert not run["failed"], name
        assert [s for s, _ in run["val_curve"]] == [2, 4]
        assert run["train"]["steps"] == 4
        assert set(run["eval"]["tasks"]) >= {"arc_easy", "boolq", "piqa"}
    # DVC knows the experiments; the workspace is back at HEAD's parameters
    shown = sh([str(BIN / "dvc"), "exp", "list", "--name-only"], root).stdout.split()
    assert set(manifest["runs"]) <= set(shown)
    assert (root / "params.yaml").read_text() == params_before
    # MLflow holds one run per experiment, and the study's registered model has a version per adapter
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}", registry_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("olora-convergence").experiment_id])
    assert {r.info.run_id for r in runs} == {run["mlflow"]["run_id"] for run in manifest["runs"].values()}
    assert len(client.search_model_versions("name='olora-convergence'")) == 2
    report = (root / "docs/results.md").read_text()
    assert "| 4 | olora | 0.001 |" in report and "| 4 | lora | 0.001 |" in report
    assert (root / "docs/figures/convergence_val_loss.png").stat().st_size > 1000

    # a second invocation resumes: every run is recorded, so no new experiment starts
    sh(study, root)
    assert len(sh([str(BIN / "dvc"), "exp", "list", "--name-only"], root).stdout.split()) == len(shown)
