"""One stage at a time per workspace: an advisory lock the kernel releases when its holder dies.

`dvc repro` holds DVC's own lock (`.dvc/tmp/lock`) for a whole run, but a Prefect flow calls the
stage functions in its own process and `olora <stage>` can be run by hand: this lock makes any two
of them in the same folder exclusive. The second gets an error naming the holder (its stage, PID
and start time) and the lock file, before it reads or writes anything. A SIGKILLed holder leaves
no stale lock (flock is released with the process), so a crash never blocks the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from olora.errors import OloraError

LOCK_FILE = ".olora/stage.lock"


class WorkspaceBusyError(OloraError):
    """Another stage holds this workspace's lock."""


def _distributed_child() -> bool:
    # ranks started by torchrun for a stage whose launching process already holds the lock
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def stage_lock(root: Path, stage: str) -> Iterator[None]:
    """Hold the workspace's stage lock while a stage runs; refuse at once when another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: DVC's lock still guards `dvc repro`
        yield
        return
    if _distributed_child():
        yield
        return
    path = Path(root).resolve() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0))) if holder else "?"
            raise WorkspaceBusyError(
                f"the workspace {Path(root).resolve()} is busy: stage {holder.get('stage', '?')!r} (PID "
                f"{holder.get('pid', '?')}, started {since}) holds the lock {path}. Wait for it to finish, or run "
                "the other pipeline in its own clone; the lock is released when that process ends, even if it is killed"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"stage": stage, "pid": os.getpid(), "since": time.time()}))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the flock
