"""The one way the project drives DVC: its CLI in a subprocess, run in the project's folder.

DVC's Python API assumes the process's working directory is the repository; the CLI with `cwd=`
works from anywhere (flows, experiments, benchmarks, tests), and its errors come back whole.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from olora.layout import DVC_LOCK


class DvcError(RuntimeError):
    """A dvc command failed; the message holds the command, the folder and DVC's own output.

    Not an OloraError: the flows retry it (a remote or lock may be transiently unavailable)."""


class DvcLockError(DvcError):
    """Another DVC process holds the workspace's lock (transient: it ends)."""


def executable() -> str:
    """`dvc` next to this interpreter first (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def env() -> dict[str, str]:
    """The environment for DVC and the `olora` commands it runs: this interpreter's bin first, quiet."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}


def run(root: Path, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `dvc ARGS` in `root`; raise DvcError (with DVC's output) when it fails and `check` is set."""
    out = subprocess.run([executable(), *args], cwd=root, capture_output=True, text=True, env=env(), timeout=timeout)
    if check and out.returncode != 0 and ("Unable to acquire lock" in out.stderr or "it is being blocked by" in out.stderr):
        lock = "rwlock" if "it is being blocked by" in out.stderr else "lock"
        raise DvcLockError(
            f"`dvc {' '.join(args)}` found the DVC lock {Path(root).resolve() / '.dvc' / 'tmp' / lock} held: another "
            "DVC process (a `dvc repro`, `dvc exp run` or a flow's DVC step) is working in this workspace. Wait for "
            f"it to finish (the flows retry this) or run in a separate clone. DVC said: {out.stderr.strip()[-600:]}"
        )
    if check and out.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def up_to_date(root: Path, stage: str) -> bool:
    """Whether DVC considers `stage` (and what it depends on) unchanged since dvc.lock was written."""
    return not json.loads(run(root, "status", stage, "--json").stdout or "{}")


def commit(root: Path, stage: str) -> None:
    """Record a stage's current deps and outputs in dvc.lock (after the stage ran outside `dvc repro`)."""
    run(root, "commit", "--force", stage)


def out_hash(root: Path, stage: str, path: str) -> str:
    """The hash dvc.lock records for one output of a stage ('' when the stage has not run under DVC)."""
    import yaml

    lock = Path(root) / DVC_LOCK
    if not lock.is_file():
        return ""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return str(out.get("md5", ""))
    return ""
