"""Prefect flows on the tiny overlay under prefect_test_harness: stages, DVC lock, MLflow, retries, OOM back-off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import olora.stages.evaluate
import olora.stages.init
import olora.stages.prepare
import olora.stages.train
from olora.stages import STAGES
from olora.errors import ConfigError, OloraError

from conftest import REPO, free_port, running_server
from overlay import copy_project, write_params

pytestmark = pytest.mark.integration


def test_retry_classification_and_backoff_are_pure():
    from flows import olora_pipeline as flows
    from olora.tracking.client import TrackingError

    assert flows.is_transient(ConnectionError("reset")) and flows.is_transient(TrackingError("down"))
    assert not flows.is_transient(ConfigError("adapter.r=0")) and not flows.is_transient(OloraError("bad data"))
    assert flows.halved_batch(8, 1) == (4, 2) and flows.halved_batch(3, 2) == (1, 4)
    with pytest.raises(OloraError, match="micro_batch_size=1"):
        flows.halved_batch(1, 8)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    with prefect_test_harness(server_startup_timeout=90):
        yield


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    """The deploying checkout: committed, with a DVC remote outside it (git-ignored config.local, as `make stack` does)."""
    root = tmp_path_factory.mktemp("flowproject")
    copy_project(root)
    write_params(root, tiny_model_dir, {"evaluate.tasks": ["arc_easy", "piqa"]})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(args, cwd=root, check=True, env=env)
    remote = tmp_path_factory.mktemp("dvc-remote")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "remote", "add", "--local", "-d", "team", str(remote)],
                   cwd=root, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=root, check=True, env=env)
    return root


def _snapshot(root: Path) -> tuple[str, str, str, str]:
    """What the deploying checkout shows: git status, params.yaml, HEAD, and every output a run would write there.

    (Git-ignored state it shares with its runs is allowed: the tracking store mlflow.db and the
    runs' workspaces under .olora/runs.)"""
    outputs = sorted(str(p.relative_to(root)) for d in ("data/prepared", "models/init", "models/adapter", "metrics", "reports")
                     if (root / d).exists() for p in [root / d])
    return (git(root, "status", "--porcelain", "--untracked-files=all"), (root / "params.yaml").read_text(),
            git(root, "rev-parse", "HEAD"), " ".join(outputs) + str((root / "dvc.lock").exists()))


def test_isolated_run_is_recorded_and_restores_in_a_fresh_clone(harness, project, tmp_path, monkeypatch):
    from flows import olora_pipeline as flows
    from mlflow import MlflowClient

    calls = {"train": [], "evaluate": 0}
    real_train, real_evaluate = olora.stages.train.train, olora.stages.evaluate.evaluate

    def train_ooms_above_two(layout, *args, **kwargs):
        micro = yaml.safe_load(layout.params.read_text())["train"]["micro_batch_size"]
        calls["train"].append(micro)
        if micro > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_train(layout, *args, **kwargs)

    def evaluate_flaky(layout, *args, **kwargs):
        calls["evaluate"] += 1
        if calls["evaluate"] == 1:
            raise ConnectionError("connection reset by peer (injected)")
        return real_evaluate(layout, *args, **kwargs)

    monkeypatch.setattr(olora.stages.train, "train", train_ooms_above_two)
    monkeypatch.setattr(olora.stages.evaluate, "evaluate", evaluate_flaky)
    monkeypatch.setattr(flows.run_stage, "retry_delay_seconds", [0, 0])

    before = _snapshot(project)
    out = flows.olora_pipeline(root=str(project), promote=True, push=True, name="first")
    results = out["stages"]
    assert [r["stage"] for r in results] == list(STAGES) and all(r["ran"] for r in results)
    assert calls["train"] == [4, 2]  # halved once, then fit
    assert calls["evaluate"] == 2  # the failed adapter evaluation and its retry

    # the deploying checkout is untouched; the run is a commit on runs/first in its repository (no origin here)
    assert _snapshot(project) == before
    assert out["olora.git_branch"] == "runs/first" and out["olora.git_remote"] == str(project)
    assert git(project, "rev-parse", "runs/first").strip() == out["olora.git_commit"]
    params = yaml.safe_load(git(project, "show", "runs/first:params.yaml"))["train"]
    assert (params["micro_batch_size"], params["gradient_accumulation_steps"]) == (2, 2)  # the OOM back-off, recorded
    lock = yaml.safe_load(git(project, "show", "runs/first:dvc.lock"))["stages"]
    assert set(lock) == set(STAGES)
    assert not (workspace_dir := project / ".olora" / "runs" / "first").exists(), workspace_dir  # removed once recorded

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}", registry_uri=f"sqlite:///{project / 'mlflow.db'}")  # the source's store, not one in the workspace
    registration = json.loads(git(project, "show", "runs/first:reports/registration.json"))
    assert registration["registered"] and registration["version"] == "1"
    version = client.get_model_version_by_alias(registration["name"], "champion")
    assert str(version.version) == "1" and version.tags["olora.git_commit"] == out["olora.git_commit"]
    assert client.get_run(registration["run_id"]).data.tags["olora.git_branch"] == "runs/first"

    # a fresh clone restores the exact params, data and adapter from the registered version
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(project), str(fresh)], check=True)
    shutil.copy(project / ".dvc" / "config.local", fresh / ".dvc" / "config.local")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    restored = subprocess.run([str(bin_dir / "olora"), "restore", "--model", registration["name"], "--alias", "champion"], cwd=fresh, env=env,
                              capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert git(fresh, "rev-parse", "HEAD").strip() == out["olora.git_commit"]
    status = subprocess.run([str(bin_dir / "dvc"), "status"], cwd=fresh, capture_output=True, text=True, env=env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout  # every output matches dvc.lock's hashes
    recorded = json.loads(version.tags["artifact_sha256"])["adapter/adapter_model.safetensors"]
    import hashlib

    assert hashlib.sha256((fresh / "models/exported/adapter_model.safetensors").read_bytes()).hexdigest() == recorded


def test_config_error_fails_fast_without_retries(harness, project, monkeypatch):
    from flows import olora_pipeline as flows
    from olora.errors import DataError

    calls = []
    real_prepare = olora.stages.prepare.prepare

    def counting_prepare(layout, *args, **kwargs):
        calls.append(1)
        return real_prepare(layout, *args, **kwargs)

    monkeypatch.setattr(olora.stages.prepare, "prepare", counting_prepare)
    before = _snapshot(project)
    # a data file the deploying checkout need not hold (the workspace pulls it): refused by the stage, once
    with pytest.raises(DataError, match="data.source file .*missing.jsonl not found"):
        flows.olora_pipeline(root=str(project), overrides={"data.source": "data/raw/missing.jsonl"}, push=False, name="bad-1")
    assert calls == [1]
    # the failed run's workspace is kept (for inspection or a rerun); the deploying checkout is untouched
    assert (project / ".olora" / "runs" / "bad-1" / "params.yaml").is_file()
    # what a stage's pre-flight refuses (`olora check`'s checks) and a bad value: before any stage or workspace
    for name, overrides, message in (("bad-2", {"adapter.target_modules": ["nope_proj"]}, "match no linear layer"),
                                     ("bad-3", {"adapter.r": 0}, r"adapter.r=0 is out of range")):
        with pytest.raises(ConfigError, match=message):
            flows.olora_pipeline(root=str(project), overrides=overrides, push=False, name=name)
        assert calls == [1]
        assert not (project / ".olora" / "runs" / name).exists()
    assert _snapshot(project) == before


def test_deployment_runs_on_a_real_server_and_worker(tmp_path, tiny_model_dir):
    """prefect server + process work pool + `prefect deploy` from prefect.yaml + one worker run (git_clone pull)."""
    import urllib.request

    root = tmp_path / "project"
    root.mkdir()
    copy_project(root)
    write_params(root, tiny_model_dir, {"evaluate.tasks": ["arc_easy"]})
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = Path(sys.executable).parent
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PWD": str(root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # the team's store; the worker's clone is temporary
    }
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "team", str(tmp_path / "dvc-remote")],  # outside the clones
                 ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=root, check=True, env=env, capture_output=True)
    env.update(OLORA_GIT_REMOTE=str(root), OLORA_GIT_BRANCH="main")  # the git remote workers clone (here: a local repo)

    command = lambda p: [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p)]  # noqa: E731
    with running_server(command, tmp_path, "/api/health", env, seconds=90, port=port):

        def prefect(*args: str, timeout: int = 300) -> str:
            out = subprocess.run([str(bin_dir / "prefect"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            return out.stdout

        prefect("work-pool", "create", "olora-process", "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/deployments/filter", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        names = {d["name"] for d in json.loads(urllib.request.urlopen(req, timeout=10).read())}
        assert names >= {"nightly-retrain", "on-demand", "sweep", "local-dev", "on-new-data", "data-watch"}
        # the sweep deployment starts one on-demand flow run per variant; two workers pick them up at once
        started = prefect("deployment", "run", "olora-sweep/sweep", "--param", 'grid={"adapter.r": [2, 4]}',
                          "--param", "push=false")
        run_id = next(line.split()[-1] for line in started.splitlines() if "UUID" in line)
        workers = [subprocess.Popen([str(bin_dir / "prefect"), "worker", "start", "--pool", "olora-process", "--name", f"w{i}"],
                                    cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True) for i in (1, 2)]
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/flow_runs/{run_id}", timeout=10) as response:
                    state = json.loads(response.read())["state"]["type"]
                if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(3)
        finally:
            for w in workers:
                os.killpg(w.pid, 15)
                try:
                    w.wait(timeout=60)
                except subprocess.TimeoutExpired:  # a loaded machine: a worker slow to stop is not the test's subject
                    os.killpg(w.pid, 9)
                    w.wait(timeout=60)
        if state != "COMPLETED":
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/logs/filter", data=json.dumps(
                {"logs": {"level": {"ge_": 30}}, "limit": 50}).encode(), headers={"Content-Type": "application/json"})
            logs = "\n".join(entry["message"][-1500:] for entry in json.loads(urllib.request.urlopen(req, timeout=10).read()))
            pytest.fail(f"the sweep ended {state}:\n{logs}")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/flow_runs/filter", data=json.dumps(
            {"deployments": {"name": {"any_": ["on-demand"]}}}).encode(), headers={"Content-Type": "application/json"})
        variants = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert len(variants) == 2 and {v["state"]["type"] for v in variants} == {"COMPLETED"}
        # each variant: cloned from the remote, recorded as its own runs/ branch there; the remote's checkout untouched
        assert not (root / "dvc.lock").exists() and git(root, "status", "--porcelain") == ""
        branches = git(root, "branch", "--list", "runs/*", "--format=%(refname:short)").split()
        assert len(branches) == 2
        assert sorted(yaml.safe_load(git(root, "show", f"{b}:params.yaml"))["adapter"]["r"] for b in branches) == [2, 4]
        assert all(json.loads(git(root, "show", f"{b}:reports/registration.json"))["registered"] for b in branches)
        from mlflow import MlflowClient

        registry = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        name = json.loads(git(root, "show", f"{branches[0]}:reports/registration.json"))["name"]
        tagged = {v.tags.get("olora.git_branch") for v in registry.search_model_versions(f"name='{name}'")}
        assert tagged == set(branches)  # two versions, each carrying its run's git ref
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/artifacts/filter", data=json.dumps(
            {"artifacts": {"key": {"any_": ["olora-sweep"]}}}).encode(), headers={"Content-Type": "application/json"})
        table = json.loads(urllib.request.urlopen(req, timeout=10).read())[0]["data"]
        assert "| 2 | COMPLETED |" in table and "| 4 | COMPLETED |" in table
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/deployments/name/olora-pipeline/nightly-retrain", timeout=10) as response:
            deployment = json.loads(response.read())
        assert any(s["schedule"].get("cron") == "0 3 * * *" for s in deployment["schedules"])


def test_sweep_runs_each_variant_as_its_own_recorded_run(harness, project):
    from flows import olora_pipeline as flows
    from prefect.artifacts import Artifact

    before = _snapshot(project)
    # here, without a deployment, variants run as subflows (the deployment path: the real-server test above)
    rows = flows.olora_sweep(root=str(project), grid={"adapter.init": ["lora"], "adapter.r": [2]}, push=False)
    assert [r["variant"] for r in rows] == [{"adapter.init": "lora", "adapter.r": 2}]
    assert all(r["state"] == "COMPLETED" and 0.0 <= r["mean_acc"] <= 1.0 and r["final_val_loss"] > 0 for r in rows)
    for row in rows:  # and its own runs/ branch, holding that variant's params
        assert yaml.safe_load(git(project, "show", f"{row['branch']}:params.yaml"))["adapter"]["init"] == row["variant"]["adapter.init"]
    assert _snapshot(project) == before  # the sweep never touched the deploying checkout
    artifact = Artifact.get("olora-sweep")
    assert artifact is not None and "| lora | 2 | COMPLETED |" in artifact.data
