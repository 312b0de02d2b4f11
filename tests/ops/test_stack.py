"""`make stack`: the shared services of docker/compose.yaml (PostgreSQL, an S3 store, MLflow, Prefect), driven by compose.

The `stack` tests share one compose stack (tests/stackfix.py's `compose_stack`: a temporary project on free loopback
ports, its own compose project name, two Prefect workers on this machine), stop it, start it again (data must
survive) and remove it. The other tests need no engine. Credentials are the stack's own generated ones, read at run
time: this file holds none.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, REPO, free_ports, sh
from olora.ops import envfile, prefect_api, stack
from olora.ops.envfile import ServiceError
from stackfix import WORKERS


# ------------------------------------------------------------------ no server


def test_load_env_reads_stack_env_without_overriding(tmp_path, monkeypatch):
    values = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PREFECT_API_AUTH_STRING": "olora:a b'c",
              "OLORA_DVC_REMOTE_URL": "s3://olora/dvc"}
    stack.write_env_file(tmp_path / "stack.env", values)
    assert (tmp_path / "stack.env").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://already.set:1")
    for name in ("PREFECT_API_AUTH_STRING", "OLORA_DVC_REMOTE_URL"):
        monkeypatch.delenv(name, raising=False)
    applied = envfile.load_env(tmp_path)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://already.set:1"  # what the user set wins
    assert os.environ["PREFECT_API_AUTH_STRING"] == "olora:a b'c"  # shell quoting round-trips
    assert set(applied) == {"PREFECT_API_AUTH_STRING", "OLORA_DVC_REMOTE_URL"}
    assert envfile.load_env(tmp_path / "nowhere") == {}
    # the file is what a shell sources
    out = subprocess.run(["bash", "-c", f"set -a; . {tmp_path / 'stack.env'}; set +a; printf %s \"$PREFECT_API_AUTH_STRING\""],
                         capture_output=True, text=True, check=True).stdout
    assert out == "olora:a b'c"


def test_a_stack_env_of_a_stopped_stack_is_named_in_one_line_within_seconds(tmp_path, monkeypatch, capsys):
    """After the stack stops, a command that loads its stack.env says so at once (not after 18 s of retries)."""
    from olora.cli import main

    config = stack.stack_config(tmp_path, environ={"OLORA_STACK_MLFLOW_PORT": str(free_ports(1)[0])})
    stack.write_env_file(tmp_path / "stack.env", {"MLFLOW_TRACKING_URI": config.mlflow_url, "OLORA_S3_BUCKET": "olora"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("OLORA_S3_BUCKET", raising=False)
    started = time.monotonic()
    assert main(["--root", str(tmp_path), "promote"]) == 2
    assert time.monotonic() - started < 5
    assert capsys.readouterr().err.splitlines() == [
        f"olora promote: error: {tmp_path}/stack.env points at a stack that is down (no MLflow server answers at "
        f"{config.mlflow_url}): start it with `make stack`, or stop using it with `mv stack.env stack.stopped.env` "
        "(`make stack-down` does) to use the project's own stores"]
    assert "OLORA_S3_BUCKET" not in os.environ  # nothing of the dead stack was applied
    # `make stack-down` sets this machine's stack.env aside (git-ignored); a teammate's stack.env stays where it is
    assert stack.down(config, log=lambda _: None) is False
    assert not (tmp_path / "stack.env").exists() and (tmp_path / "stack.stopped.env").is_file()
    assert envfile.load_env(tmp_path) == {}
    assert not subprocess.run(["git", "check-ignore", "-q", "--no-index", "stack.stopped.env"], cwd=REPO).returncode
    stack.write_env_file(tmp_path / "stack.env", {"MLFLOW_TRACKING_URI": "http://mlflow.team.example:5000"})
    stack.down(config, log=lambda _: None)
    assert (tmp_path / "stack.env").is_file()


def test_the_env_file_not_the_shell_sets_what_compose_interpolates(tmp_path, monkeypatch):
    """compose lets the shell win over --env-file: the driver hands the engine no variable the env file sets, so a
    shell's AWS keys (or another stack's loaded stack.env) never reach the services in place of the generated ones."""
    env_file = stack.write_env_file(tmp_path / "compose.env", {"AWS_ACCESS_KEY_ID": "generated", "OLORA_STACK_PG_PORT": "5999"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "the-users-own-key")
    monkeypatch.setenv("OLORA_UNRELATED", "kept")
    echo = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    seen = json.loads(stack.Compose("p", env_file, command=echo, cli="podman")().stdout)
    assert "AWS_ACCESS_KEY_ID" not in seen and "OLORA_STACK_PG_PORT" not in seen and seen["OLORA_UNRELATED"] == "kept"
    slow = stack.Compose("p", env_file, command=[sys.executable, "-c", "import time; time.sleep(5)"], cli="podman")
    with pytest.raises(stack.ServiceError, match="did not finish within 1 s"):
        slow(timeout=1)
    monkeypatch.setenv(stack.ENGINE_VAR, "rkt")
    with pytest.raises(stack.ServiceError, match="choose docker or podman"):
        stack.engine()


def test_stack_env_example_documents_every_variable():
    text = (REPO / "stack.env.example").read_text()
    documented = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
    assert set(stack.ENV_VARS) <= documented
    assert not subprocess.run(["git", "check-ignore", "-q", "stack.env"], cwd=REPO).returncode
    assert not subprocess.run(["git", "check-ignore", "-q", ".stack/secrets.json"], cwd=REPO).returncode
    assert subprocess.run(["git", "check-ignore", "-q", "stack.env.example"], cwd=REPO).returncode


def test_ports_default_loopback_and_a_taken_port_names_its_service(tmp_path):
    config = stack.stack_config(tmp_path, environ={})
    assert config.state_dir == tmp_path.resolve() / ".stack" and config.project == "olora"
    assert config.files == (REPO / "docker" / "compose.yaml",)
    assert dict(config.ports) == {"postgres": 5433, "mlflow": 5000, "prefect": 4200, "s3": 8333}
    assert config.mlflow_url == "http://127.0.0.1:5000" and config.prefect_url == "http://127.0.0.1:4200/api"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = iter(free_ports(len(stack.PORTS)))
        environ = {var: str(next(ports) if key != "prefect" else port) for key, (_, var, _) in stack.PORTS.items()}
        with pytest.raises(ServiceError, match=f"prefect: port {port} on 127.0.0.1 is already in use.*OLORA_STACK_PREFECT_PORT"):
            stack.check_ports(stack.stack_config(tmp_path, environ=environ))
    with pytest.raises(ServiceError, match="OLORA_STACK_S3_PORT"):
        stack.stack_config(tmp_path, environ={"OLORA_STACK_S3_PORT": "eighty"})
    with pytest.raises(ServiceError, match="two services share a port"):
        stack.stack_config(tmp_path, environ={"OLORA_STACK_S3_PORT": "5000"})
    with pytest.raises(ServiceError, match="COMPOSE_FILE names .*nowhere.yaml, which does not exist"):
        stack.stack_config(tmp_path, environ={"COMPOSE_FILE": f"{REPO}/docker/compose.yaml:nowhere.yaml"})


def test_compose_interpolates_only_what_up_hands_it():
    """Every variable compose.yaml needs without a default is one `up` writes to .stack/compose.env; the secrets are
    generated once, kept 0600 and reused."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = stack.stack_config(tmp, environ={})
        secret = stack.load_secrets(config.state_dir)
        assert stack.load_secrets(config.state_dir) == secret
        assert (config.state_dir / "secrets.json").stat().st_mode & 0o777 == 0o600
        handed = stack.compose_env(config, secret)
    text = (REPO / "docker" / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_0-9]+):\?", text))
    assert required and required <= set(handed), required - set(handed)
    defaulted = set(re.findall(r"\$\{([A-Z_0-9]+):-", text))
    assert {var for _, var, _ in stack.PORTS.values()} <= defaulted & set(handed)
    assert set(stack.ENV_VARS) <= set(handed)


