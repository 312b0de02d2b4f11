"""Shared fixtures: hermetic environment, thread limits, and tiny real models built in seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Hermetic and quiet before anything imports the libraries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _machine_setting in ("OLORA_NODE_RANK", "OLORA_MASTER_ADDR"):  # a multi-node shell must not leak into tests
    os.environ.pop(_machine_setting, None)
# one torch thread per pytest-xdist worker (two workers share the two cores), else two
os.environ.setdefault("OLORA_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OLORA_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]

from olora.overlay import build_tiny_llama  # noqa: E402
from ports import free_port, free_ports  # noqa: E402,F401 - the one free-port helper (tests/ports.py), re-exported
from stackfix import compose_stack  # noqa: E402,F401 - the compose stack for the stack tier (tests/stackfix.py)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with an untied head: its greedy answers vary, so serving comparisons mean something."""
    return build_tiny_llama(tmp_path_factory.mktemp("models-untied") / "tiny-llama-untied", tie_word_embeddings=False)


def wait_for_http(url: str, seconds: float = 90.0) -> None:
    """Poll `url` until it answers (a server the test started), or fail the test."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds:.0f} s")


BIN = Path(sys.executable).parent


@contextlib.contextmanager
def running_server(command, cwd: Path, health: str, env: dict | None = None, seconds: float = 120.0,
                   log_path: Path | None = None, stop_seconds: float = 30.0, port: int | None = None,
                   host: str = "127.0.0.1"):
    """Start a server process on a free loopback port, wait for `health` to answer, yield its base URL, stop it.

    `command(port)` gives the argv. The whole process group is stopped (SIGTERM, then SIGKILL after
    `stop_seconds`), so nothing outlives the test; with `log_path` its output is kept there and printed
    when the test fails. `port` when the caller needs it beforehand (e.g. in the server's own environment).
    """
    port = port or free_port()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        server = subprocess.Popen(command(port), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    finally:
        if log_path:
            log.close()
    base = f"http://{host}:{port}"
    try:
        wait_for_http(f"{base}{health}", seconds=seconds)
        yield base
    except BaseException:
        if log_path and log_path.is_file():
            print(log_path.read_text()[-5000:])
        raise
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=stop_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=stop_seconds)


def sh(args: list[str], cwd: Path, check: bool = True, extra_env: dict | None = None):
    """Run a command the way a user would (this venv's bin first on PATH); fail the test with its output."""
    import subprocess

    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "2", **(extra_env or {})}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def make_dvc_project(root: Path, model_dir: Path, extra: dict | None = None) -> Path:
    """A user's clone in `root`: the project files, the tiny overlay's params, git and DVC initialised, committed."""
    from olora.overlay import copy_project, write_params

    root.mkdir(parents=True, exist_ok=True)
    copy_project(root)
    write_params(root, model_dir, extra)
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "init"], root)
    return root


_PAUSED: list["PausedRun"] = []


@pytest.fixture(autouse=True)
def _no_paused_run_outlives_its_test():
    """A test that fails while a run is paused must not leave it waiting forever."""
    yield
    import signal

    while _PAUSED:
        run = _PAUSED.pop()
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait(60)


class PausedRun:
    """A command started in its own process group that pauses at a stage's marker (olora.faults.marker).

    wait() returns once the marker is reached (or fails the test with the log if the command ends
    first); kill() sends SIGKILL to the whole group, as the OOM killer or a lost node would;
    release() lets it go on.
    """

    def __init__(self, args: list[str], cwd: Path, markers: list[str], pause_dir: Path, extra_env: dict | None = None):
        import subprocess

        self.pause_dir = Path(pause_dir)
        self.pause_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.pause_dir / "run.log"
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OLORA_NUM_THREADS": "2",
               "OLORA_PAUSE_AT": ",".join(markers), "OLORA_PAUSE_DIR": str(self.pause_dir), **(extra_env or {})}
        self.handle = open(self.log, "w")
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        _PAUSED.append(self)

    def output(self) -> str:
        if not self.handle.closed:
            self.handle.flush()
        return self.log.read_text()

    def wait(self, marker: str, seconds: float = 600) -> None:
        import time

        deadline = time.monotonic() + seconds
        while not (self.pause_dir / f"{marker}.reached").exists():
            if self.process.poll() is not None:
                pytest.fail(f"the run ended ({self.process.returncode}) before marker {marker}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"marker {marker} not reached in {seconds:.0f} s:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def release(self, marker: str) -> None:
        (self.pause_dir / marker).touch()

    def kill(self) -> None:
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(60)
        self.handle.close()

    def finish(self, seconds: float = 900) -> int:
        code = self.process.wait(seconds)
        self.handle.close()
        return code


# The longest test files first: with `make test`'s pytest-xdist workers (--dist loadfile) a long file that
# starts last would leave the other worker idle at the end (longest-processing-time-first scheduling).
LONGEST_FIRST = ("test_compare.py", "test_crash_safety.py", "test_stack.py", "test_bench_scripts.py",
                 "test_flows.py", "test_distributed.py", "test_continuous_training.py", "test_durable.py", "test_doctor.py",
                 "test_serving_http.py",
                 "test_mlflow.py", "test_custom_tasks.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
