"""The promotion gate: challenger against champion on the same questions, and the alias moved only on evidence.

`promote` compares the two versions' per-question results on the promote metric's whole question set
(`olora.core.paired`), decides with the pure rule in `olora.core.promotion`, moves the alias, then
records the decision (version tags, `promotion/v<N>.json` in the run, the model card, optionally a
local JSON file). A side asked fewer or other questions is first scored on the whole set
(`olora.tracking.rescore`). Kept apart from `olora.tracking.registry`,
which the register stage runs, so that editing the gate reruns no stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from dataclasses import replace
from typing import Any

from olora import layout
from olora.config import Config, EvaluateConfig
from olora.core.promotion import Decision, decide
from olora.errors import OloraError
from olora.evaluation.result import EvalResult
from olora.faults import marker
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
            rows_file = c.download_artifacts(run_id, f"{layout.EVAL_ARTIFACTS}/{layout.samples_file('adapter')}", tmp)
            metrics_file = c.download_artifacts(run_id, f"{layout.EVAL_ARTIFACTS}/{layout.metrics_file('eval_adapter')}", tmp)
        except (MlflowException, OSError):
            return None
        rows = samples.read_samples(Path(rows_file))
        where = f"{name} version {version}'s {layout.metrics_file('eval_adapter')} (run {run_id})"
        asked = EvalResult.from_json(json.loads(Path(metrics_file).read_text()), where).questions
    if not asked:
        return None
    samples.check_matches(rows, asked, f"{name} version {version} (run {run_id})")
    return rows, asked


def comparison_set(cfg: Config, ours: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, Any]:
    """The questions the gate compares on: the promote metric's whole set, never a smaller one.

    Its tasks (a weighted metric's tasks; for mean_acc / mean_acc_norm every task either side was scored on) at
    the larger of the two sides' limits (0, the whole split, is the largest), with the challenger's few-shot
    count, seed and source. `sha256` keys the cached re-scorings (`olora.tracking.rescore`).
    """
    weights = cfg.register.metric_weights()
    tasks = sorted(weights) if weights else sorted(set(ours["tasks"]) | set((theirs or {}).get("tasks", {})))
    limits = [ours.get("limit"), *([theirs.get("limit")] if theirs else [])]
    limit = 0 if any(not v for v in limits) else max(limits)
    spec = {"tasks": tasks, "limit": limit, "num_fewshot": ours["num_fewshot"], "seed": ours["seed"],
            "source": ours["source"]}
    return {**spec, "sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()}


def _restricted(found: tuple[list[dict], dict[str, Any]] | None, tasks: list[str]):
    """A side's rows and fingerprint on `tasks` only (the tasks the metric does not weigh are not compared)."""
    if found is None:
        return None
    rows, asked = found
    return [r for r in rows if r["task"] in tasks], {**asked, "tasks": {t: e for t, e in asked["tasks"].items() if t in tasks}}


def _covers(found, target: dict[str, Any]) -> list[str]:
    """How a side's fingerprint falls short of the set `target` describes, in words (empty: it holds that set, or
    a larger one of which the set is the first `limit` questions of each task, as lm-eval's limit takes them)."""
    if found is None:
        return ["it holds no per-question results"]
    asked = found[1]
    out = []
    if sorted(asked["tasks"]) != target["tasks"]:
        out.append(f"tasks {sorted(asked['tasks'])} vs {target['tasks']}")
    for key in ("num_fewshot", "seed", "source"):
        if asked.get(key) != target[key]:
            out.append(f"evaluate.{key} {asked.get(key)!r} vs {target[key]!r}")
    have, want = asked.get("limit"), target["limit"]
    if not (have == want or (have == 0 and want is not None) or (want and have and have >= want)):
        out.append(f"evaluate.limit {have!r} vs {want!r}")
    return out


def question_set(target: dict[str, Any], n: int, rescored: dict[str, int]) -> str:
    """The compared set in words: `700 questions of 7 tasks (limit 100 a task); v1 re-scored on 660`."""
    per = "the whole split" if not target["limit"] else f"limit {target['limit']}"
    text = f"{n} questions of {len(target['tasks'])} task{'s' if len(target['tasks']) != 1 else ''} ({per} a task)"
    return text + "".join(f"; v{v} re-scored on {k}" for v, k in rescored.items())


def _load(c, name: str, challenger: str, champion: str, root: Path | None):
    """Both sides' per-question results (None where a side has none); an OloraError when the challenger's are
    missing and nothing can be scored, or when the questions to compare on are unknown."""
    ours = version_questions(c, name, challenger)
    theirs = version_questions(c, name, champion)
    if ours is None:  # the questions to compare on are the challenger's and the metric's: unknown without them
        raise OloraError(
            f"{name} version(s) {challenger}{'' if theirs else ', ' + champion} have no "
            "per-question results (registered before per-question evaluation, or not by the evaluate stage), so they "
            "cannot be compared on the same questions. Re-run `dvc repro` for that version (`olora restore --version N`) "
            "and register it again, or promote with --force"
        )
    return ours, theirs


def _on_set(cfg: Config, c, name: str, found: dict[str, Any], challenger: str, champion: str, target: dict[str, Any],
            root: Path | None):
    """Both sides' results on exactly the set `target` describes: taken from what a side holds when it holds the set
    (or a larger one), else scored on it first (with `root`). Returns (sides, {version: questions re-scored},
    seconds spent scoring); an OloraError naming the difference when a side cannot be had on the set."""
    import time

    from olora.evaluation import samples

    sides, rescored, seconds = {}, {}, 0.0

    def score(version: str, held=None):
        nonlocal seconds
        from olora.tracking.rescore import rescore

        start = time.monotonic()
        rows, asked, rescored[version] = rescore(cfg, c, name, version, target, Path(root), held)
        seconds += time.monotonic() - start
        return rows, asked

    for version in (champion, challenger):
        side = _restricted(found[version], target["tasks"])
        if _covers(side, target) and root is not None:
            side = score(version, side)
        sides[version] = samples.first(side, target["limit"]) if side is not None and not _covers(side, target) else side

    def differ() -> list[str]:
        return (samples.differences(sides[champion][1], sides[challenger][1]) if sides[champion] and sides[challenger]
                else ["the champion holds no per-question results"])

    for version in (champion, challenger):  # the same set asked of other task versions or definitions: this checkout's
        if differ() and root is not None and version not in rescored and sides[version] is not None:
            sides[version] = score(version)
    differ = differ()
    short = _covers(sides[challenger], target)
    if differ or short:
        raise OloraError(
            f"challenger {name} v{challenger} and champion v{champion} were scored on different questions "
            f"({'; '.join(differ or short)}); their means cannot be compared, and the gate compares only on the "
            "promote metric's whole set. Evaluate both with the same evaluate settings (or run `olora promote` from "
            "the project, which scores each side on the whole set first), or promote with --force"
        )
    return sides, rescored, seconds


def _compare(cfg: Config, champion_rows: list[dict], challenger_rows: list[dict]):
    """register.promote_metric's paired comparison of two sides' rows on the same questions."""
    from olora.core.paired import compare
    from olora.evaluation import samples

    metric = cfg.register.promote_metric.strip()
    key = "acc_norm" if metric == "mean_acc_norm" else "acc"
    ours, theirs = samples.table(challenger_rows, key), samples.table(champion_rows, key)
    weights = {t: float(len(q)) for t, q in ours.items()} if metric == "pooled_acc" else cfg.register.metric_weights()
    return compare(theirs, ours, cfg.register.confidence, cfg.register.resamples, weights=weights)


def paired_comparison(cfg: Config, c, name: str, challenger: str, champion: str, root: Path | None = None):
    """Challenger minus champion on the promote metric's whole question set (`comparison_set`, `olora.core.paired`).

    Returns (comparison, the set in words). Whichever side was asked fewer or other questions, or holds no
    per-question results, is first scored on the whole set when `root` (the project, for local base models) is
    given (`olora.tracking.rescore`, cached in its run). Otherwise, or when that fails, an OloraError names why
    no comparison can be made: never a comparison of means over different questions, nor over a smaller set.
    """
    ours, theirs = _load(c, name, challenger, champion, root)
    if root is None:  # nothing can be scored again: the challenger must hold the weighed tasks
        _check_weighs(cfg, cfg.register.metric_weights(), ours[1], f"{name} v{challenger}")
    target = comparison_set(cfg, ours[1], theirs[1] if theirs else None)
    sides, rescored, _ = _on_set(cfg, c, name, {challenger: ours, champion: theirs}, challenger, champion, target, root)
    comparison = _compare(cfg, sides[champion][0], sides[challenger][0])
    return comparison, question_set(target, comparison.n, rescored)


def sequential_comparison(cfg: Config, c, name: str, challenger: str, champion: str, root: Path,
                          whole_set: bool = True):
    """The sequential gate (`register.stages`, `olora.core.sequential`): both sides on each look's questions (the
    first N of each task of the comparison set; the last look at least the whole comparison set), looked at in turn
    until one decides. Returns (comparison at the deciding look with its adjusted interval, the set and the looks in
    words, the looks). `whole_set=False` (for experiments comparing designs only) looks at the stages alone, even
    where the sides hold more."""
    ours, theirs = _load(c, name, challenger, champion, root)
    final = comparison_set(cfg, ours[1], theirs[1] if theirs else None)
    found = {challenger: ours, champion: theirs}

    def sides_at(target: dict[str, Any]):
        sides, rescored, seconds = _on_set(cfg, c, name, found, challenger, champion, target, root)
        for version in rescored:  # the next look scores only the questions this one lacks
            found[version] = sides[version]
        return sides[champion][0], sides[challenger][0], rescored, seconds

    return run_looks(cfg, final, look_plan(cfg, final, root, whole_set), sides_at)


def look_plan(cfg: Config, final: dict[str, Any], root: Path, whole_set: bool = True) -> tuple[list[int], list[float]]:
    """The looks of the sequential gate on the comparison set `final`: (questions per task at each look, 0 the whole
    split; the critical value of each), from `register.stages`, `register.spending` and the split sizes under
    `root`'s evals/. A look that adds no question is dropped; with `whole_set` the last look is at least `final`."""
    from olora.core import sequential as seq
    from olora.evaluation.tasks import split_sizes
    from olora.layout import EVALS

    limits = list(cfg.register.stages)
    if whole_set and limits[-1] != 0 and (final["limit"] == 0 or final["limit"] > limits[-1]):
        limits.append(final["limit"])  # never decide on less than the whole comparison set
    splits = split_sizes(EvaluateConfig(tasks=final["tasks"], source=final["source"]), Path(root) / EVALS)
    looks_at, sizes = [], []
    for limit in limits:
        planned = seq.planned_sizes([limit], splits)[0]
        if not sizes or any(planned[t] > sizes[-1][t] for t in planned):  # a look that adds no question is dropped
            looks_at.append(limit)
            sizes.append(planned)
    metric, named = cfg.register.promote_metric.strip(), cfg.register.metric_weights()
    weights = ({t: n / sum(sizes[-1].values()) for t, n in sizes[-1].items()} if metric == "pooled_acc" else
               {t: 1 / len(splits) for t in splits} if named is None else
               {t: w / sum(named.values()) for t, w in named.items()})
    bounds = seq.boundaries(seq.information_fractions(sizes, weights), seq.false_promotion_rate(cfg.register.confidence),
                            cfg.register.spending)
    return looks_at, bounds


def run_looks(cfg: Config, final: dict[str, Any], plan: tuple[list[int], list[float]], sides_at):
    """Look at each planned set in turn until one decides. `sides_at(target)` gives both sides on the set `target`
    describes: (champion rows, challenger rows, {version: questions re-scored}, seconds spent scoring). Returns what
    `sequential_comparison` returns."""
    from olora.core import sequential as seq

    looks_at, bounds = plan
    looks, rescored_all = [], {}
    for k, limit in enumerate(looks_at):
        spec = {**{key: final[key] for key in ("tasks", "num_fewshot", "seed", "source")}, "limit": limit}
        target = {**spec, "sha256": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()}
        champion_rows, challenger_rows, rescored, seconds = sides_at(target)
        for v, n in rescored.items():
            rescored_all[v] = rescored_all.get(v, 0) + n
        comparison = _compare(cfg, champion_rows, challenger_rows)
        now = seq.look(comparison.diff, comparison.se, bounds[k], cfg.register.min_improvement, comparison.n,
                       last=k == len(looks_at) - 1, seconds=seconds)
        looks.append(now)
        if now.outcome != "continue":
            break
    words = "; ".join(f"n = {lk.n}: [{lk.low * 100:+.1f}, {lk.high * 100:+.1f}] at {lk.level * 100:.4g} % ({lk.outcome})"
                      for lk in looks)
    compared_on = (f"{question_set(target, comparison.n, rescored_all)}; look {len(looks)} of {len(looks_at)} "
                   f"({cfg.register.spending} spending; looks: {words})")
    return replace(comparison, low=now.low, high=now.high, confidence=now.level), compared_on, looks


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
    pooled = cfg.register.promote_metric.strip() == "pooled_acc"
    if weights is None and not pooled:
        return version_metric(c, name, version, cfg.register.promote_metric.strip())
    from olora.core.paired import score
    from olora.evaluation import samples

    found = version_questions(c, name, version)
    if found is None or set(weights or {}) - set(found[1].get("tasks", {})):
        return None
    table = samples.table(found[0])
    return score(table, {t: float(len(q)) for t, q in table.items()} if pooled else weights)


def promote(cfg: Config, tracking: Tracking, name: str | None = None, version: str | None = None,
            force: bool = False, report: Path | None = None, root: Path | None = None) -> Decision:
    """Compare challenger (or `version`) with champion on the promote metric's whole question set; move `champion`
    if the gain's interval lies above `register.min_improvement` (or with `force`).

    The alias moves first, then the decision is recorded (version tags, `promotion/v<N>.json` in the challenger's
    run, the model card and, with `report`, that local file), each call through the tracking retries: a run killed
    in between leaves a champion without its record, which the next `olora promote` completes (never a record
    saying "promoted" for a version that is not champion). With `root` (the project) a side asked fewer or other
    questions is scored on the whole set first."""
    name = name or model_name(cfg)
    c = open_model(tracking, name)
    version = find_version(c, name, CHALLENGER, version)
    champion = alias_version(c, name, CHAMPION)
    recovering = False
    if champion == version and not force:
        tags = tracking.call("reading the champion's tags", lambda: c.get_model_version(name, version).tags)
        if "promotion.decision" in tags:  # nothing to decide; keep the record of the original decision
            value = metric_value(cfg, c, name, version)
            return Decision(False, f"version {version} is already {CHAMPION}", value if value is not None else float("nan"),
                            value)
        # the alias was moved but the record never written (a promotion killed in between): decide again, record it
        recovering, champion = True, tags.get("previous_champion") or None
        log.info("promote: %s v%s is champion without a recorded decision; recording it (previous champion %s)",
                 name, version, champion)
    comparison, compared_on, looks = None, None, None
    if champion and champion != version:
        try:
            if cfg.register.stages and root is not None:
                comparison, compared_on, looks = sequential_comparison(cfg, c, name, version, champion, root)
            else:
                comparison, compared_on = paired_comparison(cfg, c, name, version, champion, root)
        except OloraError:
            if not (force or recovering):
                raise
    if comparison is not None and comparison.weights is not None:  # the values on the questions compared
        values = comparison.challenger_score, comparison.champion_score
    else:
        values = (metric_value(cfg, c, name, version),
                  metric_value(cfg, c, name, champion) if champion and champion != version else None)
    metric = cfg.register.promote_metric
    decision = decide(*values, comparison, cfg.register.min_improvement, force, metric, compared_on)
    if recovering and not decision.promote:  # the alias moved: an unforced gate is deterministic, so it was forced
        decision = replace(decision, promote=True, forced=True, reason="forced by --force: " + decision.reason)
    if recovering:
        decision = replace(decision, reason=decision.reason + " (recorded after an interrupted promotion)")
    if decision.promote and champion != version and not recovering:
        if champion:  # before the alias: what `olora rollback` and a recovering gate need
            tracking.call("tagging the previous champion",
                          lambda: c.set_model_version_tag(name, version, "previous_champion", champion))
        if "promotion.decision" in tracking.call("reading the tags", lambda: c.get_model_version(name, version).tags):
            # an earlier decision on this version (say, rejected) must not stand for this one if we die after the alias
            tracking.call("clearing the earlier decision",
                          lambda: c.delete_model_version_tag(name, version, "promotion.decision"))
        tracking.call("moving the champion alias", lambda: c.set_registered_model_alias(name, CHAMPION, version))
        marker("promote:alias-moved")
    record = decision_record(decision, name, version, champion, metric, compared_on, looks)
    tags = {f"promotion.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in record.items()
            if k not in ("tasks", "name", "version")}
    tags["promotion.p_values"] = json.dumps({t: e["p_value"] for t, e in record.get("tasks", {}).items()})
    tags = {"promotion.decision": tags.pop("promotion.decision"), **tags}
    for key, value in reversed(tags.items()):  # promotion.decision last: its presence means the record is whole
        tracking.call(f"tagging {key}", lambda key=key, value=value: c.set_model_version_tag(name, version, key, value))
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

        card = tracking.call("reading the model card", lambda: c.get_model_version(name, version).description) or ""
        tracking.call("updating the model card",
                      lambda: c.update_model_version(name, version, description=card + promotion_section(record)))
    log.info("promote %s v%s: %s (%s)", name, version, record["decision"], decision.reason)
    return decision


def decision_record(decision: Decision, name: str, version: str, champion: str | None, metric: str,
                    compared_on: str | None = None, looks: list | None = None) -> dict[str, Any]:
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
        if compared_on:
            out["question_set"] = compared_on
        if looks:  # the sequential gate: every look (n, interval, adjusted level), the questions and seconds spent
            out["looks"] = [lk.to_dict() for lk in looks]
            out["scoring_seconds"] = round(sum(lk.seconds for lk in looks), 3)
        if comparison.weights is not None:  # a task or weighted set (register.promote_metric)
            out["weights"] = comparison.weights
    return out