# ------------------------------------------------------------------ the real stack (tests/stackfix.py)


def _http(url: str, headers: dict | None = None, data: dict | None = None, method: str | None = None) -> tuple[int, object]:
    return prefect_api.request(url, headers=headers, data=data, method=method)


@pytest.mark.stack
def test_stack_env_holds_what_clients_need(compose_stack):
    values, config = compose_stack.values, compose_stack.config
    assert set(values) == set(stack.ENV_VARS)
    assert values["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{config.ports['mlflow']}"
    assert values["PREFECT_API_URL"] == f"http://127.0.0.1:{config.ports['prefect']}/api"
    assert values["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{config.ports['s3']}"
    for name in ("stack.env", ".stack/secrets.json", ".stack/compose.env"):
        assert (compose_stack.root / name).stat().st_mode & 0o777 == 0o600, name
    out = subprocess.run([sys.executable, "-m", "olora.ops.stack", "status"], cwd=compose_stack.root, env=compose_stack.env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for service in ("postgres", "seaweedfs", "mlflow", "prefect"):
        container = compose_stack.compose.container(service)
        assert any(line.startswith(container) and " up " in line for line in out.stdout.splitlines()), out.stdout
    assert any(line.startswith(compose_stack.compose.container("buckets")) and " done " in line for line in out.stdout.splitlines())


@pytest.mark.stack
def test_postgres_takes_the_role_password_and_refuses_a_wrong_one(compose_stack):
    import psycopg2

    secret, port = compose_stack.secret, compose_stack.config.ports["postgres"]

    def connect(user: str, password: str, database: str):
        return psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=database, connect_timeout=5)

    for database in ("mlflow", "mlflow_auth", "prefect", "optuna"):
        connect("olora", secret["postgres_password"], database).close()
    for user, password in (("olora", "wrong-" + secret["postgres_password"]), ("postgres", secret["postgres_password"])):
        with pytest.raises(psycopg2.OperationalError, match=f'password authentication failed for user "{user}"'):
            connect(user, password, "postgres")
    connect("postgres", secret["postgres_superuser_password"], "postgres").close()


@pytest.mark.stack
def test_optuna_studies_live_in_the_stacks_postgres_shared_by_the_host_and_the_workers(compose_stack, monkeypatch):
    """`up` makes the `optuna` database, owned by the role `olora`, also on a volume from before it existed (dropped
    here, then `up` again), and stack.env names it; a study made from the host through the URL `olora compare`
    resolves (search.storage_url) is read, with its told trial, in a worker container through the URL compose gives
    the workers."""
    import tempfile
    import uuid

    import optuna
    import psycopg2

    from olora.orchestration import compare, search
    from olora.orchestration.durable import DurabilityError

    s, secret = compose_stack, compose_stack.secret
    port = s.config.ports["postgres"]
    su = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=secret["postgres_superuser_password"],
                          dbname="postgres", connect_timeout=5)
    su.autocommit = True
    owner = "SELECT pg_get_userbyid(datdba), datacl::text FROM pg_database WHERE datname = 'optuna'"
    try:
        with su.cursor() as cur:
            cur.execute("DROP DATABASE optuna WITH (FORCE)")  # as on a volume made before this database was added
            s.run("up")
            cur.execute(owner)
            assert cur.fetchall() == [("olora", "{olora=CTc/olora}")]  # PUBLIC revoked, as for mlflow and prefect
    finally:
        su.close()
    url = s.values[search.STORAGE_ENV]  # the variable olora compare reads
    assert url == f"postgresql+psycopg2://olora:{secret['postgres_password']}@127.0.0.1:{port}/optuna"
    monkeypatch.setenv(search.STORAGE_ENV, url)
    assert search.storage_url(s.root) == url
    # a deployment run's temporary clone: the database outlives it, a SQLite file inside it would not
    clone = Path(tempfile.mkdtemp(suffix="prefect"))
    try:
        compare.check_durable(clone, None, url, push=False)
        with pytest.raises(DurabilityError, match="OLORA_OPTUNA_STORAGE"):
            compare.check_durable(clone, None, f"sqlite:///{clone}/optuna.db", push=False)
    finally:
        clone.rmdir()

    name = f"stack-check-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=search.storage_url(s.root))
    trial = study.ask()
    rate = trial.suggest_float(search.PARAM, 1e-5, 3e-3, log=True)
    study.tell(trial, 0.25)
    code = ("import json, os, optuna; url = os.environ['OLORA_OPTUNA_STORAGE']; "
            f"t = optuna.load_study(study_name={name!r}, storage=url).trials; "
            "print('STUDY', json.dumps([url, [(x.state.name, x.value, x.params) for x in t]]))")
    done = s.compose("run", "--rm", "--no-deps", "-T", stack.WORKER, "python", "-c", code, timeout=300)
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("STUDY ")).split(" ", 1)[1])
    # the in-network address, the password from PGPASSWORD (none in the URL); the host's trial, as told
    assert seen == ["postgresql+psycopg2://olora@postgres:5432/optuna", [["COMPLETE", 0.25, {search.PARAM: rate}]]], \
        done.stdout[-2000:]
    compose_stack.optuna_study = (name, rate)


