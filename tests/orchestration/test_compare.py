"""`olora compare`: bad input refused before work (unit), and the whole comparison on a real Prefect server and worker,
real Optuna and MLflow, with a trial killed mid-run and a resumed second invocation (integration)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from olora.errors import ConfigError, OloraError
from olora.orchestration import compare
from olora.orchestration.search import SearchSettings

from conftest import REPO, free_port, running_server
from overlay import copy_project, write_params

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("compare-source")
    copy_project(root)
    write_params(root, tiny_model_dir)
    return root


@pytest.mark.parametrize("spec, message", [
    (dict(methods=("olora", "nope")), r"unknown method 'nope' in --methods: .*adapter.init='nope' is not allowed; choose one of: "),
    (dict(methods=("olora",)), r"at least two different methods"),
    (dict(search=SearchSettings(lr_low=1e-3, lr_high=1e-4)), r"rate range \[0.001, 0.0001\] is inverted"),
    (dict(search=SearchSettings(lr_low=1e-3, lr_high=1e-3)), r"is empty"),
    (dict(search=SearchSettings(lr_low=0.0)), r"low end must be a finite rate > 0"),
    (dict(search=SearchSettings(trials=2, startup_trials=2)), r"trial budget 2 .* at least 3"),
    (dict(ranks=(4, 4096)), r"rank 4096 in --ranks: adapter.r=4096 is larger than the smaller dimension"),
    (dict(seeds=(0,)), r"at least two different seeds"),
    (dict(seeds=(1, 1)), r"at least two different seeds"),
    (dict(search=SearchSettings(heartbeat=5, grace=5)), r"grace > heartbeat"),
])
def test_bad_input_is_refused_by_name_before_any_work(source, spec, message):
    with pytest.raises(ConfigError, match=message):
        compare.check(source, compare.CompareSpec(**{"ranks": (4,), **spec}))
    assert not (source / ".olora").exists() and not (source / "mlflow.db").exists()  # nothing was started or written


def test_cli_refuses_without_a_prefect_server_and_adopts_a_block(source, monkeypatch, tmp_path):
    from olora.admin import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "")
    with pytest.raises(OloraError, match="no Prefect server is set: export PREFECT_API_URL"):
        compare.run(source, compare.CompareSpec(ranks=(4,)))
    assert main(["--root", str(source), "compare", "--methods", "olora,typo"]) == 2  # refused, exit code 2
    block = tmp_path / "adopt.yaml"
    block.write_text(compare.adopt_yaml({"adapter.init": "lora", "adapter.r": 2, "adapter.alpha": 4.0,
                                          "train.learning_rate": 0.002}))
    params = (source / "params.yaml").read_text()
    try:
        assert main(["--root", str(source), "compare", "--adopt", str(block)]) == 0
        from olora.config import load_config

        cfg = load_config(source / "params.yaml")
        assert (cfg.adapter.init, cfg.adapter.r, cfg.adapter.alpha, cfg.train.learning_rate) == ("lora", 2, 4.0, 0.002)
    finally:
        (source / "params.yaml").write_text(params)


def _api(port: int, path: str, body: dict | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=20).read())


@pytest.mark.integration
def test_compare_on_a_real_server_and_worker_retries_a_killed_trial_and_resumes(tmp_path, tiny_model_dir):
    root = tmp_path / "project"
    root.mkdir()
    copy_project(root)
    write_params(root, tiny_model_dir, {"evaluate.tasks": ["arc_easy", "piqa"], "evaluate.limit": 4})
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PWD": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OLORA_NUM_THREADS": "1"}
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=root, check=True, env=env, capture_output=True)
    env.update(OLORA_GIT_REMOTE=str(root), OLORA_GIT_BRANCH="main")
    command = lambda p: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p)]  # noqa: E731
    with running_server(command, tmp_path, "/api/health", env, seconds=90, port=port, log_path=tmp_path / "server.log"):
        for args in (["work-pool", "create", "olora-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            out = subprocess.run([str(BIN / "prefect"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # the worker's flow runs pause at a trial's first reported validation loss: the test kills the first one there
        worker_env = {**env, "OLORA_PAUSE_AT": "search:reported", "OLORA_PAUSE_DIR": str(pause)}
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "olora-process", "--name", "w1"],
                                  cwd=tmp_path, env=worker_env, stdout=open(tmp_path / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        cmd = [str(BIN / "olora"), "compare", "--methods", "olora,lora", "--ranks", "8", "--seeds", "0,1", "--trials", "2",
               "--startup-trials", "1", "--steps", "4", "--eval-steps", "2", "--heartbeat", "1", "--grace", "6",
               "--lr-range", "1e-4,3e-2", "--no-push"]
        try:
            first = subprocess.Popen(cmd, cwd=root, env=env, stdout=open(tmp_path / "compare1.log", "w"), stderr=subprocess.STDOUT)
            reached = pause / "search:reported.reached"
            deadline = time.monotonic() + 600
            while not reached.exists():
                assert first.poll() is None, (tmp_path / "compare1.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no trial reported a validation loss"
                time.sleep(0.2)
            time.sleep(0.3)
            killed = int(reached.read_text())
            os.kill(killed, signal.SIGKILL)  # the trial's process dies as a lost worker's would, mid-training
            (pause / "search:reported").touch()  # every other trial goes on
            assert first.wait(1500) == 0, (tmp_path / "compare1.log").read_text()[-6000:]
            out = json.loads((tmp_path / "compare1.log").read_text()[(tmp_path / "compare1.log").read_text().index("{\n"):])
            started = {"deployments": {"name": {"any_": ["search-trial", "on-demand"]}}}  # what a comparison starts
            runs_after_first = len(_api(port, "flow_runs/filter", started))
            assert runs_after_first == 4 + 1 + 4  # two trials per study, the killed one's retry, the pipeline runs
            # a second invocation resumes: nothing runs again, the same report comes back
            second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
            assert len(_api(port, "flow_runs/filter", started)) == runs_after_first
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(60)

    key = out["key"]
    report = Path(out["report"]).read_text()
    for section in ("## Rank 8", "### Validation loss", "### Steps to the target loss", "### Paired per-question accuracy",
                    "### Rate sensitivity", "## Winning configuration", "| lora - olora |"):
        assert section in report, section
    folder = root / "reports" / "compare" / key
    assert all((folder / f).stat().st_size > 1000 for f in ("val_loss_r8.png", "lr_r8.png"))
    analysis = json.loads((folder / "analysis.json").read_text())["8"]
    trials = [t for rows in analysis["trials"].values() for t in rows]
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert len(failed) == 1, trials  # the killed trial: marked failed, never silently lost
    retry = [t for t in trials if t["retry_of"] == failed[0]["number"]]
    assert len(retry) == 1 and retry[0]["state"] in ("COMPLETE", "PRUNED") and retry[0]["lr"] == failed[0]["lr"]
    assert all(sum(t["state"] in ("COMPLETE", "PRUNED") for t in rows) == 2 for rows in analysis["trials"].values())
    assert set(analysis["steps"]) == {"olora", "lora"} and analysis["target"] > 0
    from mlflow import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = c.get_run(out["parent_run"])
    assert parent.info.status == "FINISHED" and parent.data.params["winner.adapter.init"] in ("olora", "lora")
    children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) >= 4 + 4  # four pipeline runs and at least four trials (the killed one's run too)
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "compare")} >= {"compare/report.md", "compare/adopt.yaml"}
    # the winner's block, adopted in one command
    subprocess.run([str(BIN / "olora"), "compare", "--adopt", f"reports/compare/{key}/adopt.yaml"], cwd=root, env=env, check=True,
                   capture_output=True)
    from olora.config import load_config

    cfg = load_config(root / "params.yaml")
    assert (cfg.adapter.init, cfg.adapter.r, cfg.train.learning_rate) == (
        parent.data.params["winner.adapter.init"], 8, float(parent.data.params["winner.train.learning_rate"]))


@pytest.mark.integration
def test_a_trial_reports_each_validation_loss_and_the_median_pruner_stops_a_hopeless_one(tmp_path, tiny_model_dir):
    """search.run_trial in-process (the search-trial flow's body): real Optuna (SQLite), real stages and MLflow."""
    import optuna
    from mlflow import MlflowClient

    from olora.orchestration import search

    root = tmp_path / "project"
    root.mkdir()
    copy_project(root)
    write_params(root, tiny_model_dir)
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=root, check=True, capture_output=True)
    settings = SearchSettings(lr_low=1e-8, lr_high=1e-2, trials=2, startup_trials=1, steps=6, eval_steps=2, heartbeat=1, grace=5)
    url, uri = search.storage_url(root), f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = search.open_study(url, "s", settings)
    study.enqueue_trial({"learning_rate": 1e-2})  # a rate that learns
    study.enqueue_trial({"learning_rate": 1e-8})  # one that cannot: worse than the median at its first report
    args = (root, url, "s", "lora", 4, 2.0, settings, uri, "parent-run-id")
    first, second = search.run_trial(*args, name="a"), search.run_trial(*args, name="b")
    assert first["pruned_at"] is None and second["pruned_at"] == 2
    assert search.run_trial(*args, name="c") == {"study": "s", "ran": False}  # the budget is spent: nothing runs
    trials = search.open_study(url, "s", settings).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert sorted(trials[0].intermediate_values) == [2, 4, 6] and sorted(trials[1].intermediate_values) == [2]
    c = MlflowClient(uri)
    pruned = c.get_run(trials[1].user_attrs["mlflow_run"])
    assert pruned.data.tags["mlflow.parentRunId"] == "parent-run-id" and pruned.data.tags["olora.trial_state"] == "PRUNED"
    assert pruned.data.metrics["train/final_val_loss"] == pytest.approx(trials[1].intermediate_values[2])
    assert not list((root / ".olora" / "runs").iterdir())  # each trial's workspace removed


