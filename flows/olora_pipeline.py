"""Prefect flows: the DVC pipeline's stages as scheduled, retryable tasks.

The stages come from the one stage table (`olora.stages.STAGES`, from which dvc.yaml is generated):
each task calls the same library function that the stage's `dvc.yaml` command calls, after asking
DVC whether the stage is up to date, and records the new outputs in `dvc.lock` with `dvc commit`: DVC stays the judge of what is current and the record of
versions. Transient failures are retried with exponential backoff; a bad parameter or bad data
fails at once; a CUDA out-of-memory error in training retries with half the micro-batch and twice
the accumulation (the same effective batch), written back to params.yaml so dvc.lock tells the truth.

    python flows/olora_pipeline.py                      # one run, ephemeral Prefect API
    prefect deploy --all && prefect worker start ...    # scheduled runs (see prefect.yaml, README)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from olora import dvc
from olora.config import apply_overrides, config_from_dict, load_config
from olora.errors import OloraError
from olora.layout import RUN_FILE, Layout
from olora.locking import WorkspaceBusyError
from olora.stages import STAGES
from olora.tracking.client import TrackingError


def is_transient(exc: BaseException) -> bool:
    """Retry infrastructure failures; never retry a user error (bad params, bad data)."""
    if isinstance(exc, (TrackingError, WorkspaceBusyError)):  # a server that comes back, a run that finishes
        return True
    return not isinstance(exc, (OloraError, KeyboardInterrupt))


def _retry_condition(task_, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception
        return is_transient(exc)
    return False


def halved_batch(micro_batch_size: int, accumulation: int) -> tuple[int, int]:
    """OOM back-off: half the micro-batch, twice the accumulation (same effective batch)."""
    if micro_batch_size <= 1:
        raise OloraError("out of memory at train.micro_batch_size=1; enable train.gradient_checkpointing or use a smaller model")
    return micro_batch_size // 2, accumulation * 2


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _call_stage(stage: str, layout: Layout) -> None:
    if stage == "train":
        train_with_oom_backoff(layout)
    else:
        STAGES[stage].run(layout)


def train_with_oom_backoff(layout: Layout) -> dict[str, Any]:
    logger = get_run_logger()
    while True:
        try:
            return STAGES["train"].run(layout)
        except BaseException as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not _is_oom(exc):
                raise
            values = yaml.safe_load(layout.params.read_text())
            cfg = load_config(layout.params)
            micro, accumulation = halved_batch(cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps)
            values = apply_overrides(values, {"train.micro_batch_size": micro, "train.gradient_accumulation_steps": accumulation})
            config_from_dict(values)
            layout.params.write_text(yaml.safe_dump(values, sort_keys=False))
            logger.warning("out of memory in train: retrying with micro_batch_size=%s, gradient_accumulation_steps=%s", micro, accumulation)


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_condition,
      task_run_name="{stage}")
def run_stage(stage: str, root: str) -> dict[str, Any]:
    """Run one DVC stage unless DVC says it is up to date; record its outputs in dvc.lock."""
    logger = get_run_logger()
    layout = Layout(Path(root))
    if dvc.up_to_date(layout.root, stage):
        logger.info("stage %s is up to date (DVC); skipped", stage)
        return {"stage": stage, "ran": False, "seconds": 0.0}
    start = time.perf_counter()
    _call_stage(stage, layout)
    dvc.commit(layout.root, stage)
    seconds = time.perf_counter() - start
    logger.info("stage %s finished in %.1f s", stage, seconds)
    return {"stage": stage, "ran": True, "seconds": round(seconds, 2)}


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_condition)
def promote_challenger(root: str) -> str:
    from olora.tracking import registry

    layout = Layout(Path(root))
    decision = registry.promote(load_config(layout.params), layout.root)
    return ("promoted: " if decision.promote else "kept champion: ") + decision.reason


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_condition)
def dvc_push(root: str, remote: str | None = None) -> str:
    """Push data and adapters to the DVC remote (default: the repo's default remote); returns its report."""
    return dvc.run(Path(root), "push", *(["--remote", remote] if remote else [])).stdout.strip()


def write_overrides(root: Path, overrides: dict[str, Any]) -> None:
    """Apply `{"adapter.r": 16}`-style overrides to params.yaml, validated before anything runs."""
    params = root / "params.yaml"
    values = apply_overrides(yaml.safe_load(params.read_text()), overrides)
    config_from_dict(values)  # a bad override fails here, before any stage
    params.write_text(yaml.safe_dump(values, sort_keys=False))


def summary_markdown(root: Path, results: list[dict[str, Any]], extra: str = "") -> str:
    layout = Layout(root)
    lines = ["# olora-pipeline run", "", "| stage | ran | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {'yes' if r['ran'] else 'cached'} | {r['seconds']} |" for r in results]
    if layout.registration.is_file():
        reg = json.loads(layout.registration.read_text())
        if reg.get("registered"):
            lines += ["", f"Registered `{reg['model_uri']}` (MLflow run `{reg['run_id']}`, tracking `{reg['tracking_uri']}`)."]
    if layout.report.is_file():
        lines += ["", layout.report.read_text()]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


@flow(name="olora-pipeline", log_prints=True)
def olora_pipeline(root: str = ".", overrides: dict[str, Any] | None = None, promote: bool = False,
                   push: bool = True, remote: str | None = None) -> list[dict[str, Any]]:
    """prepare -> init -> train -> evaluate_base -> evaluate -> register [-> promote] -> dvc push."""
    path = Path(root).resolve()
    if overrides:
        write_overrides(path, overrides)
    else:
        load_config(path / "params.yaml")  # fail fast on a bad params file
    results = [run_stage(stage, str(path)) for stage in STAGES]
    extra = ""
    if promote:
        extra = "Promotion: " + promote_challenger(str(path))
    if push:
        pushed = dvc_push(str(path), remote)
        extra += f"\n\nDVC push: {pushed}"
    create_markdown_artifact(summary_markdown(path, results, extra), key="olora-pipeline-run", description="stages, scores, MLflow")
    return results


@flow(name="olora-sweep", log_prints=True)
def olora_sweep(root: str = ".", grid: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """Run every combination of `grid` (default init × r) as a DVC experiment; compare in a table."""
    import itertools

    grid = grid or {"adapter.init": ["olora", "lora"], "adapter.r": [8, 16, 32]}
    path = Path(root).resolve()
    keys = list(grid)
    rows = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        variant = dict(zip(keys, combo))
        config_from_dict(apply_overrides(yaml.safe_load((path / "params.yaml").read_text()), variant))
        rows.append(run_experiment(str(path), variant))
    table = ["| " + " | ".join(keys) + " | mean acc | val loss | MLflow run |", "|" + "---|" * (len(keys) + 3)]
    for row in rows:
        table.append("| " + " | ".join(str(row["variant"][k]) for k in keys)
                     + f" | {row['mean_acc']:.4f} | {row['final_val_loss']:.4f} | {row['run']} |")
    create_markdown_artifact("# olora sweep\n\n" + "\n".join(table), key="olora-sweep", description="variants compared")
    return rows


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_condition, task_run_name="exp {variant}")
def run_experiment(root: str, variant: dict[str, Any]) -> dict[str, Any]:
    args = ["exp", "run"]
    for key, value in variant.items():
        args += ["-S", f"{key}={value}"]
    dvc.run(Path(root), *args)
    layout = Layout(Path(root))
    tuned = json.loads(layout.metrics("eval_adapter").read_text())
    train = json.loads(layout.metrics("train").read_text())
    run = json.loads((layout.adapter / RUN_FILE).read_text()) if (layout.adapter / RUN_FILE).is_file() else {}
    uri = run.get("tracking_uri", "")
    link = f"{uri} run {run.get('run_id', '-')}" if run else "-"
    return {"variant": variant, "mean_acc": tuned["mean_acc"], "final_val_loss": train["final_val_loss"], "run": link}


if __name__ == "__main__":
    olora_pipeline()
