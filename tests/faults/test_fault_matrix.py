"""The fault matrix on the team stack (issue 30): each fault injected while a deployment run is in a named stage.

One compose stack (docker/compose.yaml under podman) and one tiny team project serve the whole file. Each cell
starts one `on-demand` deployment run on a host-process worker, pauses it at a library marker inside the stage
(`olora.faults.marker`: `OLORA_PAUSE_AT` in the run's job variables, the same mechanism as the other fault tests;
the Prefect API confirms which task is running then), injects the fault, lets it go on and ends the fault. The
expected outcome of every cell is written in EXPECTED before anything runs and asserted after; then `olora doctor`
checks the stores (every version's artifacts, every runs/* branch's DVC objects, the champion loads) and the run's
own record is checked directly.

The stack is used through `FaultStack` only (root, env, stop/start/restart/kill of a service, the workers): the
compose fixture below is the one place that knows how the stack was started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import BIN
from ports import free_ports
from stackfix import ComposeStack, harness  # `make stack` in a test project; podman and the stand-in images
from olora.ops import prefect_api, stack

pytestmark = [pytest.mark.stack, pytest.mark.fault, pytest.mark.container]
OUTAGE = 30.0  # seconds a stopped service stays down


@dataclass(frozen=True)
class Cell:
    service: str  # the compose service (or "worker", "disk")
    marker: str  # where the run pauses: the fault starts there, inside the stage
    stage: str  # the Prefect task running at that marker (its task_run_name)
    fault: str  # stop (OUTAGE s), restart, sigkill, fill
    expected: str  # "completes", or "fails: <text in the flow run's message or logs>; rerun completes"


# Written before any run. "completes": the run rides out the fault (retries with backoff, bounded).
# "fails: X; rerun completes": it fails with a message holding X, and `prefect flow-run retry` of the same flow run
# completes once the fault is over.
EXPECTED = {
    "postgres-train": Cell("postgres", "train:saved-2", "train", "stop", "completes"),
    "postgres-register": Cell("postgres", "register:created", "register", "stop", "completes"),
    "s3-dvc-push": Cell("seaweedfs", "record:dvc-push", "record_run", "stop", "completes"),
    "s3-artifact-upload": Cell("seaweedfs", "register:uploading", "register", "stop", "completes"),
    "prefect-evaluate": Cell("prefect", "evaluate:scored", "evaluate", "restart", "completes"),
    "worker-train": Cell("worker", "train:saved-4", "train", "sigkill", "fails: no heartbeat; rerun completes"),
    "disk-train": Cell("disk", "train:saved-2", "train", "fill", "fails: No space left on device; rerun completes"),
}
MEASURED: dict[str, dict] = {}


# ------------------------------------------------------------------ the stack, as every cell sees it


class Worker:
    """`prefect worker start` on the host against the stack (a process group: SIGKILL takes its flow runs too)."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log, self.process = env, log, None

    def start(self) -> None:
        handle = open(self.log, "a")
        self.process = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", stack.WORK_POOL, "--type", "process",
                                         "--limit", "1"], env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def kill(self) -> None:
        import psutil

        doomed = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for proc in doomed:
            proc.kill()
        psutil.wait_procs(doomed, timeout=30)
        self.process.wait(60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class FaultStack:
    """What a cell may use: the deploying checkout (stack.env in it, `env` for commands), the services' containers,
    the worker, and the git remote the worker clones."""

    root: Path
    env: dict[str, str]
    remote: Path
    containers: dict[str, str]  # compose service -> container name
    worker: Worker
    timings: dict[str, float] = field(default_factory=dict)

    def _podman(self, *args: str) -> None:
        harness.podman(*args, timeout=300)

    def stop(self, service: str) -> None:
        self._podman("stop", "-t", "10", self.containers[service])

    def start(self, service: str) -> None:
        self._podman("start", self.containers[service])

    def restart(self, service: str) -> None:
        self._podman("restart", "-t", "10", self.containers[service])

    def kill(self, service: str) -> None:
        self._podman("kill", "--signal", "KILL", self.containers[service])

    @property
    def prefect(self) -> str:
        return self.env["PREFECT_API_URL"]

    @property
    def auth(self) -> dict[str, str]:
        return prefect_api.basic_auth(self.env["PREFECT_API_AUTH_STRING"])

    def wait_ready(self, seconds: float = 180) -> None:
        """Every service answers again: MLflow with a query that needs PostgreSQL, Prefect, the S3 store."""
        mlflow = prefect_api.basic_auth(f"{self.env['MLFLOW_TRACKING_USERNAME']}:{self.env['MLFLOW_TRACKING_PASSWORD']}")
        checks = {"mlflow": (f"{self.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search", mlflow, {"max_results": 1}),
                  "prefect": (f"{self.prefect}/ready", self.auth, None),
                  "s3": (f"{self.env['AWS_ENDPOINT_URL']}/healthz", {}, None)}
        deadline = time.monotonic() + seconds
        for name, (url, headers, data) in checks.items():
            while True:
                try:
                    if prefect_api.request(url, headers=headers, data=data)[0] == 200:
                        break
                except (OSError, ValueError):  # refused, reset, or a body that is not JSON yet
                    pass
                assert time.monotonic() < deadline, f"{name} did not answer again within {seconds:.0f} s ({url})"
                time.sleep(1)

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert not check or done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done


def _compose_stack(root: Path, env: dict[str, str]) -> ComposeStack:
    """`make stack` (`python -m olora.ops.stack up --workers 0`, as tests/stackfix.py runs it) in the deploying
    checkout, on free loopback ports under a compose project of its own: stack.env is the one `up` writes."""
    ports = {var: str(port) for (_, var, _), port in zip(stack.PORTS.values(), free_ports(len(stack.PORTS)))}
    compose_stack = ComposeStack(root, {**env, **ports, stack.ENGINE_VAR: "podman",
                                        "COMPOSE_PROJECT_NAME": f"olora-faults-{uuid.uuid4().hex[:6]}"})
    compose_stack.run("up")
    return compose_stack


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, tiny_model_dir):
    if reason := harness.missing():
        pytest.skip(reason)
    images = [image for service, image in harness.compose_images().items() if service != "worker-cuda"]
    if not all(harness.exists(harness.qualified(image)) for image in images):
        harness.build_all()  # what the container tier builds; reused when present (a rebuild takes minutes)
    from olora.overlay import team_checkout

    folder = tmp_path_factory.mktemp("fault-matrix")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "OLORA_STACK_", "OLORA_PAUSE"))}
    env.update(PATH=f"{BIN}:{os.environ['PATH']}", PREFECT_HOME=str(folder / "prefect-home"), OLORA_NUM_THREADS="1",
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OLORA_GIT_REMOTE=str(folder / "team.git"), OLORA_GIT_BRANCH="main",
               OLORA_RUNS_DIR=str(folder / "runs"), OLORA_DVC_CACHE=str(folder / "dvc-cache"),
               PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(prefect_api.HEARTBEAT_SECONDS))
    root = team_checkout(folder / "deployer", folder / "team.git", tiny_model_dir, {"evaluate.tasks": ["arc_easy"]}, env)
    start = time.monotonic()
    compose_stack = _compose_stack(root, env)
    try:
        env.update(compose_stack.values)
        containers = {name: compose_stack.compose.container(name) for name in ("postgres", "seaweedfs", "prefect", "mlflow")}
        s = FaultStack(root, env, folder / "team.git", containers, Worker(env, folder / "worker.log"))
        s.timings["stack up"] = round(time.monotonic() - start, 1)
        print(f"\ncompose stack ready in {s.timings['stack up']} s")
        # a dead worker's run: CRASHED after the stack's default (90 s without a heartbeat; 60 s marked a live run CRASHED
        # during the 30 s PostgreSQL outage, two 30 s heartbeats being lost)
        prefect_api.ensure_crash_automation(s.prefect, s.auth, prefect_api.crash_after_seconds({}))
        s.cli(str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "on-demand")
        s.worker.start()
        yield s
    finally:
        if "s" in locals():
            s.worker.stop()
        if "compose_stack" in locals():
            compose_stack.run("down", "--volumes", timeout=300)
        print("\n" + matrix_table())


