"""Continuous training end to end on real services (a `prefect server`, a process worker, a bare git remote, a DVC
remote folder, SQLite MLflow): a published data version starts one run on its commit, code-only and unpushed data
commits start none, and a running `olora serve --alias champion` follows the promotion with no failed request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import REPO, free_port, running_server
from olora.overlay import copy_project, write_params

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"answer {i}"} for i in range(80)]
TIMINGS = os.environ.get("OLORA_CT_TIMINGS")  # bench/bench_continuous.py reads the measured times from here
SCREENSHOTS = os.environ.get("OLORA_CT_SCREENSHOTS")  # and, with chromium installed, takes the docs' pictures here


def screenshot(url: str, out: Path) -> None:
    """Headless Chromium's rendering of a UI page (the recipe in ENVIRONMENT.md)."""
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        "--window-size=1500,1000", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)


def api(base: str, path: str, body: dict | None = None, method: str | None = None):
    request = urllib.request.Request(f"{base}/api{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=20) as response:
        text = response.read()
        return json.loads(text) if text else None


def runs_of(base: str, deployment: str) -> list[dict]:
    return api(base, "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}, "sort": "EXPECTED_START_TIME_ASC"})


def wait_state(base: str, run_id: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = api(base, f"/flow_runs/{run_id}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(2)
    return "TIMEOUT"


def logs_of(base: str, run_id: str) -> str:
    entries = api(base, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(e["message"] for e in entries)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_new_data_retrains_on_its_commit_and_the_server_follows_the_champion(tmp_path, tiny_untied_model_dir):
    remote, storage, dev = tmp_path / "team.git", tmp_path / "dvc-remote", tmp_path / "dev"
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OLORA_GIT_REMOTE": str(remote),
           "OLORA_GIT_BRANCH": "main", "OLORA_RUNS_DIR": str(tmp_path / "runs"), "OLORA_DVC_CACHE": str(tmp_path / "cache")}

    def sh(*args: str, cwd: Path = dev, timeout: int = 300) -> str:
        out = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    # the team's repository: the tiny project with a committed DVC remote, its data published once
    sh("git", "init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    dev.mkdir()
    copy_project(dev)
    write_params(dev, tiny_untied_model_dir, {"evaluate.tasks": ["arc_easy"], "data.source": "data/raw/train.jsonl",
                                              "register.model_name": "olora-ct"})
    shutil.copy(REPO / "prefect.yaml", dev / "prefect.yaml")
    shutil.copytree(REPO / "flows", dev / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 ["git", "remote", "add", "origin", str(remote)], ["dvc", "init", "-q"],
                 ["dvc", "remote", "add", "-d", "team", str(storage)]):
        sh(*args)
    write_rows(dev / "data/raw/train.jsonl", ROWS[:60])
    sh("dvc", "add", "-q", "data/raw/train.jsonl")
    sh("dvc", "push", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "project and data v1")
    sh("git", "push", "-q", "origin", "main")

    command = lambda p: [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p)]  # noqa: E731
    with running_server(command, tmp_path, "/api/health", env, seconds=120, port=port,
                        log_path=tmp_path / "prefect-server.log") as base:
        sh("prefect", "work-pool", "create", "olora-process", "--type", "process")
        sh("prefect", "--no-prompt", "deploy", "--all")
        deployments = {d["name"]: d for d in api(base, "/deployments/filter", {})}
        assert {"on-new-data", "data-watch"} <= set(deployments)
        automations = api(base, "/automations/filter", {})
        trigger = next(a for a in automations if a["actions"][0].get("deployment_id") == deployments["on-new-data"]["id"])
        assert trigger["trigger"]["expect"] == ["olora.data.published"]
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "olora-process", "--name", "w1"],
                                  cwd=tmp_path, env=env, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            def watch() -> dict:
                """One data-watch flow run now (the schedule runs it every minute too); returns it when finished."""
                started = sh("prefect", "deployment", "run", "olora-data-watch/data-watch")
                run_id = next(line.split()[-1] for line in started.splitlines() if "UUID" in line)
                assert wait_state(base, run_id, 240) == "COMPLETED", logs_of(base, run_id)[-3000:]
                return api(base, f"/flow_runs/{run_id}")

            def wait_for_data_run(count: int, seconds: float = 60) -> dict:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    found = runs_of(base, "on-new-data")
                    if len(found) >= count:
                        return found[count - 1]
                    time.sleep(1)
                pytest.fail(f"no on-new-data flow run #{count} within {seconds} s")

            watch()  # the first run records what the branch holds (data v1) and announces nothing
            assert api(base, "/variables/name/olora_data_versions")["value"]

            # 1. `olora publish-data`: one run on exactly that commit, recorded and registered with its data version
            write_rows(dev / "data/raw/train.jsonl", ROWS)
            pushed_wall = datetime.now(timezone.utc)
            out = sh(str(BIN / "olora"), "publish-data", "data/raw/train.jsonl", "-m", "more rows")  # as in the README
            assert "event olora.data.published sent" in out, out
            commit = sh("git", "rev-parse", "HEAD").strip()
            run = wait_for_data_run(1)
            assert run["parameters"]["commit"] == commit
            assert wait_state(base, run["id"], 900) == "COMPLETED", logs_of(base, run["id"])[-4000:]
            started = datetime.fromisoformat(api(base, f"/flow_runs/{run['id']}")["start_time"].replace("Z", "+00:00"))
            started_after = (started - pushed_wall).total_seconds()
            assert started_after < 60
            from mlflow import MlflowClient

            client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
            v1 = client.get_model_version("olora-ct", "1")
            registered_after = v1.creation_timestamp / 1000 - pushed_wall.timestamp()
            from olora.data.versions import data_version

            assert v1.tags["olora.data_version"] == data_version(dev, commit).hash
            assert v1.tags["olora.data_commit"] == commit and v1.tags["dvc.data_hash"]
            assert str(client.get_model_version_by_alias("olora-ct", "champion").version) == "1"  # no champion yet: promoted
            branch = v1.tags["olora.git_branch"]
            assert sh("git", "--git-dir", str(remote), "rev-parse", f"{branch}^").strip() == commit

            # 2. a code-only push starts no run
            (dev / "NOTES.md").write_text("code and docs change\n")
            sh("git", "add", "NOTES.md")
            sh("git", "commit", "-qm", "docs only")
            sh("git", "push", "-q", "origin", "main")
            watch()

            # 3. a data commit whose content is not in the DVC remote starts no run, and says why
            write_rows(dev / "data/raw/train.jsonl", ROWS[:70])
            sh("dvc", "add", "-q", "data/raw/train.jsonl")
            sh("git", "commit", "-qam", "data v3, content not pushed")
            sh("git", "push", "-q", "origin", "main")
            unpushed = sh("git", "rev-parse", "HEAD").strip()
            run3 = watch()
            deadline = time.monotonic() + 30  # logs arrive shortly after the run's final state
            while "lacks ['data/raw/train.jsonl']; not announced" not in logs_of(base, run3["id"]):
                assert time.monotonic() < deadline, logs_of(base, run3["id"])
                time.sleep(1)
            assert len(runs_of(base, "on-new-data")) == 1

            # 4. its content pushed with plain DVC: the watcher announces it; the run on that commit is registered,
            #    forced to champion, and a running server switches with every request answered
            with running_server(lambda p: [str(BIN / "olora"), "--root", str(dev), "serve", "--alias", "champion",
                                           "--port", str(p), "--poll-seconds", "2"],
                                dev, "/ping", env, seconds=180, log_path=tmp_path / "serve.log") as served:
                answers: list[tuple[int, str]] = []
                stop = threading.Event()

                def client_loop():
                    body = json.dumps({"inputs": {"prompt": ["Say 3"]}, "params": {"max_new_tokens": 4}}).encode()
                    while not stop.is_set():
                        request = urllib.request.Request(f"{served}/invocations", data=body,
                                                         headers={"Content-Type": "application/json"})
                        try:
                            with urllib.request.urlopen(request, timeout=60) as response:
                                answers.append((response.status, response.headers["X-Olora-Model-Version"]))
                        except urllib.error.HTTPError as exc:
                            answers.append((exc.code, ""))
                        except OSError as exc:
                            answers.append((0, str(exc)))

                sender = threading.Thread(target=client_loop, daemon=True)
                sender.start()
                sh("dvc", "push", "-q")
                watch()
                run4 = wait_for_data_run(2)
                assert run4["parameters"]["commit"] == unpushed
                assert wait_state(base, run4["id"], 900) == "COMPLETED", logs_of(base, run4["id"])[-4000:]
                v2 = client.get_model_version("olora-ct", "2")
                assert v2.tags["olora.data_commit"] == unpushed
                sh(str(BIN / "olora"), "promote", "--version", "2", "--force")  # the tiny model's gain is noise: forced
                promoted_at = time.monotonic()
                while time.monotonic() - promoted_at < 30 and not (answers and answers[-1][1] == "2"):
                    time.sleep(0.5)
                switched_after = time.monotonic() - promoted_at
                time.sleep(2)
                stop.set()
                sender.join(90)
            if SCREENSHOTS:  # the automation, the run it started, and the version now served, as the UIs show them
                folder = Path(SCREENSHOTS)
                screenshot(f"{base}/automations/automation/{trigger['id']}", folder / "ct_prefect_automation.png")
                screenshot(f"{base}/runs/flow-run/{run4['id']}", folder / "ct_prefect_triggered_run.png")
                with running_server(lambda p: [str(BIN / "mlflow"), "server", "--backend-store-uri", env["MLFLOW_TRACKING_URI"],
                                               "--host", "127.0.0.1", "--port", str(p)],
                                    tmp_path, "/health", env, seconds=120) as ui:
                    screenshot(f"{ui}/#/models/olora-ct/versions/2", folder / "ct_mlflow_version.png")
            assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
            versions = [v for _, v in answers]
            assert versions[0] == "1" and versions[-1] == "2" and switched_after < 30
            assert versions == sorted(versions)  # one switch, never back
        finally:
            os.killpg(worker.pid, 15)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                worker.wait(timeout=60)
    timings = {"push_to_flow_run_start_s": round(started_after, 1), "push_to_registration_s": round(registered_after, 1),
               "promotion_to_served_switch_s": round(switched_after, 1), "requests_during_switch": len(answers)}
    print(json.dumps(timings))
    if TIMINGS:
        Path(TIMINGS).write_text(json.dumps(timings))
