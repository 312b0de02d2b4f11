"""Recording a run: a git remote that cannot be reached is a transient, named failure, and the retry records once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import BIN
from olora.orchestration import workspace


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def test_unreachable_git_remote_is_named_kept_and_the_retry_records_once(tmp_path):
    from flows import olora_pipeline as flows

    ws = tmp_path / "ws"
    ws.mkdir()
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"], ["git", "config", "user.name", "t"],
                 [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "source"]):
        subprocess.run(args, cwd=ws, check=True, capture_output=True)
    source = git(ws, "rev-parse", "HEAD")
    (ws / "params.yaml").write_text("adapter:\n  r: 4\n")
    missing = tmp_path / "no-such-remote.git"
    git(ws, "remote", "add", "origin", str(missing))

    with pytest.raises(workspace.GitPushError) as info:
        workspace.record(ws, "nightly-1", "olora run nightly-1", push=False)
    message = str(info.value)
    assert f"pushing runs/nightly-1 to the git remote {missing} failed" in message and f"workspace {ws} (kept)" in message
    assert flows.is_transient(info.value)  # the flow's record_run task retries it
    first = git(ws, "rev-parse", "HEAD")
    assert git(ws, "show", "HEAD:params.yaml") == "adapter:\n  r: 4" and ws.exists()

    subprocess.run(["git", "init", "-q", "--bare", str(missing)], check=True)  # the remote is back
    rec = workspace.record(ws, "nightly-1", "olora run nightly-1", push=False)
    assert rec.commit == first and rec.source_commit == source  # no second commit, the source still known
    assert git(missing, "rev-parse", "refs/heads/runs/nightly-1") == first
