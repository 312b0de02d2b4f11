"""`olora publish-data`: put a new data file in the team's remotes and announce it, in one command.

In order, so that nobody ever sees a half-published version: `dvc add` the file under data/raw/,
`dvc push` its content to the DVC remote, commit the `.dvc` pointer (and DVC's .gitignore entry)
alone, `git push` the branch, then send the `olora.data.published` event for that commit. Each
step that fails stops with a message naming the step, the file and the remote; nothing before it
is undone (a pushed content is harmless, a local commit can be pushed later and the watcher will
announce it).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from olora import dvc
from olora.errors import OloraError
from olora.layout import DATA_INPUTS
from olora.orchestration import durable, events, workspace
from olora.data.versions import data_version, remote_url

log = logging.getLogger("olora")


class PublishError(OloraError):
    """A publish step failed; the message names the step, the file and the remote."""


@dataclass(frozen=True)
class Published:
    path: str
    commit: str
    branch: str
    git_remote: str
    dvc_remote: str
    data_version: str
    event_sent: bool


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise PublishError(f"`git {' '.join(args)}` failed in {root}: {out.stderr.strip()[-800:]}")
    return out


def _check(root: Path, path: str) -> tuple[Path, str, str]:
    """(the file, its path in the project, the branch) after every check that needs no change."""
    if _git(root, "rev-parse", "--is-inside-work-tree", check=False).returncode != 0:
        raise PublishError(f"{root} is not a git checkout; publish-data commits and pushes the data's .dvc pointer")
    file = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    raw = (root / DATA_INPUTS).resolve()
    if not file.is_relative_to(raw):
        raise PublishError(f"{path} is not under {DATA_INPUTS}/, the folder prepare reads; copy it there "
                           f"({DATA_INPUTS}/{Path(path).name}) and publish that")
    if file.suffix == ".dvc" or not file.exists():
        raise PublishError(f"{path}: no such data file (give the data file itself, not its .dvc pointer)")
    branch = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False).stdout.strip()
    if not branch:
        raise PublishError(f"{root} is on a detached HEAD; check out the branch to publish on (e.g. `git switch main`)")
    if _git(root, "remote", "get-url", "origin", check=False).returncode != 0:
        raise PublishError(f"{root} has no git remote `origin`; add the team's remote (`git remote add origin <url>`)")
    if not (workspace.has_dvc_remote(root) or workspace.add_team_remote(root)):
        raise PublishError("no DVC remote is configured: add one (`dvc remote add -d team <url>`) or set "
                           "OLORA_DVC_REMOTE_URL (stack.env does)")
    return file, str(file.relative_to(root.resolve())), branch


def publish_data(root: Path, path: str, message: str | None = None, event: bool = True) -> Published:
    """Add, push, commit, push and announce one data file (see the module docstring for the order)."""
    root = Path(root).resolve()
    file, rel, branch = _check(root, path)
    before = data_version(root, "HEAD").hash
    dvc.run(root, "add", "--quiet", rel)
    pointer = rel + ".dvc"
    target = remote_url(root)
    pushed = dvc.run(root, "push", pointer, check=False)
    if pushed.returncode != 0:
        raise PublishError(f"`dvc push {pointer}` to the DVC remote {target} failed, so nothing was committed: "
                           f"{(pushed.stderr or pushed.stdout).strip()[-800:]}")
    ignore = str(Path(rel).parent / ".gitignore")
    _git(root, "add", "--", pointer, *([ignore] if (root / ignore).is_file() else []))
    if _git(root, "diff", "--cached", "--quiet", check=False).returncode == 0:
        raise PublishError(f"{rel} is already published as it is (its .dvc pointer is unchanged at HEAD); nothing to do")
    _git(root, "commit", "--quiet", "-m", message or f"data: {rel}", "--", pointer,
         *([ignore] if (root / ignore).is_file() else []))
    commit = _git(root, "rev-parse", "HEAD").stdout.strip()
    remote = _git(root, "remote", "get-url", "origin").stdout.strip()
    out = _git(root, "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", check=False)
    if out.returncode != 0:
        raise PublishError(f"`git push origin {branch}` to {remote} failed: {out.stderr.strip()[-800:]}. The data is in "
                           f"the DVC remote and committed here ({commit[:12]}); push the branch when the remote is "
                           "reachable, and the data watcher will announce it")
    version = data_version(root, commit)
    sent = False
    if event and version.hash != before:
        try:
            if version.hash not in (events.seen_versions(remote, branch) or set()):
                events.emit(events.data_event(version, commit, branch, remote, by="olora publish-data"))
                events.mark_seen(remote, branch, [version.hash])
                sent = True
        except events.EventError as exc:
            raise PublishError(f"{rel} is published (commit {commit[:12]} pushed to {remote}, content in {target}) but "
                               f"the event could not be sent: {exc}. The data watcher deployment announces it on its "
                               "next run") from exc
    log.info("published %s: commit %s on %s (%s), data version %s, event %s", rel, commit[:12], branch, remote,
             version.short, "sent" if sent else "not sent")
    return Published(rel, commit, branch, remote, target, version.hash, sent)


def _deepen(source: Path, depth: int) -> None:
    """A clone made by Prefect's git_clone step holds one commit: fetch the history the watcher compares."""
    if _git(source, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        _git(source, "fetch", "--quiet", f"--deepen={depth}", "origin")


def announce_new_versions(source: Path, ref: str = "HEAD", depth: int = 100) -> list[dict]:
    """The data watcher: one `olora.data.published` event per data version on `ref` not announced before.

    Reads the branch's first-parent history (`depth` commits), skips code-only commits (same data
    version), checks that each new version's content is in the DVC remote (a version pushed to git
    before its `dvc push` is not announced yet, and is looked at again next time), and announces the
    rest, oldest first. The first run on a server records what the branch holds and announces nothing.
    """
    import shutil
    import tempfile

    from olora.data.versions import new_versions, unpublished

    source = Path(source).resolve()
    # in a deployment's temporary clone, a remote inside it holds nothing pushed from elsewhere: every version would
    # look unpublished forever; it reads the remote as a run pushes to it, so one outside the clone is required
    durable.check(source, None, durable.run_folders(source, None), push=True, what="the data watcher")
    _deepen(source, depth)
    branch = _git(source, "rev-parse", "--abbrev-ref", ref).stdout.strip()
    remote = _git(source, "remote", "get-url", "origin", check=False).stdout.strip() or str(source)
    seen = events.seen_versions(remote, branch)
    if seen is None:
        baseline = [version.hash for _, version in new_versions(source, ref, set(), depth)]
        events.mark_seen(remote, branch, baseline)
        log.info("data watcher: first run for %s (%s), %d data version(s) recorded as known; nothing announced",
                 remote, branch, len(baseline))
        return []
    results = []
    for commit, version in new_versions(source, ref, seen, depth):
        folder = Path(tempfile.mkdtemp(prefix="olora-watch-"))
        try:
            _git(folder, "clone", "--quiet", "--no-checkout", "--shared", str(source), "repo")
            checkout = folder / "repo"
            _git(checkout, "checkout", "--quiet", "--detach", commit)
            local = source / ".dvc" / "config.local"
            if local.is_file():
                shutil.copy(local, checkout / ".dvc" / "config.local")
            workspace.pin_remote(source, checkout)
            if not (workspace.has_dvc_remote(checkout) or workspace.add_team_remote(checkout)):
                raise PublishError("no DVC remote to check the data against: commit one in .dvc/config or set "
                                   "OLORA_DVC_REMOTE_URL (stack.env does)")
            missing, target = unpublished(checkout), remote_url(checkout)
            source_file = version.source
            if source_file.startswith(DATA_INPUTS + "/") and not any(
                    p in version.inputs for p in (source_file, source_file + ".dvc")):  # params point at absent data
                missing[source_file] = "not in the commit"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = {"commit": commit, "data_version": version.hash, "announced": not missing}
        if missing:
            log.warning("data watcher: commit %s changes the data but the DVC remote %s lacks %s; not announced (run "
                        "`dvc push` where it was added; it is looked at again next time)", commit[:12], target, sorted(missing))
            results.append({**row, "missing": sorted(missing), "dvc_remote": target})
            continue
        events.emit(events.data_event(version, commit, branch, remote, by="olora data watcher"))
        events.mark_seen(remote, branch, [version.hash])
        log.info("data watcher: announced data version %s (commit %s)", version.short, commit[:12])
        results.append(row)
    return results
