"""The continuous-training scenario, run on two sets of real services: a local `prefect server` with SQLite MLflow and
a DVC remote folder (tests/orchestration/test_continuous_training.py, integration tier), and `make stack`'s
PostgreSQL-backed MLflow, authenticated Prefect and S3 store (tests/ops/test_stack.py, stack tier).

From a deployed team checkout whose data is published once and a worker on the pool: the watcher's first run records
what is there; `olora publish-data` starts one run on exactly its commit, registered with its data version and
promoted (no champion yet); a docs-only push starts none; a data commit without its `dvc push` starts none and the
watcher's log names the file; after a plain `dvc push` the watcher announces it, its run registers version 2, and a
running `olora serve --alias champion` (polling, or the registry's webhook) switches to it when it is promoted, with
every request of a client that kept sending answered 200. Returns the measured latencies.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import free_port, running_server

BIN = Path(sys.executable).parent
ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"answer {i}"} for i in range(80)]
MODEL = "olora-ct"  # register.model_name of the scenario's project


@dataclass
class Team:
    dev: Path
    """The team checkout that deployed prefect.yaml (its `origin` is the team's git remote)."""
    remote: Path
    """The bare git remote the workers clone."""
    env: dict[str, str]
    """The environment of the team's commands (Prefect API, MLflow, DVC remote settings)."""
    prefect: str
    """The Prefect API base URL (…/api)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Auth headers for the Prefect REST API."""
    webhook: bool = False
    """Serve with the registry's webhook (polling off) instead of polling the alias every 2 s."""
    serve_host: str = "127.0.0.1"
    """Where `olora serve` listens and the webhook calls it: an address the MLflow server reaches (a container's: the host on its network)."""
    screenshots: Path | None = None
    """Where to write the UI screenshots (local services only: the MLflow UI is started on the SQLite store)."""


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def screenshot(url: str, out: Path) -> None:
    """Headless Chromium's rendering of a UI page (the recipe in ENVIRONMENT.md)."""
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        "--window-size=1500,1000", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)


