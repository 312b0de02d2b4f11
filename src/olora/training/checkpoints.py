"""Checkpoints and resume: a checkpoint is resumed only by the exact run that wrote it.

The run's fingerprint covers its training settings, data and initial adapter; a checkpoint folder
whose fingerprint differs is removed, a half-written checkpoint (no `trainer_state.json`, which
the Trainer writes last) is dropped, and the MLflow run id stored beside the checkpoints lets a
resumed run continue the run it started.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from olora.config import Config
from olora.errors import ConfigError
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


def complete(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints the Trainer finished writing, in step order."""
    done = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


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
        if partial.is_dir() and not (partial / "trainer_state.json").is_file():
            shutil.rmtree(partial)
    write_json(marker, {"fingerprint": fingerprint, "processes": processes, "mlflow_run_id": run_id})
    return bool(complete(checkpoint_dir))


def remove(checkpoint_dir: Path) -> None:
    """Once the outputs, metrics and MLflow run are complete: the checkpoints have served, and a finished
    run must never pass for an interrupted one."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