@pytest.mark.stack
def test_s3_needs_the_keys(compose_stack):
    config, values = compose_stack.config, compose_stack.values
    key, secret_key = values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"]
    client = stack.s3_client(config, key, secret_key)
    client.put_object(Bucket=stack.BUCKET, Key="checks/hello.txt", Body=b"hello")
    assert client.get_object(Bucket=stack.BUCKET, Key="checks/hello.txt")["Body"].read() == b"hello"
    stack.check_s3(config, key, secret_key)
    for wrong in ((key, secret_key + "x"), ("OLORANOSUCHKEY000000", secret_key)):
        with pytest.raises(ServiceError, match=r"the S3 store \(SeaweedFS\) at http://127.0.0.1:\d+ refused"):
            stack.check_s3(config, *wrong)
    with pytest.raises(urllib.error.HTTPError) as info:  # anonymous
        urllib.request.urlopen(f"{config.s3_url}/{stack.BUCKET}/checks/hello.txt", timeout=10)
    assert info.value.code == 403


@pytest.mark.stack
def test_mlflow_logs_a_run_whose_artifact_lands_in_the_bucket(compose_stack, monkeypatch):
    from mlflow import MlflowClient

    values = compose_stack.values
    url = values["MLFLOW_TRACKING_URI"]
    assert _http(f"{url}/api/2.0/mlflow/experiments/search", data={"max_results": 1})[0] == 401
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, values[name])
    client = MlflowClient(url, registry_uri=url)
    experiment = client.create_experiment("stack-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 0.5)
    client.log_text(run.info.run_id, "hello from the stack", "notes/hello.txt")
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served through the tracking server
    s3 = stack.s3_client(compose_stack.config, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=stack.BUCKET, Prefix="mlflow-artifacts/").get("Contents", [])]
    assert f"mlflow-artifacts/{experiment}/{run.info.run_id}/artifacts/notes/hello.txt" in keys, keys
    compose_stack.run_id = run.info.run_id


