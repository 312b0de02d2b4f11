"""Nothing lost: runs whose MLflow store or DVC remote would be deleted with their clone or workspace are refused
before any stage; the README's one-machine deployment set-up, run as written on a real Prefect server and worker,
leaves the version and its adapter retrievable from the user's checkout, and the run's logs tell its story."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, free_port, running_server, wait_for_http
from olora.overlay import copy_project, write_params



def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def checkout(root: Path, model_dir: Path, extra: dict | None = None) -> Path:
    """A user's clone of the project: the tiny overlay, prefect.yaml, flows/, and the repository's own .dvc/config
    (its relative remote `../.dvc-remote`), committed on main."""
    root.mkdir(parents=True)
    copy_project(root)
    write_params(root, model_dir, extra)
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"],
                 ["git", "config", "user.name", "t"], ["dvc", "init", "-q"]):
        subprocess.run(args, cwd=root, check=True, env=env, capture_output=True)
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(args, cwd=root, check=True, env=env, capture_output=True)
    return root


def test_which_tracking_stores_outlive_a_worker_clone(monkeypatch):
    """The rule on real folders: a store in Prefect's worker folder (tmp…prefect) or relative to the clone is lost."""
    from olora.orchestration.durable import run_folders, tracking_problem
    from olora.tracking.client import Tracking

    with tempfile.TemporaryDirectory(suffix="prefect") as worker:
        clone = Path(worker) / "olora-main"
        clone.mkdir()
        folders = run_folders(clone, clone / ".olora" / "runs" / "r1")
        assert [f.path for f in folders] == [Path(worker).resolve(), clone / ".olora" / "runs" / "r1"] and folders[0].clone
        monkeypatch.chdir(clone)  # where set_working_directory leaves the flow run
        lost = {uri: tracking_problem(Tracking(uri), folders) for uri in (
            "sqlite:///mlflow.db", f"sqlite:///{clone}/mlflow.db", "mlruns", "sqlite://",
            "sqlite:////srv/olora/mlflow.db", "file:///srv/olora/mlruns", "http://127.0.0.1:5000", "postgresql://u@db/mlflow")}
        assert [uri for uri, why in lost.items() if why] == ["sqlite:///mlflow.db", f"sqlite:///{clone}/mlflow.db", "mlruns",
                                                            "sqlite://"]
        assert "lies inside the Prefect worker's temporary folder" in lost["sqlite:///mlflow.db"]
        assert tracking_problem(Tracking("sqlite:///mlflow.db", enabled=False), folders) is None
    assert run_folders(REPO, None) == []  # a checkout elsewhere, no workspace: nothing is deleted


@pytest.mark.integration
def test_relative_remote_is_pinned_in_workspaces_and_refused_in_a_worker_clone(tmp_path, tiny_model_dir, monkeypatch):
    from olora.orchestration import durable, workspace
    from olora.orchestration.publish import announce_new_versions

    monkeypatch.delenv("OLORA_DVC_REMOTE_URL", raising=False)
    monkeypatch.delenv("OLORA_RUNS_DIR", raising=False)
    source = checkout(tmp_path / "user", tiny_model_dir)
    url = durable.dvc_remote(source)
    assert url == ("local", str(source / ".dvc-remote"))
    # `python flows/olora_pipeline.py`: the workspace pushes to the checkout's remote, not to one inside itself
    ws = workspace.create(source, "pinned")
    assert durable.dvc_remote(ws) == url
    durable.check(source, None, durable.run_folders(source, ws))  # nothing inside the workspace: passes
    # a worker's clone (Prefect's process worker: a tmp*prefect folder): the same remote lies inside it
    with tempfile.TemporaryDirectory(suffix="prefect") as worker:
        clone = Path(worker) / "clone"
        git(tmp_path, "clone", "-q", str(source), str(clone))
        with pytest.raises(durable.DurabilityError, match=r"the data watcher cannot record durably.*the DVC remote 'local' "
                           rf"\({re.escape(str(clone))}/.dvc-remote\) lies inside the Prefect worker's temporary folder"):
            announce_new_versions(clone)


@pytest.mark.integration
def test_check_deployment_passes_once_both_stores_are_outside(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from olora.cli import main

    root = checkout(tmp_path / "user", tiny_model_dir)
    monkeypatch.delenv("OLORA_DVC_REMOTE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--root", str(root), "check", "--deployment"]) == 2
    err = capsys.readouterr().err
    assert "the MLflow tracking store sqlite:///<clone>/mlflow.db lies inside" in err and "Also: the DVC remote 'local'" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}")
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "--force", "local", str(tmp_path / "stores" / "dvc")],
                   cwd=root, check=True, capture_output=True)
    assert main(["--root", str(root), "check", "--deployment"]) == 2  # not committed yet: a worker's clone lacks it
    git(root, "commit", "-qam", "remote outside")
    assert main(["--root", str(root), "check", "--deployment"]) == 0
    assert f"pushes to the DVC remote 'local' ({tmp_path / 'stores' / 'dvc'})" in capsys.readouterr().out


