"""Per-question results: round trip, the fingerprint of what was asked, and the checks that refuse a mismatch."""

from __future__ import annotations

import pytest

from olora.config import EvaluateConfig
from olora.evaluation import samples


def rows(task_sizes: dict[str, int], acc: int = 1) -> list[dict]:
    return [{"task": t, "doc_id": i, "doc_hash": f"{t}-{i}", "acc": acc, "acc_norm": None if t == "boolq" else acc,
             "gold": 1, "loglik": [-1.25 - i, -0.1 / 3], "loglik_norm": [(-1.25 - i) / 7, -0.1 / 15]}
            for t, n in task_sizes.items() for i in range(n)]


def test_round_trip_and_table(tmp_path):
    written = rows({"arc_easy": 3, "boolq": 2})
    samples.write_samples(tmp_path / "s.csv", written)
    assert samples.read_samples(tmp_path / "s.csv") == written  # the log-likelihoods exactly, not rounded
    # a file written before the log-likelihoods were kept still reads, with those fields empty
    (tmp_path / "old.csv").write_text("task,doc_id,doc_hash,acc,acc_norm\narc_easy,0,h0,1,0\nboolq,0,h1,0,\n")
    assert samples.read_samples(tmp_path / "old.csv")[1] == {"task": "boolq", "doc_id": 0, "doc_hash": "h1", "acc": 0,
                                                            "acc_norm": None, "gold": None, "loglik": None,
                                                            "loglik_norm": None}
    table = samples.table(written, "acc_norm")  # boolq has no acc_norm: its acc stands in, as in mean_acc_norm
    assert table["boolq"] == {"0:boolq-0": 1, "1:boolq-1": 1} and len(table["arc_easy"]) == 3


def test_the_fingerprint_names_what_differs():
    cfg = EvaluateConfig(tasks=["arc_easy", "boolq"], limit=3)
    a = samples.fingerprint(rows({"arc_easy": 3, "boolq": 3}), cfg, {"arc_easy": 1.0, "boolq": 2.0})
    assert samples.differences(a, a) == []
    assert a == samples.fingerprint(rows({"arc_easy": 3, "boolq": 3}, acc=0), cfg, {"arc_easy": 1.0, "boolq": 2.0})  # outcomes are not asked
    no_ll = [{k: v for k, v in r.items() if not k.startswith(("loglik", "gold"))} for r in rows({"arc_easy": 3, "boolq": 3})]
    assert a == samples.fingerprint(no_ll, cfg, {"arc_easy": 1.0, "boolq": 2.0})  # nor the log-likelihoods kept
    fewer = samples.fingerprint(rows({"arc_easy": 2, "boolq": 3}), EvaluateConfig(tasks=["arc_easy", "boolq"], limit=2),
                                {"arc_easy": 1.0, "boolq": 2.0})
    assert samples.differences(a, fewer) == ["evaluate.limit 3 vs 2", "arc_easy questions differ (3 vs 2)"]
    newer = samples.fingerprint(rows({"arc_easy": 3, "boolq": 3}), cfg, {"arc_easy": 1.0, "boolq": 3.0})
    assert samples.differences(a, newer) == ["boolq task version 2.0 vs 3.0"]
    one = samples.fingerprint(rows({"arc_easy": 3}), EvaluateConfig(tasks=["arc_easy"], limit=3), {"arc_easy": 1.0})
    assert samples.differences(a, one) == ["tasks ['arc_easy', 'boolq'] vs ['arc_easy']"]


def test_files_that_do_not_match_their_fingerprint_are_refused(tmp_path):
    cfg = EvaluateConfig(tasks=["arc_easy"], limit=3)
    written = rows({"arc_easy": 3})
    asked = samples.fingerprint(written, cfg, {"arc_easy": 1.0})
    samples.check_matches(written, asked, "here")
    with pytest.raises(samples.SamplesError, match="here: the per-question results of task arc_easy do not match"):
        samples.check_matches(written[:2], asked, "here")
    with pytest.raises(samples.SamplesError, match=r"tasks the fingerprint does not list: \['boolq'\]"):
        samples.check_matches(written + rows({"boolq": 1}), asked, "here")
    (tmp_path / "bad.csv").write_text("task,doc_id\narc_easy,0\n")
    with pytest.raises(samples.SamplesError, match="is not a per-question results file"):
        samples.read_samples(tmp_path / "bad.csv")
    with pytest.raises(samples.SamplesError, match=r"not found; re-run the evaluate stages"):
        samples.read_samples(tmp_path / "missing.csv")


def test_first_cuts_a_larger_evaluation_to_a_smaller_limit():
    """What an evaluation at limit 3 holds of one at limit 2: the first 2 questions of each task, fingerprinted as an
    evaluation at limit 2 would be."""
    cfg3, cfg2 = EvaluateConfig(tasks=["arc_easy", "boolq"], limit=3), EvaluateConfig(tasks=["arc_easy", "boolq"], limit=2)
    versions = {"arc_easy": 1.0, "boolq": 2.0}
    big = rows({"arc_easy": 3, "boolq": 3})
    cut_rows, cut = samples.first((big, samples.fingerprint(big, cfg3, versions)), 2)
    small = rows({"arc_easy": 2, "boolq": 2})
    assert cut_rows == small and cut == samples.fingerprint(small, cfg2, versions)
    assert samples.first((big, samples.fingerprint(big, cfg3, versions)), 0)[0] is big  # 0: all of it
