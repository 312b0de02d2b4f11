"""Isolated run workspaces, recorded as git commits on a runs branch, their data in the DVC remote.

A scheduled or on-demand run never works in the checkout that deployed it: `create` clones that
checkout's commit into a folder of its own (git objects hard-linked, DVC cache shared with the
source, so nothing is copied twice), brings over its git-ignored DVC remote settings
(`.dvc/config.local`; on a worker that has none, the remote at $OLORA_DVC_REMOTE_URL (as stack.env names it), with
$AWS_ENDPOINT_URL for an S3-compatible store: `add_team_remote`), and checks out whatever outputs the shared cache already holds, so DVC
skips the stages that are up to date. Overrides are written to that workspace's params.yaml only.

`record` ends a run as git-recorded state: a commit of params.yaml, dvc.lock, metrics, plots and
reports on the branch `runs/<name>`, pushed to the git remote (`origin`, when the source has one,
else the source repository itself), after `dvc push` has put the data and adapters in the DVC
remote. `restore` is the way back: in any clone, fetch that ref, check its commit out and `dvc
pull`, and the exact params, data and adapter are there again.

A failed run's workspace is kept (its outputs and checkpoints intact) and its path logged, so the
run can be resumed or re-pushed; a recorded one is removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from olora import dvc
from olora.errors import OloraError
from olora.faults import marker
from olora.layout import DVC_LOCK, PARAMS

log = logging.getLogger("olora")
RUNS_BRANCH = "runs"  # recorded runs are branches runs/<name>
RECORDED = (PARAMS, DVC_LOCK, "metrics", "plots", "reports")  # what git holds of a run (DVC holds the rest)


class WorkspaceError(OloraError):
    """A workspace could not be created or recorded (git or DVC refused); the message names the step."""


class GitPushError(WorkspaceError):
    """The git remote refused or could not be reached when pushing a run's record (transient: the flows retry it)."""


@dataclass(frozen=True)
class GitRecord:
    """A run committed on its runs/* branch and pushed (`record`): the git side of `olora.tracking.lineage.RunRecord`."""

    name: str
    branch: str
    commit: str
    source_commit: str
    git_remote: str
    dvc_pushed: bool


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise WorkspaceError(f"`git {' '.join(args)}` failed in {root}: {out.stderr.strip()[-1500:]}")
    return out


