"""The compose stack as tests use it: `make stack`'s services (docker/compose.yaml) in a temporary project.

`compose_stack` (session-scoped, re-exported by conftest.py) runs `python -m olora.ops.stack up --workers 0` in a
fresh git + DVC project on free loopback ports under a compose project name of its own, then starts two Prefect
process workers on this machine against it (`prefect worker start`, as docs/stack.md's host workers): flow runs
read the tiny test models from host folders and a test can SIGKILL a worker. Where podman is the engine, the images
come from tests/containers/harness.py (stand-ins tagged with the upstream names, built only when absent).

What a test gets (`ComposeStack`): `root` (the project, with stack.env and .dvc/config.local), `env` (for
subprocesses: no MLflow/Prefect/AWS variables of the caller's), `values` (stack.env), `secret`, `config`,
`compose` (olora.ops.stack.Compose: `container(service)`, `stop/start/restart(service)`, `containers()`),
`workers` (name -> Popen), `start_worker(i)`, `kill_worker(name)`, `host_address()`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ports import free_ports

from olora.ops import envfile, prefect_api, stack


def _harness():
    """tests/containers/harness.py (podman settings, stand-in images) as the module `harness` the container tier imports."""
    import importlib.util

    if "harness" not in sys.modules:
        spec = importlib.util.spec_from_file_location("harness", Path(__file__).resolve().parent / "containers" / "harness.py")
        sys.modules["harness"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["harness"])
    return sys.modules["harness"]


harness = _harness()

BIN = Path(sys.executable).parent
WORKERS = 2


class ComposeStack:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.config = stack.stack_config(root, workers=0, environ=env)
        self.compose = stack.compose_of(self.config, env)
        self.workers: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, list[float]] = {}

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`python -m olora.ops.stack ARGS` in the project (what `make stack` / `make stack-down` run)."""
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "olora.ops.stack", *args, "--workers", "0"], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        self.timings.setdefault(args[0], []).append(round(time.monotonic() - start, 1))
        assert done.returncode == 0, f"olora.ops.stack {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    @property
    def secret(self) -> dict[str, str]:
        return json.loads((self.config.state_dir / "secrets.json").read_text())

    @property
    def values(self) -> dict[str, str]:
        return envfile.read_env_file(self.root / envfile.ENV_FILE)

    def worker_env(self, name: str) -> dict[str, str]:
        env = {**self.env, **self.values, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
               "PREFECT_HOME": str(self.config.state_dir / name),
               # workspaces and the DVC cache outlive a worker: a rerun of a crashed flow run continues where it stopped
               "OLORA_RUNS_DIR": str(self.config.state_dir / "runs"),
               "OLORA_DVC_CACHE": str(self.config.state_dir / "dvc-cache"),
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(prefect_api.HEARTBEAT_SECONDS)}
        return env

    def start_worker(self, index: int, seconds: float = 180) -> str:
        """A process worker (`olora-worker-<index>`, one flow run at a time) on this machine; returns once it is online."""
        name = f"olora-worker-{index}"
        since = time.time() - 1
        log = open(self.config.state_dir / f"{name}.log", "ab")
        self.workers[name] = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", stack.WORK_POOL, "--type", "process", "--name", name,
             "--limit", "1"], cwd=self.root, env=self.worker_env(name), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + seconds
        while name not in prefect_api.online_workers(self.config.prefect_url, prefect_api.headers(self.secret),
                                                     stack.WORK_POOL, since=since):
            assert self.workers[name].poll() is None, (self.config.state_dir / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"{name} not online after {seconds:.0f} s"
            time.sleep(1)
        return name

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL the worker and every process under it (as a lost machine); the pids killed."""
        import psutil

        proc = psutil.Process(self.workers[name].pid)
        doomed = [proc, *proc.children(recursive=True)]
        for p in doomed:
            p.kill()
        psutil.wait_procs(doomed, timeout=30)
        self.workers[name].wait(timeout=30)
        return [p.pid for p in doomed]

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    def host_address(self) -> str:
        """This machine's address on the stack's network: where a container (MLflow's webhooks) reaches a host server."""
        return self.compose.host_address()


@pytest.fixture(scope="session")
def compose_stack(tmp_path_factory):
    if reason := harness.missing():
        pytest.skip(reason)
    if not harness.exists(harness.IMAGE):
        harness.build_all()
    else:
        harness.build_standins()
    root = tmp_path_factory.mktemp("stack-project")
    env = {k: v for k, v in harness.env().items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "OLORA_STACK_", "COMPOSE_"))}
    env.update(DVC_NO_ANALYTICS="1", OLORA_NUM_THREADS="1",  # the workers' flow runs: two at once on two cores
               COMPOSE_PROJECT_NAME=f"olora-s-{uuid.uuid4().hex[:6]}")
    env[stack.ENGINE_VAR] = "podman"  # the engine harness.py built the images with, even where a docker CLI exists
    env[prefect_api.CRASH_AFTER_VAR] = "60"  # a dead worker's run is marked CRASHED 60 s after its last heartbeat
    for (_, var, _), port in zip(stack.PORTS.values(), free_ports(len(stack.PORTS))):
        env[var] = str(port)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, env=env, check=True)
    s = ComposeStack(root, env)
    try:
        s.run("up")
        for i in range(1, WORKERS + 1):
            s.start_worker(i)
        yield s
    finally:
        s.stop_workers()
        subprocess.run([sys.executable, "-m", "olora.ops.stack", "down", "--volumes"], cwd=root, env=env,
                       capture_output=True, timeout=300)
        print(f"\ncompose stack timings (s; first up is cold): {json.dumps(s.timings)}")
