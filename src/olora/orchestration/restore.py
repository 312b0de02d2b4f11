"""`olora restore`: check out the recorded run that produced a registered version (params, data, adapter), here.

The version carries the git branch and commit its run was recorded as (`olora.git_branch`,
`olora.git_commit`); this fetches that ref from `origin`, checks the commit out and pulls its DVC
outputs from the DVC remote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from olora.config import Config
from olora.errors import OloraError
from olora.orchestration import workspace
from olora.tracking.client import Tracking
from olora.tracking.lineage import TAGS, RunRecord
from olora.tracking.names import model_name
from olora.tracking.registry import CHAMPION, find_version, open_model


def restore(cfg: Config, tracking: Tracking, root: Path, name: str | None = None, alias: str | None = CHAMPION,
            version: str | None = None) -> Restored:
    """Restore `version` (else the one `alias` points at) into the checkout at `root`; returns what was restored."""
    name = name or model_name(cfg)
    c = open_model(tracking, name)
    version = find_version(c, name, alias, version)
    record = RunRecord.from_tags(c.get_model_version(name, version).tags)
    if record is None:
        raise OloraError(
            f"{name} version {version} was not registered by a recorded (isolated) run: it has no {TAGS['git_branch']} / "
            f"{TAGS['git_commit']} tags. Runs of the olora-pipeline flow record them; `dvc repro` in a checkout does not"
        )
    workspace.restore(Path(root), record.git_branch, record.git_commit)
    return Restored(name, str(version), record.git_branch, record.git_commit)


@dataclass(frozen=True)
class Restored:
    """What `olora restore` checked out: the version and the recorded run's branch and commit."""

    name: str
    version: str
    branch: str
    commit: str
