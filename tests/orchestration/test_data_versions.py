"""Data versions read from git, `olora publish-data` against real git and DVC remotes (local folders), the
watcher's choice of what to announce, and a run on a commit whose data the DVC remote lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from olora.data.versions import data_version, new_versions, unpublished
from olora.orchestration import workspace
from olora.orchestration.publish import PublishError, publish_data

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"answer {i}"} for i in range(20)]


def sh(root: Path, *args: str) -> str:
    out = subprocess.run(list(args), cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def dvc(root: Path, *args: str) -> str:
    return sh(root, str(BIN / "dvc"), *args)


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def team(tmp_path) -> tuple[Path, Path, Path]:
    """(a developer's clone, the bare git remote, the DVC remote folder): one published data file on main."""
    remote, storage, clone = tmp_path / "remote.git", tmp_path / "dvc-remote", tmp_path / "dev"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    clone.mkdir()
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@e.com"],
                 ["git", "config", "user.name", "t"], ["git", "remote", "add", "origin", str(remote)]):
        sh(clone, *args)
    dvc(clone, "init", "-q")
    dvc(clone, "remote", "add", "-d", "team", str(storage))
    (clone / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "data/raw/train.jsonl"}}))
    (clone / "data/raw").mkdir(parents=True)
    (clone / "data/raw/README.md").write_text("data files\n")
    write_rows(clone / "data/raw/train.jsonl", ROWS[:10])
    dvc(clone, "add", "-q", "data/raw/train.jsonl")
    dvc(clone, "push", "-q")
    sh(clone, "git", "add", "-A")
    sh(clone, "git", "commit", "-qm", "data v1")
    sh(clone, "git", "push", "-q", "origin", "main")
    return clone, remote, storage


def test_a_data_version_is_the_data_not_the_code(team):
    clone, _, _ = team
    first = data_version(clone)
    assert set(first.inputs) == {"data/raw/train.jsonl.dvc"} and first.source == "data/raw/train.jsonl"
    (clone / "train.py").write_text("print('code')\n")
    (clone / "data/raw/README.md").write_text("data files, described\n")
    sh(clone, "git", "add", "-A")
    sh(clone, "git", "commit", "-qm", "code and docs only")
    assert data_version(clone) == first  # neither code nor data/raw's README is data
    write_rows(clone / "data/raw/train.jsonl", ROWS[:12])
    dvc(clone, "add", "-q", "data/raw/train.jsonl")
    sh(clone, "git", "commit", "-qam", "data v2")
    second = data_version(clone)
    assert second.hash != first.hash
    (clone / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "embedded"}}))
    sh(clone, "git", "commit", "-qam", "another source")
    assert data_version(clone).hash not in (first.hash, second.hash)
    # one entry per new version, at the commit that introduced it, oldest first
    found = new_versions(clone, "HEAD", {first.hash})
    subjects = [sh(clone, "git", "log", "-1", "--format=%s", commit).strip() for commit, _ in found]
    assert subjects == ["data v2", "another source"] and found[0][1] == second
    assert new_versions(clone, "HEAD", {first.hash, second.hash, data_version(clone).hash}) == []


def test_publish_data_pushes_content_then_commit(team, tmp_path):
    clone, remote, _ = team
    write_rows(clone / "data/raw/train.jsonl", ROWS)
    (clone / "notes.txt").write_text("not part of the publish\n")
    done = publish_data(clone, "data/raw/train.jsonl", "more rows", event=False)
    assert not done.event_sent and done.branch == "main" and done.dvc_remote.startswith("team (")
    assert sh(tmp_path, "git", "--git-dir", str(remote), "rev-parse", "main").strip() == done.commit
    changed = sh(clone, "git", "show", "--name-only", "--format=", done.commit).split()
    assert changed == ["data/raw/train.jsonl.dvc"]  # the pointer alone; other edits stay uncommitted
    assert (clone / "notes.txt").is_file() and "notes.txt" in sh(clone, "git", "status", "--porcelain")
    assert done.data_version == data_version(clone, done.commit).hash
    # a fresh clone of the remote finds the content in the DVC remote
    fresh = tmp_path / "fresh"
    sh(tmp_path, "git", "clone", "-q", str(remote), str(fresh))
    assert unpublished(fresh) == {}
    dvc(fresh, "pull", "-q")
    assert (fresh / "data/raw/train.jsonl").read_text() == (clone / "data/raw/train.jsonl").read_text()

    with pytest.raises(PublishError, match="already published as it is"):
        publish_data(clone, "data/raw/train.jsonl", event=False)
    outside = tmp_path / "rows.jsonl"
    write_rows(outside, ROWS)
    with pytest.raises(PublishError, match=r"is not under data/raw/, the folder prepare reads; copy it there"):
        publish_data(clone, str(outside), event=False)
    with pytest.raises(PublishError, match=r"data/raw/nope.jsonl: no such data file"):
        publish_data(clone, "data/raw/nope.jsonl", event=False)


