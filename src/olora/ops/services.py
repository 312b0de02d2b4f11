"""Long-running servers a team shares: described once, started healthy, stopped for good.

A `Service` says what to run (command, environment), where its log goes and which URL answers
when it is ready. `start` launches it in its own process group, waits for the health URL and,
if the process dies or never answers, fails with the tail of its log; `stop` sends SIGTERM to
the whole group, waits, and escalates to SIGKILL after a timeout (some servers, SeaweedFS for
one, outlive SIGTERM). These are the building blocks of a full stack (PostgreSQL, an S3 store,
MLflow, Prefect); this module provides the two servers the pipeline talks to:

- `mlflow_service`: `mlflow server --app-name basic-auth`, bound to 127.0.0.1 unless told
  otherwise. The admin account comes from MLflow's own variables MLFLOW_AUTH_ADMIN_USERNAME
  (default `admin`) and MLFLOW_AUTH_ADMIN_PASSWORD, written with the rest of MLflow's auth
  configuration to a 0600 file in the (git-ignored) state folder. Clients authenticate with
  MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
- `prefect_service`: `prefect server start` with Prefect's basic auth: the server reads
  PREFECT_SERVER_API_AUTH_STRING (`user:password`), clients and workers send
  PREFECT_API_AUTH_STRING.

Weak passwords (empty, shorter than 12 characters, or MLflow's old default `password1234`) are
refused before anything starts.

    python -m olora.ops.services mlflow --backend-store-uri sqlite:///mlflow.db --port 5000
    python -m olora.ops.services prefect --port 4200
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from olora.errors import OloraError

LOOPBACK = "127.0.0.1"
MIN_PASSWORD_LENGTH = 12
# Publicly known defaults: MLflow's basic-auth app shipped `admin` / `password1234` until 2.x.
KNOWN_DEFAULT_PASSWORDS = frozenset({"password1234", "password", "admin", "changeme"})
DEFAULT_STATE_DIR = Path(".stack")  # git-ignored; holds auth configuration, databases and logs

# MLflow's own variable names (mlflow.environment_variables)
MLFLOW_ADMIN_USERNAME_VAR = "MLFLOW_AUTH_ADMIN_USERNAME"
MLFLOW_ADMIN_PASSWORD_VAR = "MLFLOW_AUTH_ADMIN_PASSWORD"
MLFLOW_SECRET_KEY_VAR = "MLFLOW_FLASK_SERVER_SECRET_KEY"
# Prefect's own setting names (prefect.settings: server.api.auth_string / api.auth_string)
PREFECT_SERVER_AUTH_VAR = "PREFECT_SERVER_API_AUTH_STRING"
PREFECT_CLIENT_AUTH_VAR = "PREFECT_API_AUTH_STRING"


class ServiceError(OloraError):
    """A service could not be configured, started or stopped."""


@dataclass(frozen=True)
class Service:
    """What to run and how to tell it is ready. `env` is the child's complete environment."""

    name: str
    command: list[str]
    url: str  # where clients reach it
    health_url: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold secrets: never printed
    start_timeout: float = 120.0
    stop_timeout: float = 15.0
    host: str = LOOPBACK
    port: int | None = None  # checked to be free before starting, so the health check cannot hit a stranger
    # Extensions for servers that are not plain HTTP (PostgreSQL) or run as another user:
    ready: Callable[[], bool] | None = field(default=None, repr=False, compare=False)  # replaces the health-URL probe
    user: str | None = None  # run as this system user (needs root); PostgreSQL refuses to run as root
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM  # PostgreSQL: SIGINT is its fast shutdown (SIGTERM waits for clients)


class _Adopted:
    """A server started by another process (`python -m olora.ops.stack up`), driven through psutil like a Popen."""

    def __init__(self, proc) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        import psutil

        try:
            if self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        self.returncode = -1 if self.returncode is None else self.returncode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import psutil

        try:
            self._proc.wait(timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired as exc:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0) from exc
        return self.poll() or 0


