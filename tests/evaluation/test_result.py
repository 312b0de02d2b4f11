"""The evaluation result's JSON contract: the committed metrics files read back byte for byte, older files read,
a malformed one refused by file and field."""

from __future__ import annotations

import json

import pytest

from olora.evaluation.result import EvalResult, MetricsFileError
from olora.evaluation.report import report_markdown

from conftest import REPO

COMMITTED = ["metrics/eval_base.json", "metrics/eval_adapter.json"]


def _dumped(result: EvalResult) -> str:
    """What the evaluate stages write (`olora.io.write_json`)."""
    return json.dumps(result.to_json(), indent=2, sort_keys=False) + "\n"


@pytest.mark.parametrize("name", COMMITTED)
def test_the_committed_metrics_round_trip_exactly(name):
    path = REPO / name
    result = EvalResult.read(path)
    assert _dumped(result) == path.read_text()
    assert result.tasks["arc_easy"].n == 100 and result.tasks["arc_easy"].split == "validation"
    assert result.tasks["boolq"].acc_norm is None  # boolq reports acc only: the key stays absent
    assert result.questions["limit"] == result.limit == 100


def test_the_committed_adapter_result_is_typed_through():
    base, tuned = (EvalResult.read(REPO / n) for n in COMMITTED)
    paired = tuned.vs_base
    written = json.loads((REPO / COMMITTED[1]).read_text())
    assert paired.n == 700 and paired.se == written["vs_base"].get("se")  # absent before `se` was kept
    # significance is what the interval says (read, not pinned: a new `make run` may land either side of 0)
    assert paired.significant == written["vs_base"]["significant"] == (paired.low > 0 or paired.high < 0)
    assert (tuned.timing is None) == ("timing" not in written)
    if tuned.timing is not None:
        assert tuned.timing.requests == written["timing"]["requests"] > 0
    boolq = written["vs_base"]["tasks"]["boolq"]  # read from the file, so a new `make run` needs no edit here
    assert (paired.tasks["boolq"].better, paired.tasks["boolq"].worse) == (boolq["better"], boolq["worse"])
    assert paired.tasks["boolq"].better - paired.tasks["boolq"].worse == round(paired.tasks["boolq"].diff * 100)
    assert tuned.delta_vs_base["mean_acc"] == pytest.approx(tuned.mean_acc - base.mean_acc, abs=1e-9)
    assert tuned.mean_acc == pytest.approx(sum(t.acc for t in tuned.tasks.values()) / 7)
    # the committed report is what the typed values render
    report = (REPO / "reports/eval.md").read_text()
    assert report_markdown(base, tuned, report.splitlines()[0].removeprefix("# ")) == report


OLDER = {  # what older code wrote (as the history of metrics/eval_adapter.json shows), so older registered versions hold
    "before the fingerprint (7ce3844)": lambda d: [d.pop(k, None) for k in ("questions", "vs_base", "timing")],
    "before weights and scores (7de7956)": lambda d: [d.pop("timing", None)] + [
        d["vs_base"].pop(k, None) for k in ("weights", "champion_score", "challenger_score", "se")],
}


@pytest.mark.parametrize("older", sorted(OLDER))
def test_results_written_by_older_code_are_read(older):
    data = json.loads((REPO / "metrics/eval_adapter.json").read_text())
    OLDER[older](data)
    result = EvalResult.from_json(data, older)
    assert len(result.tasks) == 7 and result.timing is None
    assert (result.questions is None) == ("fingerprint" in older)
    if result.vs_base is not None:
        assert result.vs_base.weights is None and result.vs_base.champion_score is None


@pytest.mark.parametrize("break_it, field", [
    (lambda d: d.pop("mean_acc"), "'mean_acc' is missing"),
    (lambda d: d["tasks"]["piqa"].pop("split"), "tasks.piqa: field 'split' is missing"),
    (lambda d: d["tasks"]["piqa"].update(acc="0.6"), "tasks.piqa: field 'acc' is '0.6', expected a number"),
    (lambda d: d["vs_base"]["tasks"]["piqa"].pop("p_value"), "vs_base: tasks.piqa: field 'p_value' is missing"),
    (lambda d: d["questions"]["tasks"]["piqa"].pop("questions"), "questions.tasks.piqa: field 'questions' is missing"),
    (lambda d: d.update(mean_accuracy=0.5), "unknown field(s) ['mean_accuracy']"),
])
def test_a_malformed_file_is_refused_by_name_and_field(tmp_path, break_it, field):
    data = json.loads((REPO / "metrics/eval_adapter.json").read_text())
    break_it(data)
    path = tmp_path / "metrics" / "eval_adapter.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    with pytest.raises(MetricsFileError) as err:
        EvalResult.read(path)
    assert str(err.value).startswith(f"{path}: ") and field in str(err.value), err.value


def test_a_file_that_is_not_json_is_refused_by_name(tmp_path):
    path = tmp_path / "eval_base.json"
    path.write_text("{\"tasks\": ")
    with pytest.raises(MetricsFileError, match=f"{path} is not JSON"):
        EvalResult.read(path)
