"""Scoring a registered version on other questions: each side of the gate asked the whole comparison set.

Used by the promotion gate when the champion or the challenger was scored on fewer or other questions
than the promote metric's whole set (other tasks, a smaller limit, few-shot count, task versions, the
definition of a team task under evals/) or holds no per-question results at all (registered before
them): its exported adapter is downloaded from its run, merged into its base and put through the same
evaluation code as the evaluate stage, with the set's evaluation settings and this checkout's evals/.
The result is cached in that version's run (`eval/rescored/<sha of the set>/`), so the next gate reuses it.
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


def _cached(c, run_id: str, sha: str, folder: Path):
    from mlflow.exceptions import MlflowException

    try:
        rows = samples.read_samples(Path(c.download_artifacts(run_id, f"{RESCORED_ARTIFACTS}/{sha}/{SAMPLES}", str(folder))))
        metrics = Path(c.download_artifacts(run_id, f"{RESCORED_ARTIFACTS}/{sha}/{METRICS}", str(folder)))
        asked = EvalResult.from_json(json.loads(metrics.read_text()), str(metrics)).questions
    except (MlflowException, OSError, samples.SamplesError, MetricsFileError):
        return None
    return rows, asked


def rescore(cfg: Config, c, name: str, version: str, asked: dict[str, Any], root: Path) -> tuple[list[dict], dict]:
    """`version`'s per-question results on the questions `asked` describes (tasks, limit, num_fewshot, seed, source
    and `sha256`, the cache key: `olora.tracking.gate.comparison_set`); cached in its run."""
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
        log.info("promote: scoring %s v%s on the comparison set (%s)", name, version, ", ".join(evaluate.tasks))
        with prepared(evaluate, Path(root) / EVALS) as tasks:  # the team's tasks as this checkout defines them
            result = run_lm_eval(load_model_for_eval(ref, resolve_runtime(model_cfg, cfg.runtime), adapter),
                                 load_tokenizer(ref), evaluate, tasks=tasks)
        out = tmp / "rescored"
        samples.write_samples(out / SAMPLES, result.rows)
        (out / METRICS).write_text(json.dumps(result.metrics.to_json(), indent=2) + "\n")
        for path in (out / SAMPLES, out / METRICS):
            c.log_artifact(mv.run_id, str(path), f"{RESCORED_ARTIFACTS}/{asked['sha256']}")
        return result.rows, result.metrics.questions