def readme_deployment_lines() -> list[str]:
    """The README's Prefect block from the one-machine set-up on (comments stripped)."""
    from test_readme import readme_section_block

    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in
             readme_section_block((REPO / "README.md").read_text(), "## Prefect flows", "bash").splitlines()]
    lines = [line for line in lines if line]
    return lines[next(i for i, line in enumerate(lines) if line.startswith("export MLFLOW_TRACKING_URI")):]


def api(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{base}/api{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.loads(response.read())


def logs_of(base: str, run_id: str) -> list[str]:
    return [e["message"] for e in api(base, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})]


@pytest.mark.integration
def test_readme_deployment_on_one_machine_records_durably(tmp_path, tiny_model_dir):
    """The README's lines as written (port changed), then: a run with its store inside the clone is refused."""
    home = tmp_path / "home"
    user = checkout(home / "olora", tiny_model_dir, {"evaluate.tasks": ["arc_easy"], "register.model_name": "olora-tiny-llama"})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "OLORA_DVC", "OLORA_GIT", "OLORA_RUNS"))}
    env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", PWD=str(user))
    processes: list[subprocess.Popen] = []
    base = f"http://127.0.0.1:{port}"
    outputs: dict[str, str] = {}
    try:
        for line in readme_deployment_lines():
            line = line.replace("4200", str(port))
            if line.startswith("export "):
                out = subprocess.run(["bash", "-c", f"{line} && env -0"], cwd=user, env=env, capture_output=True, text=True, check=True)
                env = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
            elif line.startswith(("prefect server start", "prefect worker start")):
                log = open(tmp_path / f"{line.split()[1]}.log", "w")
                processes.append(subprocess.Popen(["bash", "-c", f"exec {line}" + (f" --port {port}" if "server" in line else "")],
                                                  cwd=user, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                if "server" in line:
                    wait_for_http(f"{base}/api/health", seconds=120)
            else:
                out = subprocess.run(["bash", "-c", line], cwd=user, env=env, capture_output=True, text=True, timeout=900,
                                     stdin=subprocess.DEVNULL)
                assert out.returncode == 0, f"{line}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
                outputs[line.split()[0] + " " + line.split()[1]] = out.stdout + out.stderr
        stores = home / "olora-stores"
        assert (stores / "mlflow.db").is_file() and any((stores / "dvc-remote").rglob("*")), "nothing reached the stores"
        assert "PROMOTED" in outputs["olora promote"]  # the user's checkout sees the worker's version

        # restored in a fresh clone: the recorded run's commit, its adapter pulled from the DVC remote
        restored = home / "olora-restored"
        from mlflow import MlflowClient

        registry = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        version = registry.get_model_version_by_alias("olora-tiny-llama", "champion")
        assert git(restored, "rev-parse", "HEAD").strip() == version.tags["olora.git_commit"]
        recorded = json.loads(version.tags["artifact_sha256"])["adapter/adapter_model.safetensors"]
        assert hashlib.sha256((restored / "models/exported/adapter_model.safetensors").read_bytes()).hexdigest() == recorded

        # the run's story in its logs, read through Prefect's API: the library's lines, no bytecode listing
        run = next(r for r in api(base, "/flow_runs/filter", {"deployments": {"name": {"any_": ["on-demand"]}}}))
        deadline = time.monotonic() + 30  # logs arrive shortly after the final state
        while not re.search(r"^recorded run ", text := "\n".join(logs_of(base, run["id"])), re.M):
            assert time.monotonic() < deadline, text
            time.sleep(1)
        assert re.search(r"^workspace .*: commit [0-9a-f]{12} of ", text, re.M), text
        assert re.search(r"^stage train finished in ", text, re.M) and "records durably: tracking sqlite:///" in text, text
        assert not re.search(r"\b(RESUME|LOAD_GLOBAL|LOAD_FAST|RETURN_VALUE)\b", text), text[:3000]

        # stores inside the clone (the fallback store, with MLFLOW_TRACKING_URI empty for this run): refused before any stage
        cmd = ["prefect", "deployment", "run", "olora-pipeline/on-demand", "--job-variable",
               'env={"MLFLOW_TRACKING_URI": "", "PREFECT_LOGGING_EXTRA_LOGGERS": "olora"}', "--watch"]
        refused = subprocess.run(cmd, cwd=user, env=env, capture_output=True, text=True, timeout=600)
        assert refused.returncode == 1, refused.stdout[-3000:]
        bad = next(r for r in api(base, "/flow_runs/filter", {"deployments": {"name": {"any_": ["on-demand"]}}})
                   if r["id"] != run["id"])
        assert bad["state"]["type"] == "FAILED"
        deadline = time.monotonic() + 30
        while "cannot record durably" not in (text := "\n".join(logs_of(base, bad["id"]))):
            assert time.monotonic() < deadline, text
            time.sleep(1)
        assert re.search(r"the MLflow tracking store sqlite:///\S*/mlflow.db lies inside the Prefect worker's temporary "
                         r"folder /\S*prefect, deleted when the flow run ends", text), text
        assert api(base, "/task_runs/filter", {"flow_runs": {"id": {"any_": [bad["id"]]}}}) == []  # no stage, no workspace
        assert len(registry.search_model_versions("name='olora-tiny-llama'")) == 1
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, 15)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait(timeout=60)
    for name in ("server", "worker"):
        print(f"--- {name} log (tail)\n" + (tmp_path / f"{name}.log").read_text()[-2000:])
