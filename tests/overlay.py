"""The tiny overlay: turns the shipped params.yaml into a seconds-long CPU configuration for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from olora.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(model_dir: Path) -> dict:
    return {
        "model.name": str(model_dir),
        "model.num_threads": 2,
        "data.max_examples": 96,
        "data.max_seq_length": 128,
        "data.validation_fraction": 0.1,
        "adapter.r": 4,
        "adapter.alpha": 8.0,
        "train.max_steps": 6,
        "train.micro_batch_size": 4,
        "train.warmup_steps": 1,
        "train.eval_steps": 3,
        "train.save_steps": 2,
        "train.max_eval_examples": 8,
        "train.learning_rate": 1e-3,
        "eval.limit": 2,
        "eval.batch_size": 8,
    }


def write_params(folder: Path, model_dir: Path, extra: dict | None = None) -> Path:
    """params.yaml for `folder`: the shipped file with the tiny overlay (and `extra`) applied."""
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    values = apply_overrides(values, {**tiny_overrides(model_dir), **(extra or {})})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    load_config(path)  # the overlay itself must be valid
    return path


def copy_project(folder: Path) -> None:
    """The files a user's clone has that the pipeline needs (dvc.yaml, .dvcignore)."""
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, folder / name)
    shutil.copytree(REPO / "src" / "olora", folder / "src" / "olora", ignore=shutil.ignore_patterns("__pycache__"))