def test_publish_stops_before_committing_when_the_content_cannot_be_pushed(team, monkeypatch):
    clone, _, storage = team
    head = sh(clone, "git", "rev-parse", "HEAD")
    dvc(clone, "remote", "modify", "team", "url", str(storage / "missing" / "deeper"))
    (storage / "missing").write_text("a file where the remote's folder should be\n")  # the push cannot create it
    write_rows(clone / "data/raw/train.jsonl", ROWS[:15])
    with pytest.raises(PublishError, match=r"`dvc push data/raw/train.jsonl.dvc` to the DVC remote team \(.*\) failed, "
                                           "so nothing was committed"):
        publish_data(clone, "data/raw/train.jsonl", event=False)
    assert sh(clone, "git", "rev-parse", "HEAD") == head


def test_publish_with_an_unreachable_prefect_api_says_what_was_done(team, monkeypatch):
    from conftest import free_port

    clone, _, _ = team
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    write_rows(clone / "data/raw/train.jsonl", ROWS[:14])
    with pytest.raises(PublishError, match=r"is published \(commit \w{12} pushed to .*\) but the event could not be sent"):
        publish_data(clone, "data/raw/train.jsonl")


def test_a_run_on_a_commit_whose_data_is_not_in_the_remote_fails_before_training(team, tmp_path, monkeypatch):
    clone, remote, _ = team
    write_rows(clone / "data/raw/train.jsonl", ROWS[:16])
    dvc(clone, "add", "-q", "data/raw/train.jsonl")
    sh(clone, "git", "commit", "-qam", "data without dvc push")
    sh(clone, "git", "push", "-q", "origin", "main")
    commit = sh(clone, "git", "rev-parse", "HEAD").strip()
    worker = tmp_path / "worker"  # a worker's shallow clone of the branch, with its own (empty) DVC cache
    sh(tmp_path, "git", "clone", "-q", "--depth", "1", f"file://{remote}", str(worker))
    monkeypatch.setenv("OLORA_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("OLORA_DVC_CACHE", str(tmp_path / "worker-cache"))
    assert unpublished(worker) == {"data/raw/train.jsonl": "missing"}
    with pytest.raises(workspace.WorkspaceError, match=r"the data of commit \w{12} is not available: data/raw/train.jsonl "
                                                       r"is missing from the DVC remote team \(.*dvc-remote\)"):
        workspace.create(worker, "r1", commit)
    assert not (tmp_path / "runs" / "r1").exists()  # nothing half-made is left for a retry to continue in
    dvc(clone, "push", "-q")
    # the older published commit (not in the shallow clone) is fetched from the team's remote
    first = sh(clone, "git", "rev-parse", "HEAD~1").strip()
    made = workspace.create(worker, "r2", first)
    assert sh(made, "git", "rev-parse", "HEAD").strip() == first
    assert len((made / "data/raw/train.jsonl").read_text().splitlines()) == 10
    made = workspace.create(worker, "r3", commit)
    assert len((made / "data/raw/train.jsonl").read_text().splitlines()) == 16
    with pytest.raises(workspace.WorkspaceError, match="is neither in .* nor fetchable from"):
        workspace.create(worker, "r4", "0" * 40)


def test_one_repository_key_for_every_spelling_of_a_remote():
    from olora.orchestration.events import repository_key, seen_variable

    same = ["git@github.com:team/olora.git", "ssh://git@github.com/team/olora", "https://github.com/team/olora.git",
            "https://user@github.com/team/olora/", "HTTPS://GitHub.com/team/olora"]
    assert len({repository_key(r, "main") for r in same}) == 1
    assert repository_key(same[0], "main") != repository_key(same[0], "dev")
    assert repository_key("/srv/git/olora.git", "main") == repository_key("file:///srv/git/olora", "main")
    assert repository_key("/srv/git/olora.git", "main") != repository_key(same[0], "main")
    assert seen_variable(same[0], "main").startswith("olora_data_versions_")
