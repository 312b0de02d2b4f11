"""The container tier (`pytest -m container`): docker/'s images built with podman and run for what they are for.

The images are built once per test session from the files a user builds (docker/Dockerfile, compose.yaml),
through tests/containers/harness.py (stand-ins for unreachable registries, build secrets, podman settings).
Skipped, with the reason, where podman or podman-compose is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from olora.ops import stack

import harness  # tests/containers/harness.py (pytest puts this test's folder on the import path)

pytestmark = pytest.mark.container
BIN = Path(sys.executable).parent
UID = 10001  # the images' user


@pytest.fixture(scope="session")
def images():
    """Build (or reuse, through podman's layer cache) the stand-ins and olora-pipeline:cpu; their timings."""
    if reason := harness.missing():
        pytest.skip(reason)
    timings = harness.build_all()
    print(f"\ncontainer builds (s; None = present): {json.dumps({k: v and round(v, 1) for k, v in timings.items()})}")
    return timings


def run(image: str, *argv: str, volumes: dict[Path, str] | None = None, workdir: str | None = None,
        env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    args = ["run", "--rm"]
    for host, inside in (volumes or {}).items():
        args += ["-v", f"{host}:{inside}"]
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    if workdir:
        args += ["-w", workdir]
    return harness.podman(*args, image, *argv, check=False, timeout=timeout)


def test_the_image_runs_olora_as_a_non_root_worker_image_without_the_test_tools(images):
    done = run(harness.IMAGE, "olora", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: olora" in done.stdout and "prepare" in done.stdout, done.stdout
    inspected = json.loads(harness.podman("image", "inspect", harness.IMAGE).stdout)[0]
    config = inspected["Config"]
    assert config["User"].split(":")[0] == str(UID)
    assert config["Cmd"][:3] == ["prefect", "worker", "start"]
    assert "8080/health" in " ".join(inspected["Healthcheck"]["Test"])  # kept: built with --format docker
    left_out = [line.strip() for line in (harness.DOCKER / "not-in-image.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    listed = run(harness.IMAGE, "pip", "list", "--format", "json")
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert not installed & set(left_out), installed & set(left_out)
    assert {"torch", "prefect", "mlflow", "dvc", "lm-eval", "peft", "olora-pipeline"} <= installed
    versions = run(harness.IMAGE, "python", "-c", "import torch, prefect; print(torch.__version__, prefect.__version__)")
    assert versions.stdout.split() == [f"{harness.locked('torch')}+cpu", harness.locked("prefect")], versions.stdout + versions.stderr
    print(f"\n{harness.IMAGE}: {harness.image_size(harness.IMAGE) / 1e9:.2f} GB")


def _tiny_project(folder: Path, model_dir: Path) -> Path:
    from olora.overlay import copy_project, write_params

    folder.mkdir(parents=True)
    copy_project(folder)
    write_params(folder, model_dir, {"evaluate.tasks": ["arc_easy"]})
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                 [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(args, cwd=folder, check=True, capture_output=True)
    return folder


def test_a_mounted_tiny_project_runs_dvc_repro_in_the_container_as_on_the_host(images, tmp_path, tiny_model_dir):
    """`dvc repro` of the tiny overlay inside the container (the project mounted, owned by the image's user) gives
    the same losses and scores as on the host; both timed."""
    inside = _tiny_project(tmp_path / "inside", tiny_model_dir)
    host = tmp_path / "host"
    shutil.copytree(inside, host, symlinks=True)
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(inside)], check=True)

    start = time.monotonic()
    done = run(harness.IMAGE, "dvc", "repro", volumes={inside: "/home/olora/work/project"}, workdir="/home/olora/work/project")
    container_seconds = time.monotonic() - start
    assert done.returncode == 0, f"dvc repro in the container failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    start = time.monotonic()
    on_host = subprocess.run([str(BIN / "dvc"), "repro"], cwd=host, env=env, capture_output=True, text=True, timeout=900)
    host_seconds = time.monotonic() - start
    assert on_host.returncode == 0, on_host.stderr[-4000:]

    status = run(harness.IMAGE, "dvc", "status", volumes={inside: "/home/olora/work/project"}, workdir="/home/olora/work/project")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    train = [json.loads((p / "metrics" / "train.json").read_text()) for p in (inside, host)]
    assert train[0]["steps"] == train[1]["steps"] > 0 and train[0]["device"] == train[1]["device"] == "cpu"
    for key in ("final_train_loss", "final_val_loss"):
        assert train[0][key] == pytest.approx(train[1][key], rel=1e-4), (key, train[0][key], train[1][key])
    scores = [json.loads((p / "metrics" / "eval_adapter.json").read_text()) for p in (inside, host)]
    assert scores[0]["tasks"].keys() == scores[1]["tasks"].keys() == {"arc_easy"}
    assert scores[0]["mean_acc"] == pytest.approx(scores[1]["mean_acc"], abs=1e-9)
    print(f"\ntiny dvc repro: container {container_seconds:.1f} s, host {host_seconds:.1f} s "
          f"(ratio {container_seconds / host_seconds:.2f})")


def test_the_default_command_is_a_worker_that_becomes_healthy_against_a_prefect_server(images):
    """The image's CMD (a process worker on olora-process) and HEALTHCHECK, against Prefect in a container."""
    tag = uuid.uuid4().hex[:8]
    network, server, worker = f"olora-t-{tag}", f"prefect-{tag}", f"worker-{tag}"
    port = free_port()
    prefect_image = harness.qualified(harness.compose_images()["prefect"])
    harness.podman("network", "create", network)
    try:
        harness.podman("run", "-d", "--name", server, "--network", network, "-p", f"127.0.0.1:{port}:4200",
                       prefect_image, "prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200")
        api = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=3)
                break
            except OSError:
                assert time.monotonic() < deadline, harness.podman("logs", server, check=False).stderr[-3000:]
                time.sleep(1)
        start = time.monotonic()
        harness.podman("run", "-d", "--name", worker, "--network", network, "-e", f"PREFECT_API_URL=http://{server}:4200/api",
                       harness.IMAGE)
        with harness.healthcheck_ticker(names=[worker]):
            seconds = harness.wait_healthy(worker, 180)
        request = urllib.request.Request(f"{api}/work_pools/{stack.WORK_POOL}/workers/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        workers = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert [w["status"] for w in workers] == ["ONLINE"], workers
        print(f"\nworker container healthy {seconds:.1f} s after its start ({time.monotonic() - start:.1f} s in all)")
    finally:
        harness.podman("rm", "-f", "-t", "5", worker, server, check=False)
        harness.podman("network", "rm", "-f", network, check=False)


# ------------------------------------------------------------------ the compose stack


def _git(cwd: Path, *args: str) -> str:
    """git on the host, on a remote now owned by the images' user (ownership check relaxed, as for the worker)."""
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_the_compose_stack_runs_a_deployment_on_its_worker_and_down_leaves_nothing(images, tmp_path, tiny_model_dir):
    """docker/compose.yaml up with podman-compose: every service ready; `prefect deploy` and a deployment run from the
    host run on the containerized worker against the containerized Prefect, MLflow (PostgreSQL) and S3; its MLflow
    run, registered version, S3 objects and runs/* branch exist; `down` leaves no container, volume or network."""
    from olora.overlay import team_checkout

    config = stack.stack_config(tmp_path / "stack", environ={var: str(free_port()) for _, var, _ in stack.PORTS.values()})
    secret = stack.load_secrets(config.state_dir)  # as `make stack` generates them
    values, compose_env = stack.client_env(config, secret), stack.compose_env(config, secret)
    env_file = tmp_path / "stack.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in compose_env.items()))
    env_file.chmod(0o600)

    # the team's git remote (writable by the worker's user) and the checkout that deploys
    remote = tmp_path / "team.git"
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    host_env.update(PATH=f"{BIN}:{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "prefect-home"))
    root = team_checkout(tmp_path / "deployer", remote, tiny_model_dir, {"evaluate.tasks": ["arc_easy"]}, host_env)
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(remote)], check=True)
    host_env.update(values, OLORA_GIT_REMOTE=str(remote), OLORA_GIT_BRANCH="main",
                    GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="safe.directory", GIT_CONFIG_VALUE_0="*")

    project = f"olora-t-{uuid.uuid4().hex[:8]}"
    compose = harness.Compose(project, env_file, {"OLORA_TEST_GIT_REMOTE": str(remote)})
    try:
        start = time.monotonic()
        with harness.healthcheck_ticker(label=f"com.docker.compose.project={project}"):
            ready = compose.up_in_order()
            stack_seconds = time.monotonic() - start
            print(f"\ncompose stack ready in {stack_seconds:.1f} s: {json.dumps(ready)}")

            def cli(*args: str, timeout: int = 300) -> str:
                out = subprocess.run(list(args), cwd=root, env=host_env, capture_output=True, text=True, timeout=timeout)
                assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
                return out.stdout

            cli("prefect", "--no-prompt", "deploy", "--name", "on-demand")
            submitted = time.monotonic()
            out = cli("prefect", "deployment", "run", "olora-pipeline/on-demand", "--param", 'overrides={"adapter.r": 2}')
            run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
            auth = {"Authorization": "Basic " + base64.b64encode(values["PREFECT_API_AUTH_STRING"].encode()).decode()}
            prefect_api = values["PREFECT_API_URL"]
            deadline = time.monotonic() + 900
            while True:
                request = urllib.request.Request(f"{prefect_api}/flow_runs/{run_id}", headers=auth)
                flow_run = json.loads(urllib.request.urlopen(request, timeout=10).read())
                if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert time.monotonic() < deadline, f"the run is still {flow_run['state']['type']} after 900 s"
                time.sleep(3)
            run_seconds = time.monotonic() - submitted
            worker_logs = harness.podman("logs", "--tail", "150", compose.container("worker"), check=False)
            assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}:\n{worker_logs.stdout[-6000:]}{worker_logs.stderr[-6000:]}"
            print(f"deployment run on the containerized worker: {run_seconds:.1f} s from submission to COMPLETED")

        # the run's record: runs/* branch in the remote, MLflow run + registered version, objects in S3
        name = f"{flow_run['name']}-{flow_run['id'][:8]}"
        branch = f"runs/{name}"
        assert branch in _git(remote, "branch", "--list", "runs/*", "--format=%(refname:short)").split()
        registration = json.loads(_git(remote, "show", f"{branch}:reports/registration.json"))
        mlflow = values["MLFLOW_TRACKING_URI"]
        basic = {"Authorization": "Basic " + base64.b64encode(
            f"{values['MLFLOW_TRACKING_USERNAME']}:{values['MLFLOW_TRACKING_PASSWORD']}".encode()).decode(),
            "Content-Type": "application/json"}

        def mlflow_get(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(f"{mlflow}{path}", headers=basic, data=json.dumps(body).encode() if body else None)
            return json.loads(urllib.request.urlopen(request, timeout=10).read())

        experiment = mlflow_get("/api/2.0/mlflow/experiments/get-by-name?experiment_name=olora")["experiment"]
        runs = mlflow_get("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})["runs"]
        ours = [r for r in runs if {t["key"]: t["value"] for t in r["data"]["tags"]}.get("olora.run_name") == name]
        assert len(ours) == 1 and ours[0]["info"]["status"] == "FINISHED", runs
        versions = mlflow_get("/api/2.0/mlflow/model-versions/search?filter=" + urllib.request.quote(f"name='{registration['name']}'"))
        assert [next(t["value"] for t in v["tags"] if t["key"] == "olora.git_branch") for v in versions["model_versions"]] == [branch]
        s3 = stack.s3_client(config, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.BUCKET) for o in page.get("Contents", [])]
        run_id_mlflow = ours[0]["info"]["run_id"]
        assert any(run_id_mlflow in k for k in keys), "no artifact of the MLflow run in the bucket"
        assert any(k.startswith("dvc/") for k in keys), "nothing in the DVC remote"
    finally:
        down = compose.down()
        left = compose.leftovers()
    assert not any(left.values()), f"`down` left {left}:\n{down.stdout[-2000:]}\n{down.stderr[-2000:]}"
