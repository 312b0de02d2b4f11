"""The team's shared services, declared once in docker/compose.yaml and driven by compose: `make stack`.

    python -m olora.ops.stack up [--workers N]   # start (or complete) the stack, wait for health; writes stack.env
    python -m olora.ops.stack status             # each service's container: state and health
    python -m olora.ops.stack down [--volumes]   # stop and remove the containers (data stays in named volumes)

The engine is `docker compose` where a Docker CLI with compose answers and its daemon runs, else podman-compose
(or `podman compose`). Where the engine cannot wait on `depends_on` conditions itself (podman-compose), `up`
starts each service once its dependencies are ready and ticks podman's health checks (`podman healthcheck run`:
systemd's timers do it elsewhere). COMPOSE_FILE (paths joined by `:`) and COMPOSE_PROJECT_NAME are honoured as
compose honours them (default: docker/compose.yaml, project `olora`).

`up` also: generates the credentials on the first run and keeps them in `.stack/secrets.json` (0600, git-ignored;
OLORA_STACK_DIR moves it), hands them to compose through `.stack/compose.env` (0600), creates the Prefect work pool
and the crashed-run automation, makes sure PostgreSQL's databases exist (docker/postgres/init-databases.sh, run
again in the container: a volume made before a database was added gets it), writes `stack.env` for clients
(KEY=value, 0600, git-ignored; OLORA_OPTUNA_STORAGE names the `optuna` database the workers share) and makes the
S3 DVC remote `stack` the default in `.dvc/config.local`. Published ports bind 127.0.0.1 (OLORA_STACK_*_PORT).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from olora.ops import prefect_api
from olora.ops.envfile import ENV_FILE, STOPPED_FILE, ServiceError, read_env_file

LOOPBACK = "127.0.0.1"
DIR_VAR = "OLORA_STACK_DIR"
BUCKET = "olora"
WORK_POOL = "olora-process"
DVC_REMOTE = "stack"
MLFLOW_ADMIN = "admin"
PREFECT_USER = prefect_api.PREFECT_USER
REGION = "us-east-1"  # SeaweedFS accepts any region; clients need one
PROJECT = "olora"  # compose.yaml's `name:`
COMPOSE_FILE = Path(__file__).resolve().parents[3] / "docker" / "compose.yaml"
WORKER = "worker"  # the compose service `--workers` scales
PG_ROLE = "olora"  # the application role docker/postgres/init-databases.sh makes; it owns every database below
OPTUNA_DB = "optuna"  # Optuna's studies (olora.orchestration.search), shared by the host and the workers
PG_INIT = "/docker-entrypoint-initdb.d/10-olora-databases.sh"  # where compose.yaml mounts init-databases.sh

# what compose publishes on 127.0.0.1: key -> (compose service, environment variable, default port)
PORTS: dict[str, tuple[str, str, int]] = {
    "postgres": ("postgres", "OLORA_STACK_PG_PORT", 5433),
    "mlflow": ("mlflow", "OLORA_STACK_MLFLOW_PORT", 5000),
    "prefect": ("prefect", "OLORA_STACK_PREFECT_PORT", 4200),
    "s3": ("seaweedfs", "OLORA_STACK_S3_PORT", 8333),
}

# stack.env: every variable `up` writes (stack.env.example documents them)
ENV_VARS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_URL", "PREFECT_API_AUTH_STRING",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL",
    "OLORA_S3_BUCKET", "OLORA_DVC_REMOTE", "OLORA_DVC_REMOTE_URL", "OLORA_PREFECT_WORK_POOL",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "OLORA_OPTUNA_STORAGE",
)


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class StackConfig:
    root: Path
    state_dir: Path
    ports: Mapping[str, int]
    workers: int = 1
    project: str = PROJECT
    files: tuple[Path, ...] = (COMPOSE_FILE,)

    def url(self, key: str) -> str:
        return f"http://{LOOPBACK}:{self.ports[key]}"

    @property
    def mlflow_url(self) -> str:
        return self.url("mlflow")

    @property
    def prefect_url(self) -> str:
        return self.url("prefect") + "/api"

    @property
    def s3_url(self) -> str:
        return self.url("s3")


def stack_config(root: Path | str = ".", *, workers: int = 1, environ: Mapping[str, str] | None = None) -> StackConfig:
    """Ports, folders, compose files and project from the environment, defaults otherwise."""
    environ = os.environ if environ is None else environ
    root = Path(root).resolve()
    state = Path(environ.get(DIR_VAR) or root / ".stack")
    state = state if state.is_absolute() else (root / state).resolve()
    ports = {}
    for key, (service, var, default) in PORTS.items():
        value = environ.get(var, "")
        try:
            ports[key] = int(value) if value else default
        except ValueError:
            raise ServiceError(f"{service}: {var}={value!r} is not a port number") from None
        if not 0 < ports[key] < 65536:
            raise ServiceError(f"{service}: {var}={ports[key]} is not a port number")
    if len(set(ports.values())) < len(ports):
        raise ServiceError(f"two services share a port ({', '.join(f'{PORTS[k][1]}={p}' for k, p in ports.items())}); "
                           "give each its own")
    if workers < 0:
        raise ServiceError("--workers must be 0 or more")
    files = tuple(Path(f) if Path(f).is_absolute() else root / f
                  for f in environ.get("COMPOSE_FILE", "").split(os.pathsep) if f) or (COMPOSE_FILE,)
    for f in files:
        if not f.is_file():
            raise ServiceError(f"COMPOSE_FILE names {f}, which does not exist")
    return StackConfig(root=root, state_dir=state, ports=ports, workers=workers,
                       project=environ.get("COMPOSE_PROJECT_NAME") or PROJECT, files=files)


# ------------------------------------------------------------------ secrets and files


def write_private(path: Path, text: str) -> Path:
    """Write `text` to a file only its owner can read (0600), in a folder only the owner can enter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode on open: force it
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def load_secrets(state_dir: Path) -> dict[str, str]:
    """The stack's credentials: generated on the first `up`, kept in a 0600 file, reused afterwards."""
    path = state_dir / "secrets.json"
    current = json.loads(path.read_text()) if path.is_file() else {}
    alphabet = string.ascii_uppercase + string.digits
    wanted = {
        "postgres_superuser_password": secrets.token_urlsafe,
        "postgres_password": secrets.token_urlsafe,
        "mlflow_admin_password": secrets.token_urlsafe,
        "mlflow_flask_secret_key": secrets.token_urlsafe,  # MLflow's CSRF key: the same across restarts
        "prefect_password": secrets.token_urlsafe,
        "s3_access_key": lambda: "OLORA" + "".join(secrets.choice(alphabet) for _ in range(15)),
        "s3_secret_key": lambda: secrets.token_urlsafe(30),
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
        # artifacts through the tracking server: the presigned S3 URLs MLflow would hand out name the S3 store by its
        # address inside the compose network (seaweedfs:8333), which clients outside it cannot resolve
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
        # compose.yaml gives the workers the same database by its in-network address (postgres:5432; PGPASSWORD)
        "OLORA_OPTUNA_STORAGE": f"postgresql+psycopg2://{PG_ROLE}:{urllib.parse.quote(secret['postgres_password'], safe='')}"
                                f"@{LOOPBACK}:{config.ports['postgres']}/{OPTUNA_DB}",
    }