def runs_dir(root: Path) -> Path:
    """Where workspaces are made: $OLORA_RUNS_DIR, else a git-ignored folder beside the source checkout's files."""
    return Path(os.environ.get("OLORA_RUNS_DIR") or Path(root).resolve() / ".olora" / "runs")


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise WorkspaceError(f"run name {name!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return cleaned


def git_remote(source: Path) -> str:
    """The team's git remote for recorded runs: the source's `origin`, else the source repository itself."""
    out = _git(source, "remote", "get-url", "origin", check=False)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else str(Path(source).resolve())


def dvc_cache(source: Path) -> Path:
    """The DVC cache runs share: $OLORA_DVC_CACHE, else the source checkout's own cache."""
    configured = dvc.run(source, "cache", "dir", check=False).stdout.strip()
    return Path(os.environ.get("OLORA_DVC_CACHE") or configured or Path(source).resolve() / ".dvc" / "cache")


def has_dvc_remote(root: Path) -> bool:
    return bool(dvc.run(root, "remote", "list", check=False).stdout.strip())


def add_team_remote(root: Path) -> bool:
    """For a clone without a DVC remote (a worker's, a fresh one): $OLORA_DVC_REMOTE_URL (stack.env) as its default.

    With $AWS_ENDPOINT_URL for an S3-compatible store; its keys come from the AWS_* variables. Returns whether it added
    one (callers check `has_dvc_remote` first: `has_dvc_remote(root) or add_team_remote(root)`).
    """
    team_remote = os.environ.get("OLORA_DVC_REMOTE_URL")
    if not team_remote:
        return False
    name = os.environ.get("OLORA_DVC_REMOTE") or "team"
    dvc.run(root, "remote", "add", "--local", "--default", "--force", name, team_remote)
    if os.environ.get("AWS_ENDPOINT_URL"):
        dvc.run(root, "remote", "modify", "--local", name, "endpointurl", os.environ["AWS_ENDPOINT_URL"])
    return True


def pin_remote(source: Path, target: Path) -> None:
    """A relative DVC remote (`url = ../.dvc-remote`) resolves against each checkout's own folder: make `target`'s
    (a workspace or a clone, removed later) the folder it names in `source`, so what is pushed there outlives it."""
    texts = [p.read_text() for p in (Path(source) / ".dvc" / "config", Path(source) / ".dvc" / "config.local") if p.is_file()]
    if not any(re.search(r"^\s*url\s*=\s*(?![/~])(?!\S*://)\S", t, flags=re.M) for t in texts):
        return  # every remote is absolute or a server: nothing resolves differently there
    name = dvc.run(source, "remote", "default", check=False).stdout.strip()
    url = dvc.run(source, "config", f"remote.{name}.url", check=False).stdout.strip() if name else ""
    if url and "://" not in url and Path(url).is_absolute() and \
            dvc.run(target, "config", f"remote.{name}.url", check=False).stdout.strip() != url:
        dvc.run(target, "remote", "modify", "--local", name, "url", url)
        log.info("DVC remote %r of %s: %s (as %s resolves it)", name, target, url, source)


def create(source: Path, name: str, commit: str | None = None) -> Path:
    """Clone the source checkout's commit (or `commit`, fetched from the team's remote when the source lacks it)
    into runs_dir/<name>, sharing its DVC cache; returns the workspace.

    The data the commit tracks must be in the DVC remote (or the shared cache): a data input that
    cannot be brought is an error naming the file and the remote, before any stage runs.
    """
    source = Path(source).resolve()
    if _git(source, "rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        raise WorkspaceError(f"{source} is not a git checkout; isolated runs clone the deployment's commit (git init and commit first)")
    requested = commit
    commit = commit or _git(source, "rev-parse", "HEAD").stdout.strip()
    target = runs_dir(source) / safe_name(name)
    if target.exists():
        raise WorkspaceError(f"the workspace {target} already exists: a run of that name is in progress or failed there; "
                             "resume it with `olora run --resume` in that folder, or choose another run name")
    target.parent.mkdir(parents=True, exist_ok=True)
    _git(target.parent, "clone", "--quiet", "--no-checkout", str(source), str(target))
    remote = git_remote(source)
    _git(target, "remote", "set-url", "origin", remote)
    if _git(target, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
        fetched = _git(target, "fetch", "--quiet", "origin", commit, check=False)  # a shallow worker clone lacks older commits
        if fetched.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise WorkspaceError(f"commit {commit} is neither in {source} nor fetchable from {remote}: "
                                 f"{fetched.stderr.strip()[-600:]}; check the commit id and that it was pushed")
    _git(target, "checkout", "--quiet", "--detach", commit)
    local = source / ".dvc" / "config.local"  # DVC remote credentials and settings that git does not hold
    if local.is_file():
        shutil.copy(local, target / ".dvc" / "config.local")
    pin_remote(source, target)
    remote = has_dvc_remote(target) or add_team_remote(target)
    dvc.run(target, "cache", "dir", "--local", str(dvc_cache(source)))
    # outputs of earlier runs that the shared cache holds, so DVC skips what is up to date
    if remote:
        dvc.run(target, "pull", "--allow-missing", check=False)
    else:
        dvc.run(target, "checkout", "--allow-missing", check=False)
    absent = [path for path in tracked_inputs(target) if not (target / path).exists()]
    if absent:
        from olora.data.versions import remote_url

        where = remote_url(target) if remote else "(none configured)"
        shutil.rmtree(target, ignore_errors=True)  # a retry starts afresh (the content may have been pushed since)
        raise WorkspaceError(
            f"the data of commit {commit[:12]} is not available: {', '.join(absent)} "
            f"{'is' if len(absent) == 1 else 'are'} missing from the DVC remote {where}"
            f" and the shared cache; run `dvc push` where the data was added (or publish with `olora publish-data`), "
            f"then rerun. Nothing was trained"
        )
    log.info("workspace %s: commit %s of %s%s", target, commit[:12], source, " (requested)" if requested else "")
    return target


def tracked_inputs(root: Path) -> list[str]:
    """The data files (or folders) under data/raw/ that DVC tracks in `root`'s checkout, project-relative."""
    import yaml

    from olora.layout import DATA_INPUTS

    found = []
    for pointer in sorted((Path(root) / DATA_INPUTS).rglob("*.dvc")):
        for out in (yaml.safe_load(pointer.read_text()) or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("path"):
                found.append(str((pointer.parent / out["path"]).relative_to(root)))
    return found


def record(workspace: Path, name: str, message: str, push: bool = True) -> GitRecord:
    """Commit the run's params, lock, metrics and reports on runs/<name>; push its data (DVC, when `push`) and the branch (git).

    The branch is always pushed (it is the run's record); `push=False` only skips `dvc push`, for a
    machine without a DVC remote (the outputs then stay in the shared DVC cache only).
    """
    workspace = Path(workspace)
    branch = f"{RUNS_BRANCH}/{safe_name(name)}"
    # a retried record (its git push failed): the run's commit exists, on top of the source's commit
    already = _git(workspace, "symbolic-ref", "--quiet", "HEAD", check=False).stdout.strip() == f"refs/heads/{branch}" and \
        _git(workspace, "log", "-1", "--format=%s", check=False).stdout.strip() == message.splitlines()[0]
    source_commit = _git(workspace, "rev-parse", "HEAD^" if already else "HEAD").stdout.strip()
    pushed = False
    if push and has_dvc_remote(workspace):
        marker("record:dvc-push")
        dvc.run(workspace, "push")  # the data first: a ref never points at data the remote lacks
        pushed = True
    _git(workspace, "checkout", "--quiet", "-B", branch)
    present = [p for p in RECORDED if (workspace / p).exists()]
    _git(workspace, "add", "--all")  # DVC's .gitignore entries for new outputs, among others
    _git(workspace, "add", "--force", *present)
    if not (already and _git(workspace, "diff", "--cached", "--quiet", check=False).returncode == 0):
        _git(workspace, "-c", "user.name=olora-pipeline", "-c", "user.email=olora-pipeline@localhost",
             "commit", "--quiet", "--allow-empty", "-m", message)  # (a retried record whose push failed commits nothing new)
    commit = _git(workspace, "rev-parse", "HEAD").stdout.strip()
    remote = _git(workspace, "remote", "get-url", "origin").stdout.strip()
    pushed_ref = _git(workspace, "push", "--quiet", "origin", f"{branch}:refs/heads/{branch}", check=False)
    if pushed_ref.returncode != 0:
        raise GitPushError(f"pushing {branch} to the git remote {remote} failed: {pushed_ref.stderr.strip()[-1500:]}. "
                           f"The run is committed in its workspace {workspace} (kept); rerun the flow run, or "
                           f"`git push origin {branch}` there, once the remote is reachable")
    log.info("recorded run %s as %s (%s) in %s", name, branch, commit[:12], remote)
    return GitRecord(name, branch, commit, source_commit, remote, pushed)


def remove(workspace: Path) -> None:
    shutil.rmtree(workspace, ignore_errors=True)


def restore(root: Path, branch: str, commit: str) -> None:
    """In a clone: fetch `branch` from origin, check out `commit` (detached) and pull its data and adapter."""
    root = Path(root)
    _git(root, "fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}")
    _git(root, "checkout", "--quiet", "--detach", commit)
    if not has_dvc_remote(root) and not add_team_remote(root):
        raise WorkspaceError(f"{root} has no DVC remote configured; add the team's remote (`dvc remote add -d ...`), "
                             "or put the stack's stack.env here (it names the remote), to pull the run's data")
    dvc.run(root, "pull")
