"""Scoring a registered version on other questions: each side of the gate asked the whole comparison set.

Used by the promotion gate when the champion or the challenger was scored on fewer or other questions
than the promote metric's whole set (other tasks, a smaller limit, few-shot count, task versions, the
definition of a team task under evals/) or holds no per-question results at all (registered before
them): its exported adapter is downloaded from its run, merged into its base and put through the same
evaluation code as the evaluate stage, with the set's evaluation settings and this checkout's evals/.
The result is cached in that version's run (`eval/rescored/<sha of the set>/`), so the next gate reuses it.
A side that already holds the first questions of each task of the set (its own evaluation at a smaller limit, or
the sequential gate's previous look) is scored on the questions it lacks only, when the set is zero-shot (lm-eval
draws a few-shot question's examples from one seeded stream over the questions scored before it, so those are
scored whole).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from olora.config import Config, EvaluateConfig, ModelConfig
from olora.errors import OloraError
from olora.evaluation import samples
from olora.evaluation.result import EvalResult, MetricsFileError
from olora.layout import RESCORED_ARTIFACTS, metrics_file, samples_file

log = logging.getLogger("olora")
SAMPLES, METRICS = samples_file("adapter"), metrics_file("eval_adapter")  # as the evaluate stage names them
SCORED = "scored.json"
"""Beside a cached set: how many of its questions the gate scored (the rest were held); absent: all of them."""


def _cached(c, run_id: str, sha: str, folder: Path):
    from mlflow.exceptions import MlflowException

    try:
        rows = samples.read_samples(Path(c.download_artifacts(run_id, f"{RESCORED_ARTIFACTS}/{sha}/{SAMPLES}", str(folder))))
        metrics = Path(c.download_artifacts(run_id, f"{RESCORED_ARTIFACTS}/{sha}/{METRICS}", str(folder)))
        asked = EvalResult.from_json(json.loads(metrics.read_text()), str(metrics)).questions
    except (MlflowException, OSError, samples.SamplesError, MetricsFileError):
        return None
    try:
        scored = int(json.loads(Path(c.download_artifacts(run_id, f"{RESCORED_ARTIFACTS}/{sha}/{SCORED}", str(folder))).read_text())["scored"])
    except (MlflowException, OSError, ValueError, KeyError, TypeError):
        scored = len(rows)  # cached before the count was kept: it was scored whole
    return rows, asked, scored


def extendable(held: tuple[list[dict], dict] | None, asked: dict[str, Any], splits: dict[str, int]) -> dict[str, list[int]] | None:
    """Pure. The questions (task -> indices in its split) `held` lacks of the set `asked` describes, when `held` is
    each of its tasks' first questions (a limited evaluation) with the same settings and the set is zero-shot;
    None when it must be scored whole. `splits`: each task's split size."""
    if held is None or asked["num_fewshot"] or not held[1].get("limit"):
        return None
    rows, have = held
    if sorted(have["tasks"]) != sorted(asked["tasks"]) or any(have.get(k) != asked[k] for k in ("num_fewshot", "seed", "source")):
        return None
    want = asked["limit"]
    if want and want <= have["limit"]:
        return None
    missing = {}
    for task in asked["tasks"]:
        ids = sorted(r["doc_id"] for r in rows if r["task"] == task)
        if ids != list(range(min(have["limit"], splits[task]))):
            return None  # not the first questions of the task
        end = splits[task] if not want else min(want, splits[task])
        if end > len(ids):
            missing[task] = list(range(len(ids), end))
    return missing or None


def same_definitions(held: dict[str, Any], new: dict[str, Any]) -> bool:
    """Pure. Whether every task of a run's fingerprint `new` has the lm-eval version and (team task) definition
    the held fingerprint records: the held questions were asked of the same tasks as the new ones."""
    return all(held["tasks"].get(t, {}).get("version") == e.get("version")
               and held["tasks"].get(t, {}).get("definition") == e.get("definition") for t, e in new["tasks"].items())


