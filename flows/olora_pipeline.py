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

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from olora import dvc, workspace
from olora.envfile import stack_env
from olora.config import apply_overrides, config_from_dict, load_config
from olora.errors import OloraError
from olora.layout import RUN_FILE, Layout
from olora.locking import WorkspaceBusyError
from olora.stages import STAGES
from olora.tracking import runs
from olora.tracking.client import TrackingError, resolve_uri


def is_transient(exc: BaseException) -> bool:
    """Retry infrastructure failures; never retry a user error (bad params, bad data)."""
    if isinstance(exc, (TrackingError, WorkspaceBusyError, workspace.GitPushError)):  # a server that comes back, a run that finishes
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


def run_name() -> str:
    """This flow run's name and id (stable across retries and reruns of the same flow run), else a timestamp."""
    from prefect.runtime import flow_run

    if flow_run.id:
        return f"{flow_run.name}-{str(flow_run.id)[:8]}"
    return time.strftime("local-%Y%m%d-%H%M%S")


@contextlib.contextmanager
def shared_tracking(source: Path, enabled: bool = True):
    """While a flow runs: runs in workspaces log to the source project's tracking store, not to one in the workspace.

    Set for this flow only and restored afterwards, so nothing else in the process inherits it.
    """
    import os

    cfg = load_config(source / "params.yaml")
    set_here = enabled and not cfg.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI")
    if set_here:
        os.environ["MLFLOW_TRACKING_URI"] = resolve_uri(cfg.tracking, source)
    try:
        yield
    finally:
        if set_here:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_condition)
def open_workspace(source: str, name: str) -> str:
    """The run's own workspace (a clone of the source's commit); a rerun of the same flow run continues in it."""
    target = workspace.runs_dir(Path(source)) / workspace.safe_name(name)
    if target.is_dir():
        get_run_logger().info("continuing in the workspace %s (an earlier attempt of this run)", target)
        return str(target)
    return str(workspace.create(Path(source), name))


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_condition)
def record_run(ws: str, name: str, overrides: dict[str, Any] | None, push: bool) -> dict[str, Any]:
    """Commit the run on runs/<name>, push data (DVC) and branch (git); tag the MLflow run and version with it."""
    layout = Layout(Path(ws))
    message = f"olora run {name}" + (f": {json.dumps(overrides, sort_keys=True)}" if overrides else "")
    rec = workspace.record(layout.root, name, message, push=push)
    tags = {"olora.run_name": name, "olora.git_branch": rec.branch, "olora.git_commit": rec.commit, "olora.git_remote": rec.git_remote,
            "olora.source_commit": rec.source_commit, "olora.dvc_pushed": str(rec.dvc_pushed).lower()}
    reg = json.loads(layout.registration.read_text()) if layout.registration.is_file() else {}
    run = json.loads((layout.adapter / RUN_FILE).read_text()) if (layout.adapter / RUN_FILE).is_file() else {}
    cfg = load_config(layout.params)
    if cfg.tracking.enabled and (run or reg.get("registered")):
        runs.tag_recorded(cfg, layout.root, tags, run.get("run_id"), reg.get("name"), reg.get("version"))
    return {**tags, "registered": reg.get("model_uri", "")}


@flow(name="olora-pipeline", log_prints=True)
def olora_pipeline(root: str = ".", overrides: dict[str, Any] | None = None, promote: bool = False,
                   push: bool = True, isolate: bool = True, name: str | None = None) -> dict[str, Any]:
    """prepare -> init -> train -> evaluate_base -> evaluate -> register [-> promote], in a workspace of its own.

    With `isolate` (the default) the run clones `root`'s commit into its own workspace, applies the
    overrides there, and ends as a commit on runs/<name> pushed to the git remote, its data and
    adapters pushed to the DVC remote (`push`); `root` itself is never written. `isolate=False`
    runs in `root` (a developer's own checkout), as `dvc repro` would.
    """
    source = Path(root).resolve()
    load_config(source / "params.yaml")  # fail fast on a bad params file
    if overrides:
        config_from_dict(apply_overrides(yaml.safe_load((source / "params.yaml").read_text()), overrides))  # and bad overrides
    name = name or run_name()
    with stack_env(source), shared_tracking(source, isolate):  # the team's services (stack.env), else the source's store
        return _pipeline(source, overrides, promote, push, isolate, name)


