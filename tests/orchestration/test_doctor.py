"""`olora doctor` on a real project: a run recorded on runs/first (its outputs in a local DVC remote), registered in a
SQLite MLflow registry and promoted to champion; then one record broken at a time, each found by name and repaired.

The run is made with the orchestration functions the flows call (workspace, stages under DVC, record, promote),
without Prefect: the same records, in a fraction of the time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from olora import cli
from olora.core import integrity
from olora.layout import Layout
from olora.stages import STAGES

from overlay import copy_project, write_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model_dir):
    """(project, DVC remote, registered model name): one recorded, registered, promoted run."""
    from olora.config import load_config
    from olora.orchestration import pipeline as P
    from olora.orchestration import workspace
    from olora.tracking.client import Tracking

    root = tmp_path_factory.mktemp("doctor")
    copy_project(root)
    write_params(root, tiny_model_dir, {"evaluate.tasks": ["arc_easy"]})
    remote = tmp_path_factory.mktemp("dvc-remote")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 ["dvc", "init", "-q"], ["dvc", "remote", "add", "--local", "-d", "team", str(remote)],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=root, check=True, env=env, capture_output=True)
    tracking = Tracking.of(load_config(root / "params.yaml"), root)
    ws = Layout(P.open_workspace(root, "first"))
    for stage in STAGES:
        P.run_stage(stage, ws, tracking)
    P.promote(ws, tracking)
    P.record(ws, "first", None, True, tracking)
    workspace.remove(ws.root)
    registration = json.loads(subprocess.run(["git", "show", "runs/first:reports/registration.json"], cwd=root,
                                                 check=True, capture_output=True, text=True).stdout)
    assert registration["version"] == "1"
    return root, remote, registration["name"], tracking


def _doctor(root: Path, capsys, monkeypatch, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(root)  # as a user runs it: the champion's base model is named relative to the project
    code = cli.main(["--root", str(root), "doctor", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def _object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def test_a_healthy_project_passes(recorded, capsys, monkeypatch):
    root, _, name, _ = recorded
    code, out = _doctor(root, capsys, monkeypatch)
    assert code == 0, out
    assert "OK: checked 1 registered version(s), 2 alias(es), 1 recorded run(s)" in out, out  # champion and challenger


def test_a_missing_dvc_object_is_named_with_its_branch(recorded, capsys, monkeypatch):
    root, remote, _, _ = recorded
    lock = yaml.safe_load(subprocess.run(["git", "show", "runs/first:dvc.lock"], cwd=root, check=True, capture_output=True,
                                         text=True).stdout)
    out_md5 = {o["path"]: o["md5"] for o in lock["stages"]["train"]["outs"]}["models/exported"]  # a folder: its .dir manifest
    manifest = _object(remote, out_md5)
    entry = next(e for e in json.loads(manifest.read_text()) if e["relpath"] == "adapter_model.safetensors")
    gone, kept = _object(remote, entry["md5"]), root.parent / "kept-object"
    shutil.move(gone, kept)
    try:
        code, out = _doctor(root, capsys, monkeypatch, "--no-load")
        assert code == 1, out
        assert "BROKEN branch runs/first" in out and "missing from the DVC remote: models/exported/adapter_model.safetensors" in out, out
        assert "dvc push" in out and "1 problem(s)" in out, out
    finally:
        shutil.move(kept, gone)
    assert _doctor(root, capsys, monkeypatch, "--no-load")[0] == 0


def test_a_deleted_artifact_and_the_broken_champion_are_named(recorded, capsys, monkeypatch):
    from mlflow import MlflowClient

    root, _, name, tracking = recorded
    c = MlflowClient(tracking.uri, registry_uri=tracking.uri)
    run_id = c.get_model_version(name, "1").run_id
    artifacts = Path(c.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    weights = artifacts / integrity.MODEL_DIR / "artifacts/adapter/adapter_model.safetensors"
    kept = root.parent / "kept-weights"
    shutil.move(weights, kept)
    try:
        code, out = _doctor(root, capsys, monkeypatch)
        assert code == 1, out
        assert (f"BROKEN {name} version 1: artifact file(s) missing from run {run_id}: "
                "model/artifacts/adapter/adapter_model.safetensors") in out, out
        assert f"BROKEN alias champion of {name}: points at version 1, which is broken" in out, out
        assert "olora restore" in out and "olora rollback" in out, out
    finally:
        shutil.move(kept, weights)


def test_a_champion_that_does_not_load_is_named(recorded, capsys, monkeypatch):
    """Every file is there, but the base model the version names is gone: the champion cannot load."""
    root, _, name, _ = recorded
    base = root / "models/base"
    moved = root.parent / "moved-base"
    shutil.move(base, moved)
    try:
        code, out = _doctor(root, capsys, monkeypatch)
        assert code == 1, out
        assert f"BROKEN alias champion of {name}: points at version 1, which does not load:" in out, out
        assert f"BROKEN {name} version 1" not in out, out  # the version's own records are whole
    finally:
        shutil.move(moved, base)


def test_a_deleted_run_is_named_and_restorable(recorded, capsys, monkeypatch):
    from mlflow import MlflowClient

    root, _, name, tracking = recorded
    c = MlflowClient(tracking.uri, registry_uri=tracking.uri)
    run_id = c.get_model_version(name, "1").run_id
    c.delete_run(run_id)
    try:
        code, out = _doctor(root, capsys, monkeypatch, "--no-load")
        assert code == 1 and f"BROKEN {name} version 1: its MLflow run {run_id} is deleted" in out, out
        assert f"mlflow runs restore --run-id {run_id}" in out, out
    finally:
        c.restore_run(run_id)
    assert _doctor(root, capsys, monkeypatch, "--no-load")[0] == 0