def merged_result(held: tuple[list[dict], dict], new, asked: dict[str, Any], splits: dict[str, str]):
    """Pure. The held rows plus a run's (`olora.evaluation.harness.Evaluation`) on the questions they lacked, as one
    evaluation of the set `asked` describes: rows, and an EvalResult whose scores and fingerprint are the union's
    (its timing the run's, what scoring the lacking questions took). `splits`: each task's split name."""
    import math
    from dataclasses import replace

    from olora.config import EvaluateConfig
    from olora.evaluation.result import TaskScore, summary
    from olora.evaluation.samples import fingerprint

    rows = sorted([*held[0], *new.rows], key=lambda r: (r["task"], r["doc_id"]))
    tasks = {}
    for task in sorted(asked["tasks"]):
        mine = [r for r in rows if r["task"] == task]
        scores = {}
        for key in ("acc", "acc_norm"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if len(values) == len(mine) and values:
                mean = sum(values) / len(values)
                scores[key] = mean
                scores[f"{key}_stderr"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
                                           if len(values) > 1 else math.nan)
        before = new.metrics.tasks.get(task)
        tasks[task] = TaskScore(n=len(mine), split=splits[task], scored_by=before.scored_by if before else None, **scores)
    settings = EvaluateConfig(tasks=sorted(asked["tasks"]), limit=asked["limit"], num_fewshot=asked["num_fewshot"],
                              seed=asked["seed"], source=asked["source"])
    versions = {t: e.get("version") for t, e in held[1]["tasks"].items()}
    definitions = {t: e["definition"] for t, e in held[1]["tasks"].items() if "definition" in e}
    return rows, replace(summary(tasks, asked["limit"]), timing=new.metrics.timing,
                         questions=fingerprint(rows, settings, versions, definitions))


def rescore(cfg: Config, c, name: str, version: str, asked: dict[str, Any], root: Path,
            held: tuple[list[dict], dict] | None = None) -> tuple[list[dict], dict, int]:
    """`version`'s per-question results on the questions `asked` describes (tasks, limit, num_fewshot, seed, source
    and `sha256`, the cache key: `olora.tracking.gate.comparison_set`) and how many of them were scored for it (the
    others were held); cached in its run. `held`: what the version already holds of the set (rows, fingerprint);
    only the questions it lacks are scored when it is each task's first questions (`extendable`)."""
    mv = c.get_model_version(name, version)
    if not mv.run_id:
        raise OloraError(f"{name} version {version} comes from no run, so its adapter cannot be scored again; promote with --force")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hit = _cached(c, mv.run_id, asked["sha256"], tmp / "cache")
        if hit is not None:
            log.info("promote: %s v%s was scored on these questions before (cached in run %s)", name, version, mv.run_id)
            return hit
        run = c.get_run(mv.run_id)
        base = mv.tags.get("base_model") or run.data.tags.get("base_model")
        try:
            adapter = Path(c.download_artifacts(mv.run_id, "exported_adapter", str(tmp / "adapter")))
        except Exception as exc:  # noqa: BLE001 - any storage error: the adapter is not there
            raise OloraError(f"the exported adapter of {name} version {version} could not be loaded from its run "
                             f"{mv.run_id} ({type(exc).__name__}: {exc}); it cannot be scored on the "
                             "comparison set. Re-register it, or promote with --force") from None
        if not base:
            raise OloraError(f"{name} version {version} does not name its base model (tag base_model); promote with --force")
        from olora.evaluation.harness import load_model_for_eval, run_lm_eval
        from olora.evaluation.tasks import prepared
        from olora.layout import EVALS
        from olora.modeling.models import load_tokenizer, resolve_model
        from olora.modeling.runtime import resolve_runtime

        params = run.data.params
        model_cfg = ModelConfig(name=base, revision=params.get("model.revision", cfg.model.revision),
                                dtype=cfg.model.dtype, device=cfg.model.device)
        evaluate = EvaluateConfig(tasks=list(asked["tasks"]), limit=asked["limit"], num_fewshot=asked["num_fewshot"],
                                  seed=asked["seed"], source=asked["source"], batch_size=cfg.evaluate.batch_size)
        evaluate.validate()
        ref = resolve_model(model_cfg, root)
        from olora.evaluation.tasks import split_sizes

        only = extendable(held, asked, split_sizes(evaluate, Path(root) / EVALS)) if held is not None else None
        log.info("promote: scoring %s v%s on %s (%s)", name, version,
                 "the comparison set" if only is None else f"the {sum(map(len, only.values()))} questions of the "
                 "comparison set it lacks", ", ".join(evaluate.tasks))
        with prepared(evaluate, Path(root) / EVALS) as tasks:  # the team's tasks as this checkout defines them
            model = load_model_for_eval(ref, resolve_runtime(model_cfg, cfg.runtime), adapter)
            result = run_lm_eval(model, load_tokenizer(ref), evaluate, tasks=tasks, only=only)
            if only is not None and not same_definitions(held[1], result.metrics.questions):
                log.info("promote: %s v%s's held questions were asked of other task versions or definitions than "
                         "this checkout's; scoring it on the whole comparison set", name, version)
                only, result = None, run_lm_eval(model, load_tokenizer(ref), evaluate, tasks=tasks)
            split_names = dict(tasks.split)
        rows, metrics = (result.rows, result.metrics) if only is None else merged_result(held, result, asked, split_names)
        scored = len(result.rows)
        out = tmp / "rescored"
        samples.write_samples(out / SAMPLES, rows)
        (out / METRICS).write_text(json.dumps(metrics.to_json(), indent=2) + "\n")
        (out / SCORED).write_text(json.dumps({"scored": scored}) + "\n")
        for path in (out / SAMPLES, out / METRICS, out / SCORED):
            c.log_artifact(mv.run_id, str(path), f"{RESCORED_ARTIFACTS}/{asked['sha256']}")
        return rows, metrics.questions, scored
