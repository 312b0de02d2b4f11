"""Data versions: what a commit's fine-tuning data is, read from git alone, and whether its content is published.

A commit's data version is a hash of `data.source` and of every data input under data/raw/ at that
commit: for a file DVC tracks, the md5 its `.dvc` file records (the content, not the pointer's
text); for a file git holds, its blob id. Two commits with the same data and different code have
the same version, so a code-only push is not new data. Reading it needs no checkout and no data.

`unpublished` asks the DVC remote whether a commit's tracked data is there (`dvc status --cloud`
in a checkout of that commit): a commit whose content is missing from the remote is not a data
version anyone can train on yet.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from olora import dvc
from olora.errors import OloraError
from olora.layout import DATA_INPUTS, PARAMS

IGNORED = ("README.md", ".gitignore")  # under data/raw/: documentation and DVC's own ignore list, not data


class DataVersionError(OloraError):
    """A commit's data cannot be read or is not published (the message names the file and the remote)."""


@dataclass(frozen=True)
class DataVersion:
    hash: str
    """sha256 over data.source and the inputs' content ids (16 hex digits are shown)."""
    source: str
    """data.source at that commit."""
    inputs: dict[str, str] = field(default_factory=dict)
    """data/raw/ path -> md5 (DVC-tracked: the `.dvc` file's path) or `git:<blob id>` (git-tracked)."""

    @property
    def short(self) -> str:
        return self.hash[:16]


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise DataVersionError(f"`git {' '.join(args)}` failed in {root}: {out.stderr.strip()[-800:]}")
    return out.stdout


def _dvc_md5(text: str, path: str) -> str:
    try:
        outs = (yaml.safe_load(text) or {}).get("outs") or []
    except yaml.YAMLError as exc:
        raise DataVersionError(f"{path} is not a readable .dvc file ({exc}); restore it with `dvc add` on its data") from None
    hashes = [str(o.get("md5") or o.get("etag") or "") for o in outs if isinstance(o, dict)]
    if not hashes or not all(hashes):
        raise DataVersionError(f"{path} records no content hash; run `dvc add` on its data again")
    return ",".join(hashes)


def data_version(root: Path, commit: str = "HEAD") -> DataVersion:
    """The data version of `commit` in the git repository at `root` (read from git objects, no checkout)."""
    root = Path(root)
    params = yaml.safe_load(_git(root, "show", f"{commit}:{PARAMS}")) or {}
    source = str((params.get("data") or {}).get("source", ""))
    inputs: dict[str, str] = {}
    for line in _git(root, "ls-tree", "-r", commit, "--", DATA_INPUTS).splitlines():
        meta, path = line.split("\t", 1)
        blob = meta.split()[2]
        if Path(path).name in IGNORED:
            continue
        if path.endswith(".dvc"):
            inputs[path] = _dvc_md5(_git(root, "cat-file", "blob", blob), path)
        else:
            inputs[path] = f"git:{blob}"
    digest = hashlib.sha256(json.dumps({"source": source, "inputs": inputs}, sort_keys=True).encode()).hexdigest()
    return DataVersion(digest, source, inputs)


def new_versions(root: Path, ref: str, seen: set[str], depth: int = 100) -> list[tuple[str, DataVersion]]:
    """(commit, version) for each data version on `ref`'s first-parent history that is not in `seen`.

    One entry per new version: the oldest commit (within `depth`) that carries it, i.e. the commit
    that published it, in history order. Commits that change only code or docs carry their parent's
    version and add nothing.
    """
    commits = _git(Path(root), "rev-list", "--first-parent", "--reverse", f"--max-count={depth}", ref).split()
    found: dict[str, str] = {}
    versions: dict[str, DataVersion] = {}
    for commit in commits:
        version = data_version(root, commit)
        if version.hash not in seen and version.hash not in found:
            found[version.hash], versions[version.hash] = commit, version
    return [(found[h], versions[h]) for h in found]


def unpublished(checkout: Path) -> dict[str, str]:
    """Data inputs of the checked-out commit whose content the default DVC remote lacks: {path: DVC's status}."""
    targets = [str(p.relative_to(checkout)) for p in sorted((Path(checkout) / DATA_INPUTS).rglob("*.dvc"))]
    if not targets:
        return {}
    out = dvc.run(checkout, "status", "--cloud", "--json", *targets, check=False)
    if out.returncode != 0:
        raise DataVersionError(f"`dvc status --cloud` failed in {checkout}: {(out.stderr or out.stdout).strip()[-800:]}")
    text = out.stdout.strip()
    status = json.loads(text[text.index("{"):]) if "{" in text else {}
    # "missing": neither the remote nor this cache has it; "new": only this cache (not pushed)
    return {path: state for path, state in status.items() if state in ("missing", "new")}


def remote_url(checkout: Path) -> str:
    """The default DVC remote's URL in `checkout` (for messages), or a note that there is none."""
    name = dvc.run(checkout, "remote", "default", check=False).stdout.strip()
    if not name:
        return "(no default DVC remote)"
    url = dvc.run(checkout, "config", f"remote.{name}.url", check=False).stdout.strip()
    return f"{name} ({url})" if url else name