# ------------------------------------------------------------------ one cell


def _flow_run(s: FaultStack, run_id: str) -> dict:
    status, run = prefect_api.request(f"{s.prefect}/flow_runs/{run_id}", headers=s.auth)
    assert status == 200, status
    return run


def _wait_final(s: FaultStack, run_id: str, seconds: float = 900) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            run = _flow_run(s, run_id)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
        except (OSError, AssertionError):  # the Prefect server is restarting
            pass
        assert time.monotonic() < deadline, f"flow run {run_id} not final after {seconds:.0f} s:\n{_logs(s, run_id)}"
        time.sleep(2)


def _logs(s: FaultStack, run_id: str, level: int = 30) -> str:
    status, logs = prefect_api.request(f"{s.prefect}/logs/filter", headers=s.auth, data={
        "logs": {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": level}}, "limit": 200, "sort": "TIMESTAMP_ASC"})
    return "\n".join(entry["message"][-2000:] for entry in logs or [])


def _running_task(s: FaultStack, run_id: str) -> str:
    status, tasks = prefect_api.request(f"{s.prefect}/task_runs/filter", headers=s.auth, data={
        "flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}})
    assert status == 200, status
    return ",".join(t["name"] for t in tasks)


def _wait_marker(pause: Path, marker: str, s: FaultStack, run_id: str, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not (pause / f"{marker}.reached").exists():
        state = _flow_run(s, run_id)["state"]["type"]
        assert state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), f"the run ended {state} before {marker}:\n{_logs(s, run_id)}"
        assert time.monotonic() < deadline, f"{marker} not reached in {seconds:.0f} s:\n{_logs(s, run_id)}"
        time.sleep(0.5)


def _fill(mount: Path) -> Path:
    """Fill the mount's filesystem to the last block (what a disk filling up leaves)."""
    filler = mount / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: each write fails at once, closing flushes nothing
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def _checkpoint_loadable(checkpoint: Path) -> None:
    """A complete checkpoint: its trainer state parses and its adapter weights read."""
    from safetensors import safe_open

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == int(checkpoint.name.split("-")[1])
    weights = next(checkpoint.rglob("adapter_model.safetensors"))
    with safe_open(str(weights), framework="pt") as handle:
        assert [handle.get_tensor(k).shape for k in handle.keys()]


def run_cell(s: FaultStack, name: str, tmp_path: Path, promote: bool = False) -> dict:
    cell = EXPECTED[name]
    s.wait_ready()
    pause = tmp_path / "pause"
    pause.mkdir()
    job_env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "olora", "OLORA_PAUSE_AT": cell.marker, "OLORA_PAUSE_DIR": str(pause)}
    mount = None
    if cell.fault == "fill":  # the run's workspace on a small filesystem of its own
        mount = tmp_path / "small-disk"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
        job_env["OLORA_RUNS_DIR"] = str(mount)
    start = time.monotonic()
    out = s.cli(str(BIN / "prefect"), "deployment", "run", "olora-pipeline/on-demand", "--param", 'overrides={"adapter.r": 2}',
                "--param", f"promote={str(promote).lower()}", "--job-variable", "env=" + json.dumps(job_env)).stdout
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    try:
        _wait_marker(pause, cell.marker, s, run_id)
        reached = time.monotonic() - start
        running = _running_task(s, run_id)
        assert running.startswith(cell.stage), f"at {cell.marker} the running task is {running!r}, not {cell.stage}"
        fault_start = time.monotonic()
        filler = None
        if cell.fault == "stop":
            s.stop(cell.service)
        elif cell.fault == "restart":
            s.restart(cell.service)
        elif cell.fault == "sigkill":
            s.worker.kill()  # the worker and the flow-run process under it, as a lost machine
        elif cell.fault == "fill":
            filler = _fill(mount)
        (pause / cell.marker).touch()  # the run goes on into the fault (a rerun passes the marker too)
        if cell.fault == "stop":
            time.sleep(max(0.0, OUTAGE - (time.monotonic() - fault_start)))
            s.start(cell.service)
        elif cell.fault == "sigkill":
            s.worker.start()  # a replacement worker (the dead one's run is not resumed by itself)
        first = _wait_final(s, run_id)
        outcome = {"first": first["state"]["type"], "message": first["state"].get("message") or ""}
        if first["state"]["type"] != "COMPLETED":
            outcome["logs"] = _logs(s, run_id)
            if cell.fault == "fill":
                checkpoints = sorted((mount / next(p.name for p in mount.iterdir() if p.is_dir())).rglob("checkpoint-*"))
                assert checkpoints, "no checkpoint left in the workspace"
                _checkpoint_loadable(next(c for c in checkpoints if c.name == "checkpoint-2"))  # the previous one
                filler.unlink()  # the disk has room again
            s.cli(str(BIN / "prefect"), "flow-run", "retry", run_id)
            second = _wait_final(s, run_id)
            assert second["state"]["type"] == "COMPLETED", f"the rerun ended {second['state']}:\n{_logs(s, run_id)}"
            found = outcome["message"] + "\n" + outcome["logs"]
            detail = cell.expected.split(": ", 1)[1].split(";")[0] if cell.expected.startswith("fails") else ""
            outcome["measured"] = (f"fails: {detail}; rerun completes" if detail and detail in found
                                   else f"fails ({first['state']['type']}: {outcome['message'][:200]}); rerun completes")
        else:
            outcome["measured"] = "completes"
        outcome["seconds"] = round(time.monotonic() - start, 1)
        outcome["reached"] = round(reached, 1)
        run = _flow_run(s, run_id)
        outcome["name"] = f"{run['name']}-{run['id'][:8]}"
        MEASURED[name] = {**outcome, "expected": cell.expected, "cell": cell}
        return outcome
    finally:
        (pause / cell.marker).touch()
        if mount is not None:
            subprocess.run(["umount", "-l", str(mount)], check=False)


# ------------------------------------------------------------------ the integrity checks after each cell


def check_integrity(s: FaultStack, run_name: str) -> None:
    """`olora doctor` finds nothing broken; the run's own record is whole: its runs/* branch in the git remote, its
    registered version tagged with that branch, holding its model files and their checksums."""
    from mlflow import MlflowClient

    doctor = s.cli(str(BIN / "olora"), "doctor", "--no-load", check=False, timeout=600)  # the champion loads: the last test
    assert doctor.returncode == 0, f"olora doctor:\n{doctor.stdout[-3000:]}\n{doctor.stderr[-3000:]}"
    branch = f"runs/{run_name}"
    registration = json.loads(subprocess.run(["git", "show", f"{branch}:reports/registration.json"], cwd=s.remote,
                                             capture_output=True, text=True, check=True).stdout)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ[key] = s.env[key]
    c = MlflowClient(s.env["MLFLOW_TRACKING_URI"], registry_uri=s.env["MLFLOW_TRACKING_URI"])
    versions = c.search_model_versions(f"name='{registration['name']}' and run_id='{registration['run_id']}'")
    assert [v.version for v in versions] == [registration["version"]]
    assert versions[0].tags.get("olora.git_branch") == branch
    files = {f.path for f in c.list_artifacts(registration["run_id"], "model/artifacts/adapter")}
    assert "model/artifacts/adapter/adapter_model.safetensors" in files, files


def matrix_table() -> str:
    lines = ["| fault | stage (marker) | expected | measured | seconds (marker reached) |", "|---|---|---|---|---|"]
    for name, m in MEASURED.items():
        cell = m["cell"]
        what = {"stop": f"{cell.service} stopped {OUTAGE:.0f} s", "restart": f"{cell.service} restarted",
                "sigkill": "worker SIGKILLed", "fill": "workspace disk full"}[cell.fault]
        lines.append(f"| {what} | {cell.stage} (`{cell.marker}`) | {m['expected']} | {m['measured']} | {m['seconds']} ({m['reached']}) |")
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fault_cell(fault_stack, name, tmp_path):
    outcome = run_cell(fault_stack, name, tmp_path, promote=name == next(iter(EXPECTED)))
    print(f"\n{name}: {json.dumps({k: v for k, v in outcome.items() if k != 'logs'})[:1500]}")
    assert outcome["measured"] == EXPECTED[name].expected, f"{name}: {outcome['message']}\n{outcome.get('logs', '')[-4000:]}"
    check_integrity(fault_stack, outcome["name"])
    if EXPECTED[name].stage == "train" and EXPECTED[name].expected != "completes":  # the rerun resumed from a checkpoint
        train = subprocess.run(["git", "show", f"runs/{outcome['name']}:metrics/train.json"], cwd=fault_stack.remote,
                               capture_output=True, text=True, check=True).stdout
        assert json.loads(train)["resumed"] is True, train


def test_after_the_matrix_every_record_is_whole_and_the_champion_loads(fault_stack):
    """`olora doctor` once more, the champion downloaded and loaded as `olora serve` would (once: it takes a minute here)."""
    doctor = fault_stack.cli(str(BIN / "olora"), "doctor", check=False, timeout=600)
    assert doctor.returncode == 0 and "OK: checked" in doctor.stdout, f"{doctor.stdout[-3000:]}\n{doctor.stderr[-3000:]}"
    assert f"{len(MEASURED)} recorded run(s)" in doctor.stdout, doctor.stdout  # one per cell run (`-k` may select some)
