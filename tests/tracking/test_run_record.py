"""The run-record tags, named once (`olora.tracking.lineage.RunRecord`): written and read back through the one class."""

from __future__ import annotations

from olora.tracking.lineage import TAGS, RunRecord


def test_the_record_round_trips_through_its_tags_in_the_order_they_were_always_written():
    record = RunRecord(git_branch="runs/first", git_commit="c" * 40, run_name="first", git_remote="/git/remote",
                       source_commit="s" * 40, dvc_pushed=False, data_version="v1", data_commit="s" * 40,
                       data_hash="abc.dir")
    tags = record.to_tags()
    assert list(tags) == ["olora.run_name", "olora.git_branch", "olora.git_commit", "olora.git_remote",
                          "olora.source_commit", "olora.dvc_pushed", "olora.data_version", "olora.data_commit",
                          "dvc.data_hash"]
    assert tags["olora.dvc_pushed"] == "false" and tags[TAGS["git_branch"]] == "runs/first"
    assert RunRecord.from_tags({**tags, "mlflow.runName": "x"}) == record


def test_a_version_not_recorded_by_a_flow_run_has_no_record():
    assert RunRecord.from_tags({"base_model": "tiny"}) is None
    assert RunRecord.from_tags({TAGS["git_branch"]: "runs/x"}) is None  # a branch without its commit
    partial = RunRecord.from_tags({TAGS["git_branch"]: "runs/x", TAGS["git_commit"]: "c"})  # older runs: fewer tags
    assert partial.dvc_pushed is None and partial.to_tags() == {TAGS["git_branch"]: "runs/x", TAGS["git_commit"]: "c"}
