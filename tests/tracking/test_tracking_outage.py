"""Tracking outages against a real `mlflow server` that the tests stop and restart.

Down during training: training goes on, the values wait, and they reach the server once it is
back, each once; the run ends FINISHED, never FAILED for it. Down at the end of training: a clear
error naming the server; nothing is lost (outputs and the final checkpoint stay), and the rerun
continues the same run. Down during `register`: retried with backoff, then a clear error; the
rerun registers exactly one version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, PausedRun, free_port, sh, wait_for_http
from olora.layout import Layout
from olora.stages import STAGES
from overlay import write_params

pytestmark = [pytest.mark.integration, pytest.mark.fault]

FAST_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class MlflowServer:
    """A real tracking server (SQLite backend, proxied artifacts) whose data survives stop/start."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.process = folder, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_http(f"{self.url}/health")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(20)
        with pytest.raises(OSError):  # really gone
            import urllib.request

            urllib.request.urlopen(f"{self.url}/health", timeout=2)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.url, registry_uri=self.url)  # explicit: never a registry from the environment


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    if s.process and s.process.poll() is None:
        s.stop()


def _project(root: Path, model_dir: Path, server: MlflowServer) -> Layout:
    write_params(root, model_dir, {"tracking.uri": server.url, "tracking.retries": 2, "tracking.experiment": root.name,
                                   "evaluate.tasks": ["arc_easy"]})
    layout = Layout(root)
    STAGES["prepare"].run(layout)
    STAGES["init"].run(layout)
    return layout


def _runs(server: MlflowServer, experiment: str):
    c = server.client()
    return c, c.search_runs([c.get_experiment_by_name(experiment).experiment_id])


def _steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_outage_during_training_loses_nothing_and_fails_nothing(tmp_path, tiny_model_dir, server):
    layout = _project(tmp_path / "during", tiny_model_dir, server)
    run = PausedRun([str(BIN / "olora"), "train"], layout.root, ["train:saved-2", "train:saved-4"], tmp_path / "pause",
                    FAST_HTTP_RETRIES)
    run.wait("train:saved-2")
    server.stop()
    run.release("train:saved-2")
    run.wait("train:saved-4")  # steps 3 and 4 trained while the server was down; their send failed
    assert "unreachable" in run.output() and "training goes on" in run.output()
    server.start()
    run.release("train:saved-4")
    assert run.finish() == 0, run.output()[-3000:]

    c, runs = _runs(server, "during")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert _steps(c, run_id, "train/loss") == [1, 2, 3, 4, 5, 6]  # each step once, outage or not
    assert _steps(c, run_id, "val/loss") == [3, 6]
    assert json.loads((layout.root / "models/adapter/mlflow_run.json").read_text())["run_id"] == run_id


def test_outage_at_the_end_of_training_then_register_outage(tmp_path, tiny_model_dir, server):
    layout = _project(tmp_path / "after", tiny_model_dir, server)
    run = PausedRun([str(BIN / "olora"), "train"], layout.root, ["train:saved-2"], tmp_path / "pause", FAST_HTTP_RETRIES)
    run.wait("train:saved-2")
    server.stop()
    run.release("train:saved-2")
    assert run.finish() == 2
    assert "olora train: error: " in run.output()
    assert f"MLflow tracking server {server.url} after 2 attempts" in run.output()
    assert (layout.checkpoints / "checkpoint-6" / "trainer_state.json").is_file()  # the finished training is kept

    server.start()
    sh([str(BIN / "olora"), "train"], layout.root, extra_env=FAST_HTTP_RETRIES)
    metrics = json.loads(layout.metrics("train").read_text())
    assert metrics["resumed"] and metrics["steps"] == 6  # taken from the final checkpoint, not retrained
    c, runs = _runs(server, "after")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, continued
    assert _steps(c, runs[0].info.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert not layout.checkpoints.exists()

    STAGES["evaluate_base"].run(layout)
    STAGES["evaluate"].run(layout)
    server.stop()
    down = sh([str(BIN / "olora"), "register"], layout.root, check=False, extra_env=FAST_HTTP_RETRIES)
    assert down.returncode == 2
    # tracking.retries=2: one backoff ("retrying in 1s"), then a clear error; a bounded number of attempts, not a hang
    assert down.stderr.count("retrying in 1s") == 1 and "retrying in 2s" not in down.stderr, down.stderr[-2000:]
    assert "olora register: error: " in down.stderr and f"MLflow tracking server {server.url} after 2 attempts" in down.stderr
    server.start()
    # down again right after the version is created, before its card and alias: the rerun finishes that version
    paused = PausedRun([str(BIN / "olora"), "register"], layout.root, ["register:created"], tmp_path / "pause-register",
                       FAST_HTTP_RETRIES)
    paused.wait("register:created")
    server.stop()
    paused.release("register:created")
    assert paused.finish() == 2, paused.output()[-3000:]
    server.start()
    first = json.loads(sh([str(BIN / "olora"), "register"], layout.root, extra_env=FAST_HTTP_RETRIES).stdout)
    assert first["version"] == "1" and first["created"] is True
    version = c.get_model_version(first["name"], "1")
    assert version.description and c.get_model_version_by_alias(first["name"], "challenger").version == "1"
    assert [f.path for f in c.list_artifacts(version.run_id, "model_card")] == ["model_card/README.md"]
    again = json.loads(sh([str(BIN / "olora"), "register"], layout.root, extra_env=FAST_HTTP_RETRIES).stdout)
    assert again["version"] == "1" and again["created"] is False
    name = again["name"]
    assert [v.version for v in c.search_model_versions(f"name='{name}'")] == ["1"]
