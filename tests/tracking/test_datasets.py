"""A run's dataset inputs (olora.tracking.datasets): the digests are what DVC and the evaluation record."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import BIN, sh
from olora.evaluation.result import EvalResult
from olora.tracking.datasets import evaluation_inputs, file_md5, prepared_inputs

REPO = Path(__file__).resolve().parents[2]


def test_a_split_digest_is_the_md5_dvc_records_for_the_file(tmp_path):
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.jsonl").write_text('{"prompt": "a\\r\\nb", "response": "c"}\n' * 3)  # CRLF inside: no normalising
    (prepared / "validation.jsonl").write_text('{"prompt": "d", "response": "e"}\n')
    sh(["git", "init", "-q"], tmp_path)
    sh([str(BIN / "dvc"), "init", "-q"], tmp_path)
    sh([str(BIN / "dvc"), "add", "-q", "data/prepared"], tmp_path)
    dir_md5 = yaml.safe_load((tmp_path / "data" / "prepared.dvc").read_text())["outs"][0]["md5"]
    manifest = json.loads((tmp_path / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    recorded = {entry["relpath"]: entry["md5"] for entry in manifest}
    inputs = {i.dataset.name: i for i in prepared_inputs(tmp_path, "data/raw/rows.jsonl", dir_md5, "abc123")}
    assert {name: i.dataset.digest for name, i in inputs.items()} == {
        "train": recorded["train.jsonl"], "validation": recorded["validation.jsonl"]}
    assert recorded["train.jsonl"] == file_md5(prepared / "train.jsonl")
    source = json.loads(inputs["train"].dataset.source)
    assert source == {"uri": "data/prepared/train.jsonl", "dvc_out": "data/prepared", "dvc_out_md5": dir_md5,
                      "git_commit": "abc123", "data_source": "data/raw/rows.jsonl"}
    assert json.loads(inputs["train"].dataset.profile) == {"num_rows": 3}
    assert [(t.key, t.value) for t in inputs["validation"].tags] == [("mlflow.data.context", "validation")]


def test_each_evaluated_task_is_an_input_named_by_its_questions():
    metrics = json.loads((REPO / "metrics" / "eval_adapter.json").read_text())
    metrics["questions"]["tasks"]["copa_ours"] = {"version": 1.0, "n": 3, "questions": "f" * 64, "definition": "d" * 64}
    inputs = {i.dataset.name: i for i in evaluation_inputs(EvalResult.from_json(metrics))}
    assert set(inputs) == set(metrics["questions"]["tasks"])
    for task, entry in metrics["questions"]["tasks"].items():
        assert inputs[task].dataset.digest == entry["questions"][:32]
        assert [(t.key, t.value) for t in inputs[task].tags] == [("mlflow.data.context", "evaluation")]
    winogrande = inputs["winogrande"].dataset
    assert winogrande.source_type == "hugging_face"
    assert json.loads(winogrande.source)["path"] == "allenai/winogrande"
    assert json.loads(winogrande.profile) == {"num_rows": 100, "lm_eval_task_version": 1.0, "evaluate_source": "offline",
                                              "limit": 100, "split": "validation"}
    team = inputs["copa_ours"].dataset
    assert team.source_type == "lm_eval" and json.loads(team.source) == {"task": "copa_ours", "uri": "evals/",
                                                                       "definition": "d" * 64}
