"""The team's own lm-eval tasks under evals/: the shipped example, generative and multiple-choice tasks through
real lm-eval on the tiny Llama (both backends), their per-question rows and fingerprint, and DVC's view of evals/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from olora.config import EvaluateConfig
from olora.evaluation import custom, samples
from olora.evaluation.tasks import prepared

REPO = Path(__file__).resolve().parents[2]

GENERATIVE = """\
task: sums_example
dataset_path: json
dataset_kwargs:
  data_files:
    validation: data/sums.jsonl
validation_split: validation
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""

CHOICE = """\
task: colours_example
dataset_path: json
dataset_kwargs:
  data_files:
    validation: data/colours.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 2
"""


def team_evals(root: Path) -> Path:
    """<root>/evals with a generative task (regex filter, exact match) and a multiple-choice one, 5 questions each."""
    folder = root / "evals"
    (folder / "data").mkdir(parents=True)
    (folder / "sums.yaml").write_text(GENERATIVE)
    (folder / "colours.yaml").write_text(CHOICE)
    (folder / "data" / "sums.jsonl").write_text("".join(
        json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    (folder / "data" / "colours.jsonl").write_text("".join(
        json.dumps({"question": f"What colour is thing {i}?", "choices": [" red", " green", " blue"], "label": i % 3}) + "\n"
        for i in range(5)))
    return folder


# --- the shipped example and the checks (no model) -------------------------------------------------


def test_the_shipped_example_loads_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for data/copa_example.jsonl here
    found = custom.scan(REPO / "evals")
    assert list(found) == ["copa_example"]
    task = found["copa_example"]
    assert (task.metric, task.filter, task.split, task.label) == ("acc", "none", "validation", "evals/copa_example.yaml")
    assert task.data_files == {"validation": [(REPO / "evals/data/copa_example.jsonl").resolve()]}
    with prepared(EvaluateConfig(tasks=["arc_easy", "copa_example"]), REPO / "evals") as tasks:
        assert tasks.names == {"arc_easy": "arc_easy_olora_offline", "copa_example": "copa_example"}
        assert tasks.scoring == {"copa_example": ("acc", "none")} and tasks.definitions == {"copa_example": task.definition}
        built = tasks.manager.load(["copa_example"])["tasks"]["copa_example"]
        docs = list(built.eval_docs)
        assert len(docs) == 100  # the whole packaged COPA validation split
        assert built.doc_to_text(docs[0]) == "The man turned on the faucet therefore"
        assert built.doc_to_choice(docs[0]) == ["the toilet filled with water.", "water flowed from the spout."]
        assert built.doc_to_target(docs[0]) == 1


def test_the_definition_changes_with_a_question_the_yaml_or_code_but_not_the_checkout(tmp_path):
    first = team_evals(tmp_path / "a")
    other = shutil.copytree(first, tmp_path / "b" / "evals")
    before = custom.scan(first)
    assert {t: v.definition for t, v in custom.scan(other).items()} == {t: v.definition for t, v in before.items()}
    data = first / "data" / "sums.jsonl"
    data.write_text(data.read_text().replace("What is 0 plus 0?", "What is zero plus zero?"))
    after = custom.scan(first)
    assert after["sums_example"].definition != before["sums_example"].definition
    assert after["colours_example"].definition == before["colours_example"].definition  # its own files only
    (first / "colours.yaml").write_text(CHOICE.replace("Question:", "Q:"))
    assert custom.scan(first)["colours_example"].definition != before["colours_example"].definition
    (first / "utils.py").write_text("def f(doc):\n    return doc\n")  # code beside the YAML may define its prompts
    assert custom.scan(first)["sums_example"].definition != after["sums_example"].definition


def test_a_changed_definition_is_never_compared_as_the_same_questions():
    cfg = EvaluateConfig(tasks=["sums_example"], limit=5)
    rows = [{"task": "sums_example", "doc_id": i, "doc_hash": f"h{i}", "acc": 1, "acc_norm": None} for i in range(5)]
    a = samples.fingerprint(rows, cfg, {"sums_example": 1}, {"sums_example": "d1"})
    b = samples.fingerprint(rows, cfg, {"sums_example": 1}, {"sums_example": "d2"})
    assert a["tasks"]["sums_example"]["definition"] == "d1" and a["sha256"] != b["sha256"]
    assert samples.differences(a, b) == ["sums_example task definition differs (its YAML, data or code under evals/ changed)"]
    # stock tasks carry no definition: their fingerprints are what they were before team tasks existed
    stock = samples.fingerprint([{**r, "task": "arc_easy"} for r in rows], EvaluateConfig(tasks=["arc_easy"], limit=5),
                                {"arc_easy": 1})
    assert "definition" not in stock["tasks"]["arc_easy"]


def test_rows_keep_the_scored_filter_and_metric():
    """lm-eval logs one record per question and filter; a generative task's row is its first filter's exact match."""
    raw = {"samples": {"gen": [
        {"doc_id": 1, "doc_hash": "b", "filter": "number", "exact_match": 1.0},
        {"doc_id": 0, "doc_hash": "a", "filter": "number", "exact_match": 0.0},
        {"doc_id": 0, "doc_hash": "a", "filter": "strict", "exact_match": 1.0},
    ], "mc": [{"doc_id": 0, "doc_hash": "c", "filter": "none", "acc": 1.0, "acc_norm": 0.0}]}}
    rows = samples.rows_from_lm_eval(raw, {"gen": "gen", "mc": "mc"}, {"gen": ("exact_match", "number")})
    none = {"gold": None, "loglik": None, "loglik_norm": None}  # no log-likelihoods logged: none kept
    assert rows == [{"task": "gen", "doc_id": 0, "doc_hash": "a", "acc": 0, "acc_norm": None, **none},
                    {"task": "gen", "doc_id": 1, "doc_hash": "b", "acc": 1, "acc_norm": None, **none},
                    {"task": "mc", "doc_id": 0, "doc_hash": "c", "acc": 1, "acc_norm": 0, **none}]


# --- real lm-eval on the tiny Llama --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_untied_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_untied_model_dir)


@pytest.mark.integration
def test_team_tasks_evaluate_with_both_backends(tiny, tmp_path, monkeypatch):
    from olora.evaluation.harness import run_lm_eval

    evals = team_evals(tmp_path / "project")
    monkeypatch.chdir(tmp_path)  # not the project: data files resolve against their YAML
    model, tokenizer = tiny
    cfg = {b: EvaluateConfig(tasks=["arc_easy", "sums_example", "colours_example"], limit=4, batch_size=4, backend=b)
           for b in ("hf", "prefix")}
    runs = {b: run_lm_eval(model, tokenizer, cfg[b], evals) for b in cfg}
    for backend, evaluation in runs.items():
        metrics, rows = evaluation.metrics.to_json(), evaluation.rows  # as metrics/eval_*.json holds them
        assert list(metrics["tasks"]) == ["arc_easy", "sums_example", "colours_example"], backend
        gen, mc = metrics["tasks"]["sums_example"], metrics["tasks"]["colours_example"]
        assert gen["scored_by"] == "exact_match" and "acc_norm" not in gen and gen["n"] == 4
        assert "scored_by" not in mc and "acc_norm" in mc and mc["n"] == 4
        for task in metrics["tasks"]:  # the summary is the mean of the per-question rows
            mine = [r["acc"] for r in rows if r["task"] == task]
            assert len(mine) == 4 and set(mine) <= {0, 1}
            assert sum(mine) / 4 == pytest.approx(metrics["tasks"][task]["acc"]), (backend, task)
        assert metrics["mean_acc"] == pytest.approx(sum(t["acc"] for t in metrics["tasks"].values()) / 3)
        asked = metrics["questions"]["tasks"]
        assert asked["sums_example"]["definition"] == custom.scan(evals)["sums_example"].definition
        assert "definition" not in asked["arc_easy"]
    # the shared-prefix backend decides every question as lm-eval's hf does, generative ones included
    assert [(r["task"], r["doc_id"], r["acc"], r["acc_norm"]) for r in runs["prefix"].rows] == \
           [(r["task"], r["doc_id"], r["acc"], r["acc_norm"]) for r in runs["hf"].rows]
    assert runs["prefix"].metrics.questions == runs["hf"].metrics.questions


@pytest.mark.integration
def test_a_generative_task_scores_exact_match_after_its_filter(tiny, tmp_path):
    """A question whose target is the word the model generates first (its regex filter's pick) scores 1, one it
    never says 0, with source=hub too (a team task alone needs no hub)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from olora.evaluation.harness import run_lm_eval

    model, tokenizer = tiny
    evals = team_evals(tmp_path / "project")
    (evals / "sums.yaml").write_text(GENERATIVE.replace('"(-?[0-9]+)"', "'(\\S+)'"))  # the first word
    cfg = EvaluateConfig(tasks=["sums_example"], limit=2, batch_size=2, backend="hf", source="hub")
    with prepared(cfg, evals) as tasks:  # what the model says to the first question, through lm-eval
        raw = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2), tasks=["sums_example"],
                              task_manager=tasks.manager, limit=1, log_samples=True, bootstrap_iters=0)
    said = raw["samples"]["sums_example"][0]["filtered_resps"][0]
    assert said and said != "[invalid]"
    (evals / "data" / "sums.jsonl").write_text(
        json.dumps({"question": "What is 0 plus 0?", "answer": said}) + "\n"
        + json.dumps({"question": "What is 1 plus 1?", "answer": "never said"}) + "\n")
    evaluation = run_lm_eval(model, tokenizer, cfg, evals)
    assert [r["acc"] for r in evaluation.rows] == [1, 0]
    assert evaluation.metrics.tasks["sums_example"].acc == 0.5
    assert evaluation.metrics.questions["source"] == "hub"


# --- DVC: evals/ is an input of both evaluate stages, and of nothing else ----------------------------


@pytest.mark.integration
def test_editing_a_question_reruns_only_evaluation(tmp_path, tiny_model_dir):
    """`dvc repro` with the shipped example task added and promotion on a weighted set: its scores, with intervals,
    in `dvc metrics show`, MLflow and the model card; editing one question changes only the evaluate stages, and
    the gate scores the champion again on the changed questions before comparing."""
    from mlflow import MlflowClient

    from conftest import BIN, make_dvc_project, sh

    root = make_dvc_project(tmp_path / "project", tiny_model_dir, {
        "evaluate.tasks": ["arc_easy", "copa_example"], "evaluate.limit": 3,
        "register.promote_metric": "arc_easy:1+copa_example:2", "register.resamples": 1000})
    dvc = str(BIN / "dvc")
    sh([dvc, "repro"], root)
    adapter = json.loads((root / "metrics/eval_adapter.json").read_text())
    copa = adapter["tasks"]["copa_example"]
    assert copa["n"] == 3 and 0 <= copa["acc"] <= 1 and copa["acc_stderr"] >= 0 and copa["split"] == "validation"
    assert adapter["vs_base"]["tasks"]["copa_example"]["n"] == 3  # paired with the base, with its interval
    shown = json.loads(sh([dvc, "metrics", "show", "--json"], root).stdout)
    assert "copa_example" in json.dumps(shown)
    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}", registry_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "reports/registration.json").read_text())["run_id"]
    assert "eval/copa_example/acc_stderr" in c.get_run(run_id).data.metrics
    card = c.get_model_version("olora-tiny-llama", "1").description
    assert "| copa_example | validation | 3 |" in card
    promoted = sh([str(BIN / "olora"), "promote"], root)  # no champion yet: v1 becomes it
    assert promoted.stdout.startswith("PROMOTED: ")
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "first run"], root)

    def changed() -> set[str]:
        return set(json.loads(sh([dvc, "status", "--json"], root).stdout or "{}"))

    assert changed() == set()
    data = root / "evals/data/copa_example.jsonl"
    data.write_text(data.read_text().replace("The man turned on the faucet.", "The woman turned on the tap."))
    assert changed() == {"evaluate_base", "evaluate"}
    rerun = sh([dvc, "repro"], root).stdout
    for stage in ("prepare", "init", "train"):
        assert f"Running stage '{stage}'" not in rerun
    assert "Running stage 'evaluate_base'" in rerun and "Running stage 'evaluate'" in rerun
    after = json.loads((root / "metrics/eval_adapter.json").read_text())["questions"]
    assert samples.differences(adapter["questions"], after) == [
        "copa_example task definition differs (its YAML, data or code under evals/ changed)"]
    # a new adapter (v2) against champion v1, which was asked other copa questions: v1 is scored again on v2's
    # questions (this checkout's evals/) before the paired gate compares them on the weighted set
    sh([dvc, "exp", "run", "-S", "adapter.r=2"], root)
    gate = sh([str(BIN / "olora"), "promote"], root)
    assert gate.stdout.startswith(("PROMOTED: ", "KEPT CHAMPION: ")), gate.stdout
    record = json.loads((root / "reports/promotion.json").read_text())
    assert record["metric"] == "arc_easy:1+copa_example:2" and record["n"] == 6
    assert record["tasks"]["copa_example"]["n"] == 3 and record["version"] == "2"
    assert record["weights"] == pytest.approx({"arc_easy": 1 / 3, "copa_example": 2 / 3})
