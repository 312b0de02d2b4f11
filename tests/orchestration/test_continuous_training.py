"""Continuous training end to end on local real services: a `prefect server` with `prefect deploy --all` and a process
worker, a bare git remote, a DVC remote folder, SQLite MLflow, the tiny model (the scenario: tests/continuous.py;
the same on `make stack`'s services: tests/ops/test_stack.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, free_port, running_server
from continuous import BIN, MODEL, Team, scenario, start_project
from olora.overlay import copy_project, write_params

pytestmark = pytest.mark.integration
TIMINGS = os.environ.get("OLORA_CT_TIMINGS")  # bench/bench_continuous.py reads the measured times from here
SCREENSHOTS = os.environ.get("OLORA_CT_SCREENSHOTS")  # and, with chromium installed, takes the docs' pictures here


def test_new_data_retrains_on_its_commit_and_the_server_follows_the_champion(tmp_path, tiny_untied_model_dir):
    remote, storage, dev = tmp_path / "team.git", tmp_path / "dvc-remote", tmp_path / "dev"
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OLORA_GIT_REMOTE": str(remote),
           "OLORA_GIT_BRANCH": "main", "OLORA_RUNS_DIR": str(tmp_path / "runs"), "OLORA_DVC_CACHE": str(tmp_path / "cache")}

    def sh(*args: str, cwd: Path = dev) -> str:
        out = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    # the team's repository: the tiny project with a committed DVC remote, its first data version published
    sh("git", "init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    dev.mkdir()
    copy_project(dev)
    write_params(dev, tiny_untied_model_dir, {"evaluate.tasks": ["arc_easy"], "data.source": "data/raw/train.jsonl",
                                              "register.model_name": MODEL})
    shutil.copy(REPO / "prefect.yaml", dev / "prefect.yaml")
    shutil.copytree(REPO / "flows", dev / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 ["git", "remote", "add", "origin", str(remote)], ["dvc", "init", "-q"],
                 ["dvc", "remote", "add", "-d", "team", str(storage)], ["git", "add", "-A"], ["git", "commit", "-qm", "project"],
                 ["git", "push", "-q", "origin", "main"]):
        sh(*args)
    start_project(dev, env)

    command = lambda p: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p)]  # noqa: E731
    with running_server(command, tmp_path, "/api/health", env, seconds=120, port=port,
                        log_path=tmp_path / "prefect-server.log") as base:
        sh("prefect", "work-pool", "create", "olora-process", "--type", "process")
        sh("prefect", "--no-prompt", "deploy", "--all")
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "olora-process", "--name", "w1"],
                                  cwd=tmp_path, env=env, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            timings = scenario(Team(dev, remote, env, f"{base}/api",
                                    screenshots=Path(SCREENSHOTS) if SCREENSHOTS else None), tmp_path)
        finally:
            os.killpg(worker.pid, 15)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                worker.wait(timeout=60)
    print(json.dumps(timings))
    if TIMINGS:
        Path(TIMINGS).write_text(json.dumps(timings))
