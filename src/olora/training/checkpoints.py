"""Checkpoints and resume: a checkpoint is resumed only by the exact run that wrote it.

The run's fingerprint covers its training settings, data and initial adapter; a checkpoint folder
whose fingerprint differs is removed, a half-written checkpoint (no readable `trainer_state.json`, which
the Trainer writes last: a full disk can leave it truncated) is dropped, and the MLflow run id stored beside the checkpoints lets a
resumed run continue the run it started.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

from olora.config import Config
from olora.errors import ConfigError, OloraError
from olora.io import read_json, write_json

FINGERPRINT = "fingerprint.json"


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(cfg: Config, data_dir: Path, init_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training settings, data and initial adapter.

    The process count is not part of it: checkpoints of the same run under another count are
    refused by name (`prepare`) rather than silently thrown away.
    """
    train = {k: v for k, v in cfg.to_dict()["train"].items() if k != "processes"}
    payload = {
        "model": [cfg.model.name, cfg.model.dtype],
        "data.max_seq_length": cfg.data.max_seq_length,
        "adapter": cfg.to_dict()["adapter"],
        "train": train,
        "data": _file_digest(list(Path(data_dir).glob("*.jsonl"))),
        "init": _file_digest([p for p in Path(init_dir).iterdir() if p.is_file()]),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _state_readable(checkpoint: Path) -> bool:
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def complete(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints the Trainer finished writing, in step order."""
    done = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if p.is_dir() and _state_readable(p)]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def disk_full(checkpoint_dir: Path, exc: BaseException) -> OloraError | None:
    """A training failure for want of disk space (torch and safetensors word it their own ways) as an error naming the
    folder, what is kept and the fix; None for any other failure."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(checkpoint_dir).free
    except OSError:
        return None
    if not any(getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) for e in chain) and free >= 1 << 20:
        return None
    kept = complete(checkpoint_dir)
    resume = (f"the last complete checkpoint, {kept[-1].name}, is kept: rerun the stage (or the flow run) to resume from it"
              if kept else "no complete checkpoint was written: a rerun starts over")
    return OloraError(f"No space left on device while training into {checkpoint_dir} ({free / 2**20:.1f} MiB free; "
                      f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); free "
                      f"space there or put the run's workspace on a larger disk (OLORA_RUNS_DIR); {resume}")


def finished(checkpoint_dir: Path) -> Path | None:
    """The latest complete checkpoint when it already holds the run's last step, else None."""
    done = complete(checkpoint_dir)
    if not done:
        return None
    state = read_json(done[-1] / "trainer_state.json")
    return done[-1] if state.get("max_steps") and state["global_step"] >= state["max_steps"] else None


def resumable_run_id(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """The MLflow run of an interrupted run these checkpoints can resume (so a resume continues that run)."""
    marker = Path(checkpoint_dir) / FINGERPRINT
    if not marker.is_file() or not complete(checkpoint_dir):
        return None
    recorded = read_json(marker)
    return recorded.get("mlflow_run_id") if recorded.get("fingerprint") == fingerprint else None


def prepare(checkpoint_dir: Path, fingerprint: str, processes: int = 1, run_id: str | None = None) -> bool:
    """Keep checkpoints only when they belong to this exact run; return whether one can be resumed.

    A checkpoint a killed process left half-written is removed, so the resume starts from the last
    complete one. Checkpoints of this run written under another process count are refused: the data
    order would not line up.
    """
    checkpoint_dir = Path(checkpoint_dir)
    marker = checkpoint_dir / FINGERPRINT
    if checkpoint_dir.exists():
        recorded = read_json(marker) if marker.is_file() else {}
        if recorded.get("fingerprint") != fingerprint:
            shutil.rmtree(checkpoint_dir)
        elif recorded.get("processes", 1) != processes and complete(checkpoint_dir):
            raise ConfigError(
                f"{checkpoint_dir} holds this run interrupted under train.processes={recorded.get('processes', 1)}; "
                f"resume it with that count, or delete {checkpoint_dir} to start over with train.processes={processes}"
            )
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for partial in checkpoint_dir.glob("checkpoint-*"):
        if partial.is_dir() and not _state_readable(partial):
            shutil.rmtree(partial)
    write_json(marker, {"fingerprint": fingerprint, "processes": processes, "mlflow_run_id": run_id})
    return bool(complete(checkpoint_dir))


def remove(checkpoint_dir: Path) -> None:
    """Once the outputs, metrics and MLflow run are complete: the checkpoints have served, and a finished
    run must never pass for an interrupted one."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