@contextlib.contextmanager
def mlflow_client(env: dict[str, str]):
    """An MlflowClient on the team's tracking server (its credentials from the environment, restored after)."""
    from mlflow import MlflowClient

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    for key in keys:
        if env.get(key):
            os.environ[key] = env[key]
    try:
        yield MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_project(dev: Path, env: dict[str, str]) -> None:
    """Publish the project's first data version (no event: nothing is deployed yet)."""
    write_rows(dev / "data/raw/train.jsonl", ROWS[:60])
    out = subprocess.run([str(BIN / "olora"), "publish-data", "data/raw/train.jsonl", "--no-event", "-m", "data v1"],
                         cwd=dev, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def scenario(team: Team, tmp_path: Path) -> dict:
    dev, env, base = team.dev, team.env, team.prefect

    def sh(*args: str, cwd: Path = dev, timeout: int = 300, extra: dict | None = None) -> str:
        out = subprocess.run(list(args), cwd=cwd, env={**env, **(extra or {})}, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    def api(path: str, body: dict | None = None):
        request = urllib.request.Request(f"{base}{path}", data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **team.headers})
        with urllib.request.urlopen(request, timeout=20) as response:
            text = response.read()
            return json.loads(text) if text else None

    def wait_state(run_id: str, seconds: float) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            state = api(f"/flow_runs/{run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return state
            time.sleep(2)
        return "TIMEOUT"

    def logs_of(run_id: str) -> str:
        entries = api("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        return "\n".join(e["message"] for e in entries)

    def data_runs() -> list[dict]:
        return api("/flow_runs/filter", {"deployments": {"name": {"any_": ["on-new-data"]}}, "sort": "EXPECTED_START_TIME_ASC"})

    def watch() -> dict:
        """One data-watch flow run now (the schedule runs it every minute too); returns it when finished."""
        started = sh("prefect", "deployment", "run", "olora-data-watch/data-watch")
        run_id = next(line.split()[-1] for line in started.splitlines() if "UUID" in line)
        assert wait_state(run_id, 300) == "COMPLETED", logs_of(run_id)[-3000:]
        return api(f"/flow_runs/{run_id}")

    def wait_for_data_run(count: int, seconds: float = 60) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = data_runs()
            if len(found) >= count:
                return found[count - 1]
            time.sleep(1)
        pytest.fail(f"no on-new-data flow run #{count} within {seconds} s")

    deployments = {d["name"]: d for d in api("/deployments/filter", {})}
    assert {"on-new-data", "data-watch"} <= set(deployments)
    trigger = next(a for a in api("/automations/filter", {})
                   if a["actions"][0].get("deployment_id") == deployments["on-new-data"]["id"])
    assert trigger["trigger"]["expect"] == ["olora.data.published"]

    watch()  # the first run records what the branch holds (data v1) and announces nothing
    from olora.orchestration.events import seen_variable

    assert api(f"/variables/name/{seen_variable(str(team.remote), 'main')}")["value"]

    # 1. `olora publish-data`: one run on exactly that commit, recorded and registered with its data version
    write_rows(dev / "data/raw/train.jsonl", ROWS)
    pushed_wall = datetime.now(timezone.utc)
    out = sh(str(BIN / "olora"), "publish-data", "data/raw/train.jsonl", "-m", "more rows")  # as in the README
    assert "event olora.data.published sent" in out, out
    commit = sh("git", "rev-parse", "HEAD").strip()
    run = wait_for_data_run(1)
    assert run["parameters"]["commit"] == commit
    assert wait_state(run["id"], 900) == "COMPLETED", logs_of(run["id"])[-4000:]
    started = datetime.fromisoformat(api(f"/flow_runs/{run['id']}")["start_time"].replace("Z", "+00:00"))
    started_after = (started - pushed_wall).total_seconds()
    assert started_after < 60
    from olora.data.versions import data_version

    with mlflow_client(env) as client:
        v1 = client.get_model_version(MODEL, "1")
        assert v1.tags["olora.data_version"] == data_version(dev, commit).hash
        assert v1.tags["olora.data_commit"] == commit and v1.tags["dvc.data_hash"]
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"  # no champion yet: promoted
    registered_after = v1.creation_timestamp / 1000 - pushed_wall.timestamp()
    assert sh("git", "--git-dir", str(team.remote), "rev-parse", f"{v1.tags['olora.git_branch']}^").strip() == commit

    # 2. a docs-only push starts no run
    (dev / "NOTES.md").write_text("code and docs change\n")
    sh("git", "add", "NOTES.md")
    sh("git", "commit", "-qm", "docs only")
    sh("git", "push", "-q", "origin", "main")
    watch()

    # 3. a data commit whose content is not in the DVC remote starts no run, and the watcher says why
    write_rows(dev / "data/raw/train.jsonl", ROWS[:70])
    sh("dvc", "add", "-q", "data/raw/train.jsonl")
    sh("git", "commit", "-qam", "data v3, content not pushed")
    sh("git", "push", "-q", "origin", "main")
    unpushed = sh("git", "rev-parse", "HEAD").strip()
    held = watch()
    deadline = time.monotonic() + 30  # logs arrive shortly after the run's final state
    while "lacks ['data/raw/train.jsonl']; not announced" not in logs_of(held["id"]):
        assert time.monotonic() < deadline, logs_of(held["id"])
        time.sleep(1)
    assert len(data_runs()) == 1

    # 4. its content pushed with plain DVC: the watcher announces it; the run on that commit registers version 2,
    #    forced to champion (the tiny model's gain is noise), and the running server switches with every request answered
    port = free_port()
    secret = {"OLORA_WEBHOOK_SECRET": "continuous-training-webhook-secret"} if team.webhook else {}
    serve = [str(BIN / "olora"), "--root", str(dev), "serve", "--alias", "champion", "--host", team.serve_host, "--port", str(port),
             "--poll-seconds", "0" if team.webhook else "2"]
    with running_server(lambda p: serve, dev, "/ping", {**env, **secret}, seconds=180, port=port,
                        log_path=tmp_path / "serve.log", host=team.serve_host) as served:
        if team.webhook:
            sh(str(BIN / "olora"), "serve-webhook", "--url", f"{served}/webhook", extra=secret)
        answers: list[tuple[int, str]] = []
        stop = threading.Event()

        def client_loop():
            body = json.dumps({"inputs": {"prompt": ["Say 3"]}, "params": {"max_new_tokens": 4}}).encode()
            while not stop.is_set():
                request = urllib.request.Request(f"{served}/invocations", data=body, headers={"Content-Type": "application/json"})
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
        run2 = wait_for_data_run(2)
        assert run2["parameters"]["commit"] == unpushed
        assert wait_state(run2["id"], 900) == "COMPLETED", logs_of(run2["id"])[-4000:]
        with mlflow_client(env) as client:
            assert client.get_model_version(MODEL, "2").tags["olora.data_commit"] == unpushed
        sh(str(BIN / "olora"), "promote", "--version", "2", "--force")
        promoted_at = time.monotonic()
        while time.monotonic() - promoted_at < 30 and not (answers and answers[-1][1] == "2"):
            time.sleep(0.2)
        switched_after = time.monotonic() - promoted_at
        time.sleep(2)
        stop.set()
        sender.join(90)
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
    versions = [v for _, v in answers]
    assert versions[0] == "1" and versions[-1] == "2" and switched_after < 30
    assert versions == sorted(versions)  # one switch, never back

    if team.screenshots:  # the automation, the run it started, and the version now served, as the UIs show them
        ui_base = base.removesuffix("/api")
        screenshot(f"{ui_base}/automations", team.screenshots / "ct_prefect_automation.png")
        screenshot(f"{ui_base}/runs/flow-run/{run2['id']}", team.screenshots / "ct_prefect_triggered_run.png")
        with running_server(lambda p: [str(BIN / "mlflow"), "server", "--backend-store-uri", env["MLFLOW_TRACKING_URI"],
                                       "--host", "127.0.0.1", "--port", str(p)], tmp_path, "/health", env, seconds=120) as ui:
            screenshot(f"{ui}/#/models/{MODEL}/versions/2", team.screenshots / "ct_mlflow_version.png")
    return {"push_to_flow_run_start_s": round(started_after, 1), "push_to_registration_s": round(registered_after, 1),
            "promotion_to_served_switch_s": round(switched_after, 1), "requests_during_switch": len(answers),
            "switch_by": "webhook" if team.webhook else "polling every 2 s"}


def basic_auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
