"""The promotion gate: challenger against champion on the same questions, and the alias moved only on evidence.

`promote` compares the two versions' per-question results (`olora.core.paired`), decides with the
pure rule in `olora.core.promotion`, and records the decision (version tags, `promotion/v<N>.json`
in the run, the model card, optionally a local JSON file). A champion asked other questions is first
scored on the challenger's (`olora.tracking.rescore`). Kept apart from `olora.tracking.registry`,
which the register stage runs, so that editing the gate reruns no stage.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from olora import layout
from olora.config import Config
from olora.core.promotion import Decision, decide
from olora.errors import OloraError
from olora.tracking.client import Tracking
from olora.tracking.names import model_name
from olora.tracking.registry import CHALLENGER, CHAMPION, alias_version, find_version, open_model, version_metric

log = logging.getLogger("olora")


def version_questions(c, name: str, version: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """A version's per-question results and their fingerprint, from its run's `eval/` artifacts; None when it has none
    (registered before per-question evaluation). Checked against each other (a SamplesError otherwise)."""
    from mlflow.exceptions import MlflowException

    from olora.evaluation import samples

    run_id = c.get_model_version(name, version).run_id
    if not run_id:  # a version registered by hand, from no run
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rows_file = c.download_artifacts(run_id, f"eval/{Path(layout.samples_path('adapter')).name}", tmp)
            metrics_file = c.download_artifacts(run_id, f"eval/{Path(layout.metrics_path('eval_adapter')).name}", tmp)
        except (MlflowException, OSError):
            return None
        rows = samples.read_samples(Path(rows_file))
        asked = json.loads(Path(metrics_file).read_text()).get("questions")
    if not asked:
        return None
    samples.check_matches(rows, asked, f"{name} version {version} (run {run_id})")
    return rows, asked


def paired_comparison(cfg: Config, c, name: str, challenger: str, champion: str, root: Path | None = None):
    """Challenger minus champion on the same questions (`olora.core.paired`).

    When the champion was asked other questions, or holds no per-question results, and `root` (the
    project, for local base models) is given, the champion is scored on the challenger's questions
    first (`olora.tracking.rescore`). Otherwise, or when that fails, an OloraError names why no
    comparison can be made: never a comparison of means over different questions.
    """
    from olora.core.paired import compare
    from olora.evaluation import samples

    ours = version_questions(c, name, challenger)
    if ours is None:
        raise OloraError(
            f"{name} version(s) {challenger}{'' if version_questions(c, name, champion) else ', ' + champion} have no "
            "per-question results (registered before per-question evaluation, or not by the evaluate stage), so they "
            "cannot be compared on the same questions. Re-run `dvc repro` for that version (`olora restore --version N`) "
            "and register it again, or promote with --force"
        )
    ch_rows, ch_asked = ours
    theirs = version_questions(c, name, champion)
    differ = samples.differences(theirs[1], ch_asked) if theirs else ["the champion holds no per-question results"]
    if differ and root is not None:
        from olora.tracking.rescore import rescore

        theirs = rescore(cfg, c, name, champion, ch_asked, Path(root))
        differ = samples.differences(theirs[1], ch_asked)
    if differ:
        raise OloraError(
            f"challenger {name} v{challenger} and champion v{champion} were scored on different questions "
            f"({'; '.join(differ)}); their means cannot be compared. Evaluate both with the same evaluate "
            "settings (or run `olora promote` from the project, which scores the champion on the challenger's "
            "questions), or promote with --force"
        )
    key = "acc_norm" if cfg.register.promote_metric.strip() == "mean_acc_norm" else "acc"
    weights = cfg.register.metric_weights()
    _check_weighs(cfg, weights, ch_asked, f"{name} v{challenger}")
    return compare(samples.table(theirs[0], key), samples.table(ch_rows, key), cfg.register.confidence,
                   cfg.register.resamples, weights=weights)


def _check_weighs(cfg: Config, weights: dict[str, float] | None, asked: dict[str, Any], which: str) -> None:
    """The tasks register.promote_metric names are tasks the version was scored on (else an OloraError)."""
    missing = sorted(set(weights or {}) - set(asked.get("tasks", {})))
    if missing:
        raise OloraError(
            f"register.promote_metric={cfg.register.promote_metric!r} names task(s) {missing} that {which} was not "
            f"evaluated on (its tasks: {', '.join(sorted(asked.get('tasks', {})))}); promote on tasks it was scored on, "
            "or evaluate it on those tasks (add them to evaluate.tasks and `dvc repro`)")


def metric_value(cfg: Config, c, name: str, version: str) -> float | None:
    """A version's register.promote_metric: its tag for mean_acc / mean_acc_norm; for one task or a weighted set,
    the weighted mean of its per-question scores on those tasks (None when it has none)."""
    weights = cfg.register.metric_weights()
    if weights is None:
        return version_metric(c, name, version, cfg.register.promote_metric.strip())
    from olora.core.paired import score
    from olora.evaluation import samples

    found = version_questions(c, name, version)
    if found is None or set(weights) - set(found[1].get("tasks", {})):
        return None
    return score(samples.table(found[0]), weights)


def promote(cfg: Config, tracking: Tracking, name: str | None = None, version: str | None = None,
            force: bool = False, report: Path | None = None, root: Path | None = None) -> Decision:
    """Compare challenger (or `version`) with champion on the same questions; move `champion` if the gain's
    interval lies above `register.min_improvement` (or with `force`). The decision is stored as version tags,
    as `promotion/v<N>.json` in the challenger's run and, with `report`, in that local file. With `root`
    (the project) a champion asked other questions is scored on the challenger's first."""
    name = name or model_name(cfg)
    c = open_model(tracking, name)
    version = find_version(c, name, CHALLENGER, version)
    champion = alias_version(c, name, CHAMPION)
    metric = cfg.register.promote_metric
    if champion == version and not force:  # nothing to decide; keep the record of the original decision
        value = metric_value(cfg, c, name, version)
        return Decision(False, f"version {version} is already {CHAMPION}", value if value is not None else float("nan"), value)
    comparison = None
    if champion and champion != version:
        try:
            comparison = paired_comparison(cfg, c, name, version, champion, root)
        except OloraError:
            if not force:
                raise
    if comparison is not None and comparison.weights is not None:  # the values on the questions compared
        values = comparison.challenger_score, comparison.champion_score
    else:
        values = (metric_value(cfg, c, name, version),
                  metric_value(cfg, c, name, champion) if champion and champion != version else None)
    decision = decide(
        *values,
        comparison,
        cfg.register.min_improvement,
        force,
        metric,
    )
    record = decision_record(decision, name, version, champion, metric)
    tags = {f"promotion.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in record.items()
            if k not in ("tasks", "name", "version")}
    tags["promotion.p_values"] = json.dumps({t: e["p_value"] for t, e in record.get("tasks", {}).items()})
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    if report is not None:
        from olora.io import write_json

        write_json(report, record)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"v{version}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        tracking.call("uploading the promotion decision",
                      lambda: c.log_artifact(c.get_model_version(name, version).run_id, str(path), "promotion"))
    if not (champion == version and decision.promote):  # the card says what was decided, and on what evidence
        from olora.tracking.card import promotion_section

        card = c.get_model_version(name, version).description or ""
        c.update_model_version(name, version, description=card + promotion_section(record))
    if decision.promote and champion != version:
        if champion:
            c.set_model_version_tag(name, version, "previous_champion", champion)
        c.set_registered_model_alias(name, CHAMPION, version)
    log.info("promote %s v%s: %s (%s)", name, version, record["decision"], decision.reason)
    return decision


def decision_record(decision: Decision, name: str, version: str, champion: str | None, metric: str) -> dict[str, Any]:
    """The decision as JSON: what was compared with what, the gain, its interval, p-values, n, MDE."""
    comparison = decision.comparison
    out: dict[str, Any] = {
        "name": name, "version": str(version), "decision": "promoted" if decision.promote else "rejected",
        "forced": decision.forced, "reason": decision.reason, "metric": metric,
        "challenger_metric": decision.challenger_metric, "champion_metric": decision.champion_metric,
        "champion_version": str(champion),
    }
    if comparison is not None:
        out.update(gain=comparison.diff, interval_low=comparison.low, interval_high=comparison.high,
                   confidence=comparison.confidence, n=comparison.n, mde=comparison.mde,
                   significant=comparison.significant, tasks=comparison.to_dict()["tasks"])
        if comparison.weights is not None:  # a task or weighted set (register.promote_metric)
            out["weights"] = comparison.weights
    return out