def test_compare_needs_tracking(source):
    from olora.config import edit_params

    params = (source / "params.yaml").read_text()
    try:
        edit_params(source / "params.yaml", {"tracking.enabled": False})
        with pytest.raises(ConfigError, match="tracking.enabled is false in params.yaml: set it to true"):
            compare.check(source, compare.CompareSpec(ranks=(4,)))
    finally:
        (source / "params.yaml").write_text(params)


@pytest.mark.integration
def test_a_stopped_comparison_takes_over_its_waiting_flow_runs_instead_of_starting_them_twice(tmp_path):
    """`olora compare` (and a sweep) stopped after starting its pipeline runs, then run again while no worker has
    picked them up: the same flow runs are waited for, not duplicated; a cancelled or running one is started anew."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Running

    from olora.orchestration import pipeline as P

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = lambda p: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p)]  # noqa: E731
    with running_server(command, tmp_path, "/api/health", env, seconds=90, port=port, log_path=tmp_path / "server.log"), \
            temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("olora-pipeline")
        client.create_deployment(flow_id, "on-demand", parameters={"promote": True, "push": True, "commit": None})  # no worker
        variants = [{"adapter.init": m, "adapter.r": 8, "train.learning_rate": 1e-4} for m in ("olora", "lora")]
        names = ["cmp-k-olora-r8-s0", "cmp-k-lora-r8-s0"]
        first = P.start_runs("olora-pipeline/on-demand", variants, names, push=False)
        assert P.start_runs("olora-pipeline/on-demand", variants, names, push=False) == first  # taken over, none new
        assert len(client.read_flow_runs()) == 2
        client.set_flow_run_state(first[names[0]], Cancelled(), force=True)
        client.set_flow_run_state(first[names[1]], Running(), force=True)
        third = P.start_runs("olora-pipeline/on-demand", variants, names, push=False)
        assert set(third.values()).isdisjoint(first.values()) and len(client.read_flow_runs()) == 4
        other = P.start_runs("olora-pipeline/on-demand", [{**variants[0], "train.learning_rate": 2e-4}], names[:1], push=False)
        assert other[names[0]] != third[names[0]]  # same name, other parameters: not the same run
        assert P.start_runs("olora-pipeline/on-demand", variants, names, push=True).keys() == set(names)
        assert len(client.read_flow_runs()) == 7  # push differs: two more, never a takeover of another variant's run