def _pipeline(source: Path, overrides: dict[str, Any] | None, promote: bool, push: bool, isolate: bool,
              name: str) -> dict[str, Any]:
    path = Path(open_workspace(str(source), name)) if isolate else source
    if overrides:
        write_overrides(path, overrides)
    results = [run_stage(stage, str(path)) for stage in STAGES]
    extra = ""
    if promote:
        extra = "Promotion: " + promote_challenger(str(path))
    record: dict[str, Any] = {}
    if isolate:
        record = record_run(str(path), name, overrides, push)
        extra += f"\n\nRecorded as `{record['olora.git_branch']}` ({record['olora.git_commit'][:12]}) in {record['olora.git_remote']}"
    elif push:
        extra += f"\n\nDVC push: {dvc_push(str(path))}"
    create_markdown_artifact(summary_markdown(path, results, extra), key="olora-pipeline-run", description="stages, scores, MLflow")
    if isolate:
        workspace.remove(path)  # recorded and pushed: nothing left only here
    return {"name": name, "stages": results, **record}


@flow(name="olora-sweep", log_prints=True)
def olora_sweep(root: str = ".", grid: dict[str, list[Any]] | None = None, deployment: str | None = None,
                push: bool = True) -> list[dict[str, Any]]:
    """Every combination of `grid` (default init × r) as its own isolated pipeline run; compared in one table.

    With `deployment` (e.g. "olora-pipeline/on-demand") each variant is a separate flow run of that
    deployment, so any free worker picks it up; the comparison waits for all of them. Without it the
    variants run here one after another, as subflows. Either way each variant is recorded on its
    own runs/ branch, and the table is built from the shared MLflow store.
    """
    import itertools

    grid = grid or {"adapter.init": ["olora", "lora"], "adapter.r": [8, 16, 32]}
    source = Path(root).resolve()
    keys = list(grid)
    variants = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    base = yaml.safe_load((source / "params.yaml").read_text())
    for variant in variants:  # every variant checked before any runs
        config_from_dict(apply_overrides(base, variant))
    prefix = run_name()
    names = [f"{prefix}-v{i}" for i in range(len(variants))]
    cfg = load_config(source / "params.yaml")
    with stack_env(source), shared_tracking(source, not deployment):
        return _sweep(source, cfg, keys, variants, names, deployment, push)


def _sweep(source: Path, cfg, keys: list[str], variants: list[dict[str, Any]], names: list[str],
           deployment: str | None, push: bool) -> list[dict[str, Any]]:
    states: dict[str, str] = {}
    if cfg.tracking.enabled:  # reach (and, for a new SQLite store, create) the tracking store once, before variants race to
        from olora.tracking.client import client

        client(cfg.tracking, source)
    if deployment:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        started = {n: run_deployment(deployment, parameters={"overrides": v, "name": n, "promote": False, "push": push},
                                     timeout=0).id for v, n in zip(variants, names)}
        with get_client(sync_client=True) as prefect_client:  # wait for all of them, whichever workers run them
            while len(states) < len(started):
                for n, flow_run_id in started.items():
                    state = prefect_client.read_flow_run(flow_run_id).state
                    if n not in states and state is not None and state.is_final():
                        states[n] = state.type.value
                        get_run_logger().info("variant %s: %s", n, states[n])
                time.sleep(2)
    else:
        for v, n in zip(variants, names):
            try:
                olora_pipeline(root=str(source), overrides=v, name=n, promote=False, push=push)
                states[n] = "COMPLETED"
            except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others
                get_run_logger().error("variant %s failed: %s", v, exc)
                states[n] = "FAILED"
    rows = [{"variant": v, "name": n, "state": states[n], **variant_result(cfg, source, n)} for v, n in zip(variants, names)]
    table = ["| " + " | ".join(keys) + " | state | mean acc | val loss | MLflow run | recorded as |", "|" + "---|" * (len(keys) + 5)]
    for row in rows:
        acc = f"{row['mean_acc']:.4f}" if row["mean_acc"] is not None else "-"
        loss = f"{row['final_val_loss']:.4f}" if row["final_val_loss"] is not None else "-"
        table.append("| " + " | ".join(str(row["variant"][k]) for k in keys)
                     + f" | {row['state']} | {acc} | {loss} | {row['run']} | {row['branch']} |")
    create_markdown_artifact("# olora sweep\n\n" + "\n".join(table), key="olora-sweep", description="variants compared")
    return rows


def variant_result(cfg, root: Path, name: str) -> dict[str, Any]:
    """A recorded run's scores, looked up in the shared MLflow store by its run name tag."""
    from olora.tracking.client import client, experiment_id

    c = client(cfg.tracking, root)
    found = c.search_runs([experiment_id(c, cfg.tracking, root)], filter_string=f"tags.`olora.run_name` = '{name}'")
    if not found:
        return {"mean_acc": None, "final_val_loss": None, "run": "-", "branch": "-"}
    run = found[0]
    return {"mean_acc": run.data.metrics.get("eval/mean_acc"), "final_val_loss": run.data.metrics.get("train/final_val_loss"),
            "run": run.info.run_id, "branch": run.data.tags.get("olora.git_branch", "-")}


if __name__ == "__main__":
    olora_pipeline()