def compose_env(config: StackConfig, secret: Mapping[str, str]) -> dict[str, str]:
    """What compose.yaml interpolates: the client variables, the server-only secrets and the published ports."""
    return {
        **client_env(config, secret),
        "OLORA_STACK_PG_PASSWORD": secret["postgres_password"],
        "OLORA_STACK_PG_SUPERUSER_PASSWORD": secret["postgres_superuser_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["mlflow_flask_secret_key"],
        **{var: str(config.ports[key]) for key, (_, var, _) in PORTS.items()},
    }


def write_env_file(path: Path, values: Mapping[str, str]) -> Path:
    lines = ["# Written by `python -m olora.ops.stack up` (make stack). Holds credentials: never commit it.",
             "# Load it with: set -a; . ./stack.env; set +a"]
    lines += [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return write_private(path, "\n".join(lines) + "\n")


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


# ------------------------------------------------------------------ the compose driver


ENGINE_VAR = "OLORA_STACK_ENGINE"  # docker or podman: which engine runs the stack (default: docker where it answers)


def engine() -> tuple[list[str], str]:
    """(the compose command, the container CLI): docker's where its daemon answers, else podman's."""
    def ok(*argv: str) -> bool:
        try:
            return subprocess.run(list(argv), capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    wanted = os.environ.get(ENGINE_VAR, "").strip()
    if wanted not in ("", "docker", "podman"):
        raise ServiceError(f"{ENGINE_VAR}={wanted!r}: choose docker or podman (or unset it to pick the one that answers)")
    if wanted != "podman" and shutil.which("docker") and ok("docker", "compose", "version") and ok("docker", "info"):
        return ["docker", "compose"], "docker"
    if wanted == "docker":
        raise ServiceError(f"{ENGINE_VAR}=docker, but `docker compose version` or `docker info` fails: start Docker's "
                           f"daemon and install its compose plugin, or unset {ENGINE_VAR}")
    if shutil.which("podman"):
        local = Path(sys.executable).parent / "podman-compose"
        if local.exists() or shutil.which("podman-compose"):
            return [str(local) if local.exists() else "podman-compose"], "podman"
        if ok("podman", "compose", "version"):
            return ["podman", "compose"], "podman"
    raise ServiceError("no container engine: install Docker with its compose plugin, or podman and podman-compose "
                       "(Debian: apt-get install podman runc iptables netavark aardvark-dns; podman-compose is in "
                       "requirements.lock)")


@dataclass
class Compose:
    """One compose project: docker/compose.yaml (+ overrides) with an env file, under docker or podman."""

    project: str
    env_file: Path
    files: Sequence[Path] = (COMPOSE_FILE,)
    env: Mapping[str, str] | None = None  # the engine's environment (default: this process's)
    cwd: Path | None = None
    command: list[str] = field(default_factory=list)  # the compose command; found by engine() when empty
    cli: str = ""  # docker or podman

    def __post_init__(self) -> None:
        if not self.command:
            self.command, self.cli = engine()
        self.cli = self.cli or ("docker" if self.command[0] == "docker" else "podman")

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        argv = [*self.command, "--project-name", self.project, "--env-file", str(self.env_file)]
        for f in self.files:
            argv += ["-f", str(f)]
        try:
            done = subprocess.run([*argv, *args], env=self.engine_env(), capture_output=True, text=True,
                                  timeout=timeout, cwd=self.cwd)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"{' '.join(self.command)} {' '.join(args)} did not finish within {timeout:.0f} s "
                               f"(a first `up` pulls or builds images): run it again, or see `{self.cli} ps -a` and "
                               "its logs") from None
        if check and done.returncode != 0:
            raise ServiceError(f"{' '.join(self.command)} {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def engine_cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run([self.cli, *args], env=self.engine_env(), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"{self.cli} {' '.join(args[:4])} did not answer within {timeout:.0f} s") from None
        if check and done.returncode != 0:
            raise ServiceError(f"{self.cli} {' '.join(args[:4])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def engine_env(self) -> dict[str, str]:
        """The engine's environment without the env file's variables: compose lets the shell win over --env-file,
        and the services must get the file's values (the generated secrets stack.env hands to clients), never a
        shell's AWS keys or a loaded stack.env of another stack."""
        env = dict(self.env or os.environ)
        if self.env_file.is_file():
            for line in self.env_file.read_text().splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    env.pop(line.split("=", 1)[0].strip().removeprefix("export ").strip(), None)
        return env

    def config(self) -> dict:
        import yaml

        return yaml.safe_load(self("config").stdout)

    def services(self) -> dict[str, dict]:
        """The services `up` starts: those without a profile."""
        return {name: s for name, s in self.config()["services"].items() if not s.get("profiles")}

    def containers(self, service: str | None = None, running: bool = False) -> list[str]:
        """The project's container names (of one service), running ones or all."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        listed = self.engine_cli("ps", *([] if running else ["-a"]), "--format", "{{.Names}}", *filters).stdout.split()
        return sorted(listed)

    def container(self, service: str) -> str:
        found = self.containers(service)
        if not found:
            raise ServiceError(f"compose project {self.project!r} has no container for service {service!r}")
        return found[0]

    def state(self, container: str) -> tuple[str, str, str]:
        """(status, exit code, health) of a container; health is '' without a health check."""
        fmt = "{{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
        out = self.engine_cli("inspect", "--format", fmt, container, check=False).stdout.split()
        return (out + ["", "", ""])[0], (out + ["", ""])[1], (out[2] if len(out) > 2 else "")

    def ready(self, spec: Mapping, container: str) -> bool:
        """Whether a container is what its dependants wait for: healthy, exited 0 (one-shot) or running."""
        status, code, health = self.state(container)
        if spec.get("restart") == "no":
            if status == "exited" and code != "0":
                raise ServiceError(f"{container} exited with status {code}:\n{self.logs(container)}")
            return status == "exited"
        if (spec.get("healthcheck") or {}).get("test") and not spec["healthcheck"].get("disable"):
            if health != "healthy" and status == "running" and self.cli == "podman":
                self.engine_cli("healthcheck", "run", container, check=False, timeout=60)  # no systemd timers here
                health = self.state(container)[2]
            return health == "healthy"
        return status == "running"

    def logs(self, container: str, lines: int = 60) -> str:
        done = self.engine_cli("logs", "--tail", str(lines), container, check=False)
        return (done.stdout + done.stderr)[-4000:]

    def up(self, scale: Mapping[str, int] | None = None, seconds: float = 900,
           log: Callable[[str], None] = lambda _: None) -> dict[str, float]:
        """Start every service (a scaled one `scale[name]` times; 0: not at all), each once what it depends on is ready,
        and wait until all are. Seconds from the start until each was ready."""
        scale = dict(scale or {})
        services = {n: s for n, s in self.services().items() if scale.get(n, 1) > 0}
        start, ready, started = time.monotonic(), {}, set()
        if self.cli == "docker":  # compose waits on depends_on conditions itself
            self("up", "-d", "--wait", "--wait-timeout", str(int(seconds)),
                 *[a for n, k in scale.items() if k > 0 for a in ("--scale", f"{n}={k}")], *services, timeout=seconds + 60)
            return {n: round(time.monotonic() - start, 1) for n in services}
        while len(ready) < len(services):
            now = [n for n, s in services.items() if n not in started and set(s.get("depends_on") or {}) <= set(ready)]
            if not now and not started - set(ready):
                raise ServiceError(f"depends_on cycle among {sorted(set(services) - set(ready))}")
            for name in now:
                extra = ["--scale", f"{name}={scale[name]}"] if name in scale else []
                self("up", "-d", "--no-deps", *extra, name)
                started.add(name)
            for name in sorted(started - set(ready)):
                if all(self.ready(services[name], c) for c in self.containers(name) or ["-"]):
                    ready[name] = round(time.monotonic() - start, 1)
                    log(f"{name:<10} ready after {ready[name]:.1f} s")
            if time.monotonic() - start > seconds:
                late = sorted(started - set(ready))
                raise ServiceError(f"not ready after {seconds:.0f} s: {', '.join(late)}:\n" +
                                   "\n".join(self.logs(c) for n in late for c in self.containers(n)))
            if len(ready) < len(services):
                time.sleep(1)
        return ready

    def wait(self, service: str, seconds: float = 300) -> float:
        """Until each container of `service` is ready again (after a start or restart)."""
        spec, start = self.services()[service], time.monotonic()
        while not all(self.ready(spec, c) for c in self.containers(service)):
            if time.monotonic() - start > seconds:
                raise ServiceError(f"{service} not ready after {seconds:.0f} s:\n{self.logs(self.container(service))}")
            time.sleep(1)
        return time.monotonic() - start

    def stop(self, service: str, timeout: int = 10) -> None:
        self.engine_cli("stop", "--time", str(timeout), *self.containers(service, running=True) or [])

    def start(self, service: str, wait: bool = True) -> None:
        self.engine_cli("start", *self.containers(service))
        if wait:
            self.wait(service)

    def restart(self, service: str, wait: bool = True) -> None:
        self.engine_cli("restart", *self.containers(service))
        if wait:
            self.wait(service)

    def host_address(self) -> str:
        """This machine's address on the project's network (its gateway): where containers reach a server on the host."""
        fmt = "{{range .IPAM.Config}}{{.Gateway}}{{end}}" if self.cli == "docker" else "{{range .Subnets}}{{.Gateway}}{{end}}"
        return self.engine_cli("network", "inspect", "--format", fmt, f"{self.project}_default").stdout.strip()

    def down(self, volumes: bool = False) -> subprocess.CompletedProcess:
        return self("down", *(["--volumes"] if volumes else []), "--remove-orphans", timeout=300)


def check_ports(config: StackConfig) -> None:
    """Fail before starting anything when a port is taken, naming the service, the port and its variable."""
    for key, port in config.ports.items():
        service, var, _ = PORTS[key]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers do not count
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                raise ServiceError(f"{service}: port {port} on {LOOPBACK} is already in use; "
                                   f"stop what listens there or set {var} to a free port") from None


def ensure_databases(compose: Compose) -> None:
    """Run init-databases.sh (idempotent) in the running PostgreSQL container: the image runs it only on an empty
    volume, so a stack whose volume predates a database gets that database here."""
    container = compose.container("postgres")
    done = compose.engine_cli("exec", container, "sh", PG_INIT, check=False, timeout=120)
    if done.returncode != 0:
        raise ServiceError(f"creating the stack's PostgreSQL databases in {container} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()[-2000:]}\nsee `{compose.cli} logs {container}`")


def compose_of(config: StackConfig, env: Mapping[str, str] | None = None) -> Compose:
    return Compose(config.project, config.state_dir / "compose.env", config.files, env=env, cwd=config.root)


# ------------------------------------------------------------------ the commands


def _say(message: str) -> None:
    print(message, flush=True)


def up(config: StackConfig, log: Callable[[str], None] = _say) -> dict[str, str]:
    """Start (or complete) the stack and wait for health; the work pool, the automation, stack.env and the DVC remote.

    Returns stack.env's values. Starting a running stack again starts only what is missing.
    """
    started_at = time.monotonic()
    crash_within = prefect_api.crash_after_seconds()  # a bad setting fails before anything starts
    secret = load_secrets(config.state_dir)
    write_private(config.state_dir / "compose.env",
                  "".join(f"{k}={v}\n" for k, v in compose_env(config, secret).items()))
    compose = compose_of(config)
    if not compose.containers(running=True):
        check_ports(config)
    log(f"{' '.join(compose.command)}: project {config.project}, {', '.join(str(f) for f in config.files)}")
    compose.up({WORKER: config.workers}, log=log)
    ensure_databases(compose)
    auth = prefect_api.headers(secret)
    prefect_api.ensure_work_pool(config.prefect_url, auth, WORK_POOL)
    prefect_api.ensure_crash_automation(config.prefect_url, auth, crash_within)
    values = client_env(config, secret)
    env_path = write_env_file(config.root / ENV_FILE, values)
    (config.root / STOPPED_FILE).unlink(missing_ok=True)  # what `down` set aside is superseded
    dvc_config = configure_dvc(config, secret)
    log(f"wrote {env_path} (load it: set -a; . ./{ENV_FILE}; set +a)")
    log(f"DVC remote {DVC_REMOTE!r} ({values['OLORA_DVC_REMOTE_URL']}) is the default in {dvc_config}" if dvc_config
        else f"no .dvc/ in {config.root}: DVC remote not configured")
    log(f"stack up in {time.monotonic() - started_at:.1f} s")
    return values


def down(config: StackConfig, volumes: bool = False, log: Callable[[str], None] = _say) -> bool:
    """Stop and remove the project's containers (named volumes stay unless `volumes`). True if any existed.

    stack.env, when it points at this stack, is moved aside (stack.stopped.env), so that commands use
    the project's own stores again instead of a stopped server; `up` writes it anew.
    """
    existed = False
    if (config.state_dir / "compose.env").is_file():
        compose = compose_of(config)
        existed = bool(compose.containers())
        if existed or volumes:
            compose.down(volumes=volumes)
            log(f"stopped compose project {config.project}" + (" and removed its volumes" if volumes else
                                                                " (its data stays in named volumes)"))
    if not existed:
        log("the stack is not running")
    _set_env_file_aside(config, log)
    return existed


def _set_env_file_aside(config: StackConfig, log: Callable[[str], None]) -> None:
    """Move root/stack.env to stack.stopped.env when its MLflow URL is this stack's (a teammate's stack.env stays)."""
    path = config.root / ENV_FILE
    if not path.is_file():
        return
    uri = read_env_file(path).get("MLFLOW_TRACKING_URI")
    if uri != config.mlflow_url:
        log(f"{path} points at {uri}, not at this machine's stack: left as it is")
        return
    path.replace(config.root / STOPPED_FILE)
    log(f"moved {ENV_FILE} to {STOPPED_FILE}: olora commands use the project's own stores until `make stack` writes it again")


def status(config: StackConfig, log: Callable[[str], None] = _say) -> dict[str, str]:
    """Each container of the project: its state (and health). Returns container -> 'up' or what it is instead."""
    if not (config.state_dir / "compose.env").is_file():
        log(f"the stack was never started here (no {config.state_dir / 'compose.env'})")
        return {}
    compose = compose_of(config)
    services = compose.services()
    result = {}
    for container in compose.containers():
        name = next((n for n in services if container in compose.containers(n)), "")
        status_, code, health = compose.state(container)
        spec = services.get(name, {})
        ok = compose.ready(spec, container) if spec else False
        result[container] = "up" if ok and spec.get("restart") != "no" else (
            "done" if ok else f"{status_}{' ' + health if health else ''}")
        log(f"{container:<28} {result[container]:<18} {name}")
    if not result:
        log(f"the stack is not running (compose project {config.project})")
    log(f"client settings: {config.root / ENV_FILE}")
    return result


def s3_client(config: StackConfig, access_key: str, secret_key: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=config.s3_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        region_name=REGION, config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30))


def check_s3(config: StackConfig, access_key: str, secret_key: str, bucket: str = BUCKET) -> None:
    """List the bucket; refused keys or an unreachable store raise a ServiceError naming the S3 store."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"the S3 store (SeaweedFS) at {config.s3_url}"
    try:
        s3_client(config, access_key, secret_key).list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            raise ServiceError(f"{where} refused access key {access_key[:5]}… ({code}); check AWS_ACCESS_KEY_ID and "
                               f"AWS_SECRET_ACCESS_KEY (stack.env)") from None
        raise ServiceError(f"{where}: {code} on bucket {bucket!r}") from None
    except BotoCoreError as exc:
        raise ServiceError(f"{where} is unreachable ({exc}); is the stack up? (make stack-status)") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olora.ops.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--workers", type=int, default=int(os.environ.get("OLORA_STACK_WORKERS", "1")),
                        help="Prefect worker containers (compose service `worker`, the image's default command; default 1)")
    parser.add_argument("--volumes", action="store_true", help="down: also remove the named volumes (all the data)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder (stack.env, .dvc/); default: here")
    args = parser.parse_args(argv)
    try:
        config = stack_config(args.root, workers=args.workers)
        if args.command == "up":
            up(config)
            status(config)
        elif args.command == "down":
            down(config, volumes=args.volumes)
        else:
            states = status(config)
            return 0 if states and all(v in ("up", "done") for v in states.values()) else 1
        return 0
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