@dataclass
class RunningService:
    service: Service
    process: subprocess.Popen  # or _Adopted (see adopt)
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def processes(self) -> list:
        """The server's processes still alive (psutil.Process): its descendants and its process group."""
        import psutil

        if self.stopped:
            return []
        found = {}
        try:
            root = psutil.Process(self.process.pid)
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():  # members whose parent already exited
            try:
                if p.pid not in found and os.getpgid(p.pid) == self.process.pid:
                    found[p.pid] = p
            except (OSError, psutil.Error):
                pass
        return alive(list(found.values()))

    def stop(self, timeout: float | None = None) -> None:
        stop(self, timeout)

    def __enter__(self) -> RunningService:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def adopt(service: Service, pid: int, create_time: float | None = None) -> RunningService | None:
    """A handle on a server that an earlier process started (its pid recorded), so that `stop` can end it.

    None when no such process runs, or when the pid now belongs to another process (its start time differs).
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:
        return None
    return RunningService(service, _Adopted(proc))  # type: ignore[arg-type]


def as_user(user: str | None) -> dict:
    """subprocess keyword arguments that run a child as `user`, with that user's group only (not root's)."""
    if not user:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def check_password(password: str | None, variable: str) -> None:
    """Refuse an empty, short or publicly known password, naming the variable to set."""
    if not password:
        raise ServiceError(f"{variable} is not set (or empty); set it to a password of at least {MIN_PASSWORD_LENGTH} characters")
    if password.lower() in KNOWN_DEFAULT_PASSWORDS:
        raise ServiceError(f"{variable} is a publicly known default password; choose another one (at least {MIN_PASSWORD_LENGTH} characters)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ServiceError(f"{variable} is {len(password)} characters long; use at least {MIN_PASSWORD_LENGTH}")


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


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers do not count
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start(service: Service) -> RunningService:
    """Launch the service in its own process group and wait until its health URL answers 200."""
    if service.port is not None and not port_free(service.host, service.port):
        raise ServiceError(f"{service.name}: port {service.port} is already in use; choose another with --port")
    service.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(service.log_path, "ab") as log:
        process = subprocess.Popen(
            service.command,
            env=dict(service.env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches every worker it forks
            cwd=service.cwd,
            **as_user(service.user),
        )
    running = RunningService(service, process)
    deadline = time.monotonic() + service.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop(running)  # workers it forked may still be there
            raise ServiceError(
                f"{service.name} exited with status {process.returncode} before answering at {service.health_url}; "
                f"last lines of {service.log_path}:\n{log_tail(service.log_path)}"
            )
        try:
            ok = service.ready() if service.ready is not None else answers(service.health_url)
        except ServiceError as exc:  # it answers, but refuses us (wrong credentials): waiting will not help
            stop(running)
            raise ServiceError(f"{service.name} at {service.url}: {exc}; last lines of {service.log_path}:\n"
                               f"{log_tail(service.log_path)}") from exc
        if ok:
            return running
        time.sleep(0.5)
    stop(running)
    raise ServiceError(
        f"{service.name} did not answer at {service.health_url} within {service.start_timeout:.0f} s; "
        f"last lines of {service.log_path}:\n{log_tail(service.log_path)}"
    )


def alive(procs: Sequence) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _signal_all(running: RunningService, procs: Sequence, sig: int) -> None:
    try:
        os.killpg(running.process.pid, sig)  # the group: workers started after we listed them
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:  # and any descendant that left the group
        try:
            p.send_signal(sig)
        except Exception:  # already gone
            pass


def stop(running: RunningService, timeout: float | None = None) -> None:
    """SIGTERM the service's processes, wait up to `timeout` s, then SIGKILL whatever is left."""
    if running.stopped:
        return
    timeout = running.service.stop_timeout if timeout is None else timeout
    procs = running.processes()
    _signal_all(running, procs, running.service.stop_signal)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running.process.poll()  # reap our own child
        if not alive(procs):
            break
        time.sleep(0.2)
    else:
        _signal_all(running, alive(procs), signal.SIGKILL)
        end = time.monotonic() + 10
        while alive(procs) and time.monotonic() < end:
            running.process.poll()
            time.sleep(0.1)
    try:
        running.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    left = alive(procs)
    running.stopped = not left
    if left:
        raise ServiceError(f"{running.service.name}: processes {[p.pid for p in left]} survived SIGKILL")


def _child_env(environ: Mapping[str, str] | None, drop: Sequence[str] = ()) -> dict[str, str]:
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in drop}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def url_host(host: str) -> str:
    return LOOPBACK if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


def _secret_key(state_dir: Path, environ: Mapping[str, str]) -> str:
    """MLflow's CSRF key: from the environment, else one generated once and kept (0600) in the state folder."""
    if environ.get(MLFLOW_SECRET_KEY_VAR):
        return environ[MLFLOW_SECRET_KEY_VAR]
    path = state_dir / "flask-secret-key"
    if path.is_file():
        return path.read_text().strip()
    key = secrets.token_urlsafe(32)
    write_private(path, key + "\n")
    return key


