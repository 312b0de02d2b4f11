"""Lineage recorded on every run: the git commit, DVC's hashes of the stage outputs, library versions, and the
record of an isolated flow run (`RunRecord`: its tags, named here once)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

PACKAGES = ["torch", "transformers", "peft", "accelerate", "datasets", "lm_eval", "mlflow", "dvc"]


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class RunRecord:
    """A recorded (isolated) flow run: the tags its MLflow run and registered version carry, which `olora restore`,
    `olora doctor`, the sweep table and the flows read back. Each field's tag is `TAGS[field]`."""

    git_branch: str
    """The runs/* branch the run was committed on."""
    git_commit: str
    """That commit."""
    run_name: str | None = None
    git_remote: str | None = None
    """The git remote the branch was pushed to."""
    source_commit: str | None = None
    """The commit the run started from."""
    dvc_pushed: bool | None = None
    """Whether its data and adapters were pushed to the DVC remote."""
    data_version: str | None = None
    """The data version it trained on (data/raw's content ids at the source commit)."""
    data_commit: str | None = None
    data_hash: str | None = None
    """DVC's hash of the prepared data."""

    def to_tags(self) -> dict[str, str]:
        """The tags, in field order (fields that are None left out)."""
        out = {}
        for field in TAG_ORDER:
            value = getattr(self, field)
            if value is not None:
                out[TAGS[field]] = str(value).lower() if isinstance(value, bool) else value
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> RunRecord | None:
        """The record in a run's or version's tags; None where it carries no branch and commit (not a recorded run)."""
        if not tags.get(TAGS["git_branch"]) or not tags.get(TAGS["git_commit"]):
            return None
        values = {f.name: tags.get(TAGS[f.name]) for f in fields(cls)}
        pushed = values["dvc_pushed"]
        return cls(**{**values, "dvc_pushed": None if pushed is None else pushed == "true"})


TAGS = {"run_name": "olora.run_name", "git_branch": "olora.git_branch", "git_commit": "olora.git_commit",
        "git_remote": "olora.git_remote", "source_commit": "olora.source_commit", "dvc_pushed": "olora.dvc_pushed",
        "data_version": "olora.data_version", "data_commit": "olora.data_commit", "data_hash": "dvc.data_hash"}
TAG_ORDER = ("run_name", "git_branch", "git_commit", "git_remote", "source_commit", "dvc_pushed", "data_version",
             "data_commit", "data_hash")
"""The order the tags have always been written in (and the flow's result lists them in)."""