@pytest.mark.stack
def test_the_stacks_registry_delivers_signed_webhooks_to_a_receiver_on_this_machine(compose_stack, tmp_path):
    """`olora serve-webhook` registers with the stack's MLflow (PostgreSQL registry, auth on); MLflow's own test
    delivery, from its container, reaches a receiver on this machine's address on the stack's network, signed so that `olora serve`'s check accepts it."""
    import http.server
    import threading

    from mlflow import MlflowClient

    from olora.serving.server import verify_webhook

    received: list[tuple[dict, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    host = compose_stack.host_address()
    httpd = http.server.HTTPServer((host, 0), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    values, secret = compose_stack.values, "stack-webhook-secret-0123456789"
    env = {k: values[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        (tmp_path / "params.yaml").write_text("register:\n  model_name: stack-webhook-check\n")
        out = sh([str(BIN / "olora"), "--root", str(tmp_path), "serve-webhook", "--url",
                  f"http://{host}:{httpd.server_port}/webhook"], tmp_path, check=False,
                 extra_env={**env, "OLORA_WEBHOOK_SECRET": secret})
        assert out.returncode == 0, out.stderr[-3000:]
        hook_id = out.stdout.split()[1].rstrip(":")
        client = MlflowClient(values["MLFLOW_TRACKING_URI"], registry_uri=values["MLFLOW_TRACKING_URI"])
        for name, value in env.items():  # the client authenticates from the environment
            os.environ[name] = value
        result = client.test_webhook(hook_id)
        assert result.success, result
        headers, body = received[-1]
        assert verify_webhook(secret, headers, body, time.time()) is None
        assert verify_webhook("another-secret-0123456789", headers, body, time.time())[0] == 403
        client.delete_webhook(hook_id)
    finally:
        for name in env:
            os.environ.pop(name, None)
        httpd.shutdown()


@pytest.mark.stack
def test_prefect_answers_with_its_auth_string_and_has_the_pool_and_workers(compose_stack):
    values, config = compose_stack.values, compose_stack.config
    api = values["PREFECT_API_URL"]
    right = {"Authorization": "Basic " + base64.b64encode(values["PREFECT_API_AUTH_STRING"].encode()).decode()}
    assert _http(f"{api}/work_pools/{stack.WORK_POOL}")[0] == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{stack.PREFECT_USER}:not-the-password".encode()).decode()}
    assert _http(f"{api}/work_pools/{stack.WORK_POOL}", headers=wrong)[0] == 401
    status, pool = _http(f"{api}/work_pools/{stack.WORK_POOL}", headers=right)
    assert status == 200 and pool["type"] == "process" and pool["base_job_template"]
    online = prefect_api.online_workers(config.prefect_url, prefect_api.headers(compose_stack.secret), stack.WORK_POOL)
    assert set(online) == {f"olora-worker-{i}" for i in range(1, WORKERS + 1)}, online
    # the zombie-run automation, as `up` created it (and as docker/crash-automation.json holds it)
    status, automations = _http(f"{api}/automations/filter", headers=right, data={})
    ours = [a for a in automations if a["name"] == prefect_api.CRASH_AUTOMATION]
    assert status == 200 and len(ours) == 1 and ours[0]["enabled"] and ours[0]["trigger"]["within"] == 60.0
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, **values,
           "PREFECT_HOME": str(compose_stack.root / ".stack" / "cli-home")}
    prefect = [str(Path(sys.executable).parent / "prefect")]
    done = subprocess.run([*prefect, "automation", "create", "--from-file", str(REPO / "docker" / "crash-automation.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    status, automations = _http(f"{api}/automations/filter", headers=right, data={})
    created = [a for a in automations if a["name"] == prefect_api.CRASH_AUTOMATION and a["id"] != ours[0]["id"]]
    assert len(created) == 1 and created[0]["trigger"]["within"] == 90.0  # the file, as the compose route creates it
    assert _http(f"{api}/automations/{created[0]['id']}", headers=right, data=None, method="DELETE")[0] in (200, 204)


@pytest.mark.stack
def test_dvc_pushes_to_the_stack_remote(compose_stack):
    root = compose_stack.root
    local = (root / ".dvc" / "config.local").read_text()
    assert "remote = stack" in local and "endpointurl" in local
    assert (root / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600
    env = {k: v for k, v in compose_stack.env.items() if not k.startswith("AWS_")}  # config.local alone suffices
    dvc = str(Path(sys.executable).parent / "dvc")
    (root / "tiny.txt").write_text("a tiny tracked file\n")
    for command in (["add", "-q", "tiny.txt"], ["push"], ["status", "-c"]):
        done = subprocess.run([dvc, *command], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "in sync" in done.stdout, done.stdout
    values = compose_stack.values
    s3 = stack.s3_client(compose_stack.config, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
    assert s3.list_objects_v2(Bucket=stack.BUCKET, Prefix="dvc/").get("KeyCount", 0) >= 1


@pytest.mark.stack
def test_every_published_port_is_on_loopback(compose_stack):
    """Each container publishes only on 127.0.0.1, exactly the stack's ports; this machine's other address refuses them."""
    compose, config = compose_stack.compose, compose_stack.config
    published = {}
    for container in compose.containers(running=True):
        for line in compose.engine_cli("port", container).stdout.splitlines():  # "5432/tcp -> 127.0.0.1:54321"
            host, _, port = line.split("->")[1].strip().rpartition(":")
            published[int(port)] = host
    assert published == {port: "127.0.0.1" for port in config.ports.values()}, published
    other = compose_stack.host_address()
    for port in config.ports.values():
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((other, port)) != 0, f"port {port} answers on {other}"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def _wait_final(prefect_url: str, headers: dict, run_ids: list[str], seconds: float, until: set[str] | None = None) -> dict[str, str]:
    """Poll Prefect's REST API until every run is final (or in `until`); returns id -> state type."""
    until = until or {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    deadline, states = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        for run_id in run_ids:
            status, run = _http(f"{prefect_url}/flow_runs/{run_id}", headers=headers)
            assert status == 200, status
            states[run_id] = run["state"]["type"]
        if all(state in until for state in states.values()):
            return states
        time.sleep(3)
    return states


def _prefect_logs(prefect_url: str, headers: dict, run_id: str) -> str:
    status, logs = _http(f"{prefect_url}/logs/filter", headers=headers,
                         data={"logs": {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": 30}}, "limit": 30})
    return "\n".join(entry["message"][-1500:] for entry in logs or [])


@pytest.mark.stack
def test_two_deployment_runs_on_two_workers_recorded_restored_and_a_killed_worker_rerun(compose_stack, tmp_path, tiny_model_dir):
    """The production loop on the real stack: prefect.yaml deployed, two on-demand runs at once on two workers.

    One of them is paused in `train` and its worker killed (SIGKILL, worker and flow-run process, as a lost
    machine): the stack's heartbeat automation marks it CRASHED, `prefect flow-run retry` reruns it on the other
    worker, and it resumes from its checkpoint in the workspace the dead worker left. Then: two MLflow runs in
    the PostgreSQL-backed server (its REST API), two registered versions carrying their git refs, artifacts in
    the S3 store, both refs in the git remote, both adapters in the DVC remote, the deploying checkout untouched,
    and `olora restore` in a fresh clone (with nothing but stack.env) giving the registered adapter's hashes.
    """
    from olora.overlay import team_checkout

    s, values = compose_stack, compose_stack.values
    bin_dir = Path(sys.executable).parent
    headers = prefect_api.headers(s.secret)
    mlflow_auth = {"Authorization": "Basic " + base64.b64encode(
        f"{values['MLFLOW_TRACKING_USERNAME']}:{values['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()}
    env = {k: v for k, v in s.env.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "prefect-home"))
    # the team's git remote and the checkout that deploys (with stack.env, as `make stack` leaves it)
    remote = tmp_path / "team.git"
    root = team_checkout(tmp_path / "deployer", remote, tiny_model_dir, {"evaluate.tasks": ["arc_easy"]}, env)
    env.update(OLORA_GIT_REMOTE=str(remote), OLORA_GIT_BRANCH="main")
    stack.write_env_file(root / "stack.env", values)  # git-ignored
    env.update(values)  # `set -a; . ./stack.env; set +a`

    def cli(*args: str, cwd: Path = root, timeout: int = 300) -> str:
        out = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    cli("prefect", "--no-prompt", "deploy", "--all")
    before = (_git(root, "status", "--porcelain", "--untracked-files=all"), (root / "params.yaml").read_text(), _git(root, "rev-parse", "HEAD"))

    pause = tmp_path / "pause"
    pause.mkdir()
    start = time.monotonic()
    first = cli("prefect", "deployment", "run", "olora-pipeline/on-demand", "--param", 'overrides={"adapter.r": 2}')
    second = cli("prefect", "deployment", "run", "olora-pipeline/on-demand", "--param", 'overrides={"adapter.r": 4}',
                 "--job-variable", "env=" + json.dumps({"OLORA_PAUSE_AT": "train:saved-4", "OLORA_PAUSE_DIR": str(pause)}))
    ids = [next(line.split()[-1] for line in out.splitlines() if "UUID" in line) for out in (first, second)]

    # the second run pauses right after a checkpoint; its worker (and the flow-run process under it) is killed
    reached = pause / "train:saved-4.reached"
    deadline = time.monotonic() + 600
    while not reached.exists():
        assert time.monotonic() < deadline, f"the paused run never reached train:saved-4:\n{_prefect_logs(s.config.prefect_url, headers, ids[1])}"
        time.sleep(0.5)
    import psutil

    paused_pid = int(reached.read_text())
    workers = {name: psutil.Process(proc.pid) for name, proc in s.workers.items()}
    holder = next(name for name, proc in workers.items() if paused_pid in {c.pid for c in proc.children(recursive=True)})
    other = next(name for name in workers if name != holder)
    assert paused_pid in s.kill_worker(holder)
    killed_at = time.monotonic()

    crashed = _wait_final(s.config.prefect_url, headers, [ids[1]], 240)
    assert crashed[ids[1]] == "CRASHED", f"the killed run is {crashed[ids[1]]}, not CRASHED (heartbeat automation)"
    message = _http(f"{s.config.prefect_url}/flow_runs/{ids[1]}", headers=headers)[1]["state"]["message"]
    assert "no heartbeat for 60 s" in message, message  # marked by the stack's automation, nothing else
    crash_seconds = time.monotonic() - killed_at
    (pause / "train:saved-4").touch()  # the rerun passes the marker
    cli("prefect", "flow-run", "retry", ids[1])
    states = _wait_final(s.config.prefect_url, headers, ids, 900)
    elapsed = time.monotonic() - start
    if set(states.values()) != {"COMPLETED"}:
        pytest.fail(f"runs ended {states}:\n" + "\n".join(_prefect_logs(s.config.prefect_url, headers, i) for i in ids))
    runs = [_http(f"{s.config.prefect_url}/flow_runs/{i}", headers=headers)[1] for i in ids]
    assert runs[1]["run_count"] >= 2  # the same flow run, run again
    names = [f"{r['name']}-{r['id'][:8]}" for r in runs]  # flows.run_name(): the workspace and runs/ branch name
    print(f"\ntwo runs on two workers, one killed and rerun: {elapsed:.0f} s; crash detected {crash_seconds:.0f} s after the kill")

    # both refs in the git remote, each holding its own overrides; the rerun resumed from the checkpoint
    branches = [f"runs/{n}" for n in names]
    assert set(_git(remote, "branch", "--list", "runs/*", "--format=%(refname:short)").split()) == set(branches)
    assert [yaml_r(_git(remote, "show", f"{b}:params.yaml")) for b in branches] == [2, 4]
    assert json.loads(_git(remote, "show", f"{branches[1]}:metrics/train.json"))["resumed"] is True
    assert json.loads(_git(remote, "show", f"{branches[0]}:metrics/train.json"))["resumed"] is False
    registrations = [json.loads(_git(remote, "show", f"{b}:reports/registration.json")) for b in branches]
    model = registrations[0]["name"]

    # MLflow (PostgreSQL-backed, over REST): one run per flow run, FINISHED, tagged with its ref; two versions
    mlflow = values["MLFLOW_TRACKING_URI"]
    status, experiment = _http(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=olora", headers=mlflow_auth)
    assert status == 200
    status, found = _http(f"{mlflow}/api/2.0/mlflow/runs/search", headers=mlflow_auth, data={
        "experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 100})
    tagged = {}
    for run in found.get("runs", []):
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        if tags.get("olora.run_name") in names:
            tagged.setdefault(tags["olora.run_name"], []).append((run["info"], tags))
    assert {n: len(v) for n, v in tagged.items()} == {n: 1 for n in names}  # exactly one run each, the rerun's included
    for n, branch in zip(names, branches):
        info, tags = tagged[n][0]
        assert info["status"] == "FINISHED" and tags["olora.git_branch"] == branch
        assert tags["olora.git_commit"] == _git(remote, "rev-parse", branch).strip()
    status, versions = _http(f"{mlflow}/api/2.0/mlflow/model-versions/search?filter=" + urllib.request.quote(f"name='{model}'"),
                             headers=mlflow_auth)
    by_branch = {next(t["value"] for t in v["tags"] if t["key"] == "olora.git_branch"): v for v in versions["model_versions"]}
    assert set(by_branch) == set(branches)
    # their artifacts in the S3 store (served through the tracking server)
    s3 = stack.s3_client(s.config, values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.BUCKET) for o in page.get("Contents", [])]
    for n in names:
        run_id = tagged[n][0][0]["run_id"]
        assert any(run_id in k and k.endswith("loss_curve.png") for k in keys), f"no artifacts of run {run_id} in the bucket"

    # the deploying checkout is untouched
    assert (_git(root, "status", "--porcelain", "--untracked-files=all"), (root / "params.yaml").read_text(),
            _git(root, "rev-parse", "HEAD")) == before and not (root / "dvc.lock").exists()

    # a fresh clone with only stack.env restores each registered version: exact params, data and adapter
    import hashlib

    fresh = tmp_path / "fresh"
    subprocess.run(["git", "clone", "-q", str(remote), str(fresh)], check=True)
    stack.write_env_file(fresh / "stack.env", values)
    clean = {k: v for k, v in env.items() if k not in values}  # nothing exported: olora reads stack.env itself
    for branch in branches:
        version = by_branch[branch]
        done = subprocess.run(["olora", "restore", "--model", model, "--version", version["version"]], cwd=fresh, env=clean,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _git(fresh, "rev-parse", "HEAD").strip() == _git(remote, "rev-parse", branch).strip()
        assert "Data and pipelines are up to date" in cli("dvc", "status", cwd=fresh)
        assert "in sync" in cli("dvc", "status", "-c", cwd=fresh)  # the DVC remote holds every output of this run
        recorded = json.loads(next(t["value"] for t in version["tags"] if t["key"] == "artifact_sha256"))
        assert hashlib.sha256((fresh / "models/exported/adapter_model.safetensors").read_bytes()).hexdigest() == \
            recorded["adapter/adapter_model.safetensors"]

    # the dead worker started again joins the pool beside the other
    s.start_worker(int(holder.rsplit("-", 1)[1]))
    assert {holder, other} <= set(prefect_api.online_workers(s.config.prefect_url, headers, stack.WORK_POOL))


def yaml_r(text: str) -> int:
    import yaml

    return yaml.safe_load(text)["adapter"]["r"]


@pytest.mark.stack
def test_continuous_training_on_the_stack(compose_stack, tmp_path, tiny_untied_model_dir):
    """tests/continuous.py's scenario on the stack's services: a data version published with `olora publish-data` (its
    content in the S3 store) starts one run on its commit on the stack's workers, registered in the PostgreSQL-backed
    registry with its data version; docs-only and unpushed data commits start none; `olora serve --alias champion`
    follows the promotion through the registry's signed webhook (polling off), every request answered."""
    from continuous import MODEL, Team, scenario, start_project
    from olora.overlay import team_checkout

    s, values = compose_stack, compose_stack.values
    env = {k: v for k, v in s.env.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "prefect-home"))
    remote = tmp_path / "team.git"
    root = team_checkout(tmp_path / "deployer", remote, tiny_untied_model_dir,
                         {"evaluate.tasks": ["arc_easy"], "data.source": "data/raw/train.jsonl", "register.model_name": MODEL}, env)
    env.update(OLORA_GIT_REMOTE=str(remote), OLORA_GIT_BRANCH="main")
    stack.write_env_file(root / "stack.env", values)  # git-ignored
    env.update(values)  # `set -a; . ./stack.env; set +a`: the S3 DVC remote, MLflow and Prefect with their credentials
    start_project(root, env)
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        timings = scenario(Team(root, remote, env, s.config.prefect_url, prefect_api.headers(s.secret), webhook=True,
                                serve_host=s.host_address()), tmp_path)
    finally:  # the watcher's schedule must not outlive this test on the shared stack
        for name in ("olora-data-watch/data-watch", "olora-pipeline/on-new-data"):
            subprocess.run([str(BIN / "prefect"), "deployment", "delete", name], cwd=root, env=env, capture_output=True, timeout=120)
    print(f"\ncontinuous training on the stack: {json.dumps(timings)}")


@pytest.mark.stack
def test_down_removes_the_containers_and_data_survives_up_again(compose_stack, monkeypatch):
    from mlflow import MlflowClient

    compose = compose_stack.compose
    volumes = compose.engine_cli("volume", "ls", "--format", "{{.Name}}",
                                 "--filter", f"label=com.docker.compose.project={compose.project}").stdout.split()
    assert len(volumes) >= 2
    compose_stack.run("down")
    assert compose.containers() == []
    assert all(_free(port) for port in compose_stack.config.ports.values())
    assert compose.engine_cli("volume", "ls", "--format", "{{.Name}}",
                              "--filter", f"label=com.docker.compose.project={compose.project}").stdout.split() == volumes
    # stack.env is set aside, so that commands no longer go to the stopped servers
    assert not (compose_stack.root / "stack.env").exists()
    before = envfile.read_env_file(compose_stack.root / envfile.STOPPED_FILE)
    compose_stack.run("up")  # warm: the same secrets, the data in its volumes
    assert compose_stack.values == before and not (compose_stack.root / envfile.STOPPED_FILE).exists()
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, before[name])
    run_id = getattr(compose_stack, "run_id", None)
    assert run_id, "the MLflow test did not run first"
    run = MlflowClient(before["MLFLOW_TRACKING_URI"], registry_uri=before["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.data.metrics["loss"] == 0.5
    s3 = stack.s3_client(compose_stack.config, before["AWS_ACCESS_KEY_ID"], before["AWS_SECRET_ACCESS_KEY"])
    assert s3.get_object(Bucket=stack.BUCKET, Key="checks/hello.txt")["Body"].read() == b"hello"
    import optuna

    name, rate = getattr(compose_stack, "optuna_study", (None, None))
    assert name, "the Optuna test did not run first"
    assert [t.params for t in optuna.load_study(study_name=name, storage=before["OLORA_OPTUNA_STORAGE"]).trials] == \
        [{"learning_rate": rate}]


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_crash_detection_setting_is_checked_and_the_automation_is_prefects_zombie_recipe():
    assert prefect_api.crash_after_seconds({}) == 90
    assert prefect_api.crash_after_seconds({prefect_api.CRASH_AFTER_VAR: "75"}) == 75
    for bad in ("30", "soon", "-1"):
        with pytest.raises(ServiceError, match=rf"{prefect_api.CRASH_AFTER_VAR}='{bad}': expected whole seconds, at least 60"):
            prefect_api.crash_after_seconds({prefect_api.CRASH_AFTER_VAR: bad})
    body = prefect_api.crash_automation(75)
    from prefect.events.schemas.automations import AutomationCore

    parsed = AutomationCore.model_validate(body)  # Prefect's own schema accepts it
    assert parsed.trigger.posture.value == "Proactive" and parsed.trigger.within.total_seconds() == 75
    assert parsed.actions[0].type == "change-flow-run-state" and parsed.actions[0].state.value == "CRASHED"