def mlflow_service(
    backend_store_uri: str,
    *,
    state_dir: Path = DEFAULT_STATE_DIR / "mlflow",
    host: str = LOOPBACK,
    port: int = 5000,
    artifacts_destination: str | None = None,
    default_permission: str = "READ",
    auth_database_uri: str | None = None,
    workers: int = 1,
    environ: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Service:
    """An MLflow tracking server with MLflow's basic-auth app. Raises ServiceError on a weak admin password."""
    environ = dict(os.environ if environ is None else environ)
    username = environ.get(MLFLOW_ADMIN_USERNAME_VAR) or "admin"
    password = environ.get(MLFLOW_ADMIN_PASSWORD_VAR)
    check_password(password, MLFLOW_ADMIN_PASSWORD_VAR)
    if importlib.util.find_spec("flask_wtf") is None:
        raise ServiceError("MLflow's basic-auth app needs Flask-WTF (CSRF protection): pip install 'mlflow[auth]'")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    auth_db = auth_database_uri or f"sqlite:///{state_dir / 'basic_auth.db'}"
    ini = write_private(
        state_dir / "basic_auth.ini",
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {auth_db}\n"
        f"admin_username = {username}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    env = _child_env(environ, drop=(MLFLOW_ADMIN_USERNAME_VAR, MLFLOW_ADMIN_PASSWORD_VAR))  # the ini is the one source
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true",
    )
    # MLflow's job runner (GenAI scorers, trace archival) is unused here: fewer processes, faster start
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env[MLFLOW_SECRET_KEY_VAR] = _secret_key(state_dir, environ)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--app-name", "basic-auth",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination or (state_dir / "mlartifacts").as_uri(),
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        *extra_args,
    ]
    return Service(
        name="mlflow",
        command=command,
        env=env,
        url=f"http://{url_host(host)}:{port}",
        health_url=f"http://{url_host(host)}:{port}/health",
        log_path=state_dir / "mlflow.log",
        host=host,
        port=port,
    )


def prefect_service(
    *,
    state_dir: Path = DEFAULT_STATE_DIR / "prefect",
    host: str = LOOPBACK,
    port: int = 4200,
    environ: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> Service:
    """A Prefect server that refuses requests without PREFECT_SERVER_API_AUTH_STRING (`user:password`).

    Its database is SQLite under `state_dir` unless PREFECT_SERVER_DATABASE_CONNECTION_URL is set.
    """
    environ = dict(os.environ if environ is None else environ)
    auth = environ.get(PREFECT_SERVER_AUTH_VAR, "")
    user, sep, password = auth.partition(":")
    if auth and (not sep or not user):
        raise ServiceError(f"{PREFECT_SERVER_AUTH_VAR} must have the form user:password")
    check_password(password, f"the password part of {PREFECT_SERVER_AUTH_VAR} (user:password)")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = _child_env(environ)
    env.setdefault("PREFECT_HOME", str(state_dir / "home"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)  # the server must not try to talk to another one
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port), *extra_args]
    return Service(
        name="prefect",
        command=command,
        env=env,
        url=f"http://{url_host(host)}:{port}/api",
        health_url=f"http://{url_host(host)}:{port}/api/health",
        log_path=state_dir / "prefect.log",
        host=host,
        port=port,
    )


def serve_forever(service: Service) -> int:
    """Start `service`, report where it answers, and stop it on Ctrl-C or SIGTERM."""
    running = start(service)
    print(f"{service.name} is up at {service.url} (pid {running.pid}, log {service.log_path}); Ctrl-C stops it", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.is_set():
        if running.process.poll() is not None:
            print(f"{service.name} exited with status {running.process.returncode}; last lines of {service.log_path}:\n"
                  f"{log_tail(service.log_path)}", file=sys.stderr)
            stop(running)
            return 1
        done.wait(1.0)
    stop(running)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olora.ops.services", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="service", required=True)
    m = sub.add_parser("mlflow", help="MLflow tracking server with basic auth (admin from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD)")
    m.add_argument("--backend-store-uri", required=True, help="e.g. sqlite:///mlflow.db or postgresql://host/db")
    m.add_argument("--artifacts-destination", default=None, help="default: <state-dir>/mlartifacts")
    m.add_argument("--default-permission", default="READ", choices=["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"])
    m.add_argument("--workers", type=int, default=1)
    m.add_argument("--port", type=int, default=5000)
    p = sub.add_parser("prefect", help="Prefect server with basic auth (PREFECT_SERVER_API_AUTH_STRING=user:password)")
    p.add_argument("--port", type=int, default=4200)
    for s, default in ((m, "mlflow"), (p, "prefect")):
        s.add_argument("--host", default=LOOPBACK, help="bind address (default 127.0.0.1: this machine only)")
        s.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR / default, help="auth config, databases, log")
    args = parser.parse_args(argv)
    try:
        if args.service == "mlflow":
            service = mlflow_service(
                args.backend_store_uri, state_dir=args.state_dir, host=args.host, port=args.port,
                artifacts_destination=args.artifacts_destination, default_permission=args.default_permission,
                workers=args.workers,
            )
        else:
            service = prefect_service(state_dir=args.state_dir, host=args.host, port=args.port)
        return serve_forever(service)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
