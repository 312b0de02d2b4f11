"""Prefect flows: the DVC pipeline's stages as scheduled, retryable tasks, thin over `olora.orchestration.pipeline`
(stage under DVC, retries, OOM back-off, recording); the tracking server is resolved once per flow run.

    python flows/olora_pipeline.py                      # one run, ephemeral Prefect API
    prefect deploy --all && prefect worker start ...    # scheduled runs (see prefect.yaml, docs/orchestration.md)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from olora import dvc
from olora.config import edit_params, load_config
from olora.layout import Layout
from olora.ops.envfile import stack_env
from olora.orchestration import pipeline as P
from olora.orchestration import workspace
from olora.stages import STAGES
from olora.tracking.client import Tracking

P.library_logs_to_prefect()  # the workspace, stage and recording lines in the flow run's logs

is_transient, halved_batch = P.is_transient, P.halved_batch  # the retry rule and the OOM back-off (olora.orchestration)


def _retry_condition(task_, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception
        return P.is_transient(exc)
    return False


RETRY = dict(retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_retry_condition)


@task(retries=2, task_run_name="{stage}", **RETRY)
def run_stage(stage: str, root: str, tracking: Tracking) -> P.StageRun:
    return P.run_stage(stage, Layout(Path(root)), tracking)


@task(retries=2, **RETRY)
def promote_challenger(root: str, tracking: Tracking) -> str:
    return P.promote(Layout(Path(root)), tracking)


@task(retries=3, **RETRY)
def dvc_push(root: str) -> str:
    return dvc.run(Path(root), "push").stdout.strip()


@task(retries=2, **RETRY)
def open_workspace(source: str, name: str, commit: str | None = None) -> str:
    return str(P.open_workspace(Path(source), name, commit))


@task(retries=3, **RETRY)
def record_run(ws: str, name: str, overrides: dict[str, Any] | None, push: bool, tracking: Tracking) -> P.Recorded:
    return P.record(Layout(Path(ws)), name, overrides, push, tracking)


def run_name() -> str:
    """This flow run's name and id (stable across retries and reruns of the same flow run), else a timestamp."""
    from prefect.runtime import flow_run

    return f"{flow_run.name}-{str(flow_run.id)[:8]}" if flow_run.id else time.strftime("local-%Y%m%d-%H%M%S")


# log_prints off: it would log dill's disassembly (printed to find a function's globals); the library logs instead
@flow(name="olora-pipeline", log_prints=False)
def olora_pipeline(root: str = ".", overrides: dict[str, Any] | None = None, promote: bool = False,
                   push: bool = True, isolate: bool = True, name: str | None = None,
                   commit: str | None = None) -> dict[str, Any]:
    """prepare -> init -> train -> evaluate_base -> evaluate -> register [-> promote], in a workspace of its own.

    With `isolate` (the default) the run clones `root`'s commit into its own workspace, applies the
    overrides there, and ends as a commit on runs/<name> pushed to the git remote, its data and
    adapters pushed to the DVC remote (`push`); `root` itself is never written. `isolate=False`
    runs in `root` (a developer's own checkout), as `dvc repro` would. `commit` runs on that commit
    instead of `root`'s (an `olora.data.published` event's, through the on-new-data deployment).
    """
    source = Path(root).resolve()
    P.preflight(source, overrides, commit)  # a bad params file, override or setting a stage would refuse: no work
    name = name or run_name()
    with stack_env(source):  # the team's services (stack.env), else the source project's own store
        tracking = Tracking.of(load_config(Layout(source).params, overrides), source)  # tracking.uri may be overridden
        P.check_durable(source, name if isolate else None, tracking, push)  # stores that outlive the run, or refused
        path = Path(open_workspace(str(source), name, commit)) if isolate else P.not_a_commit(source, commit)
        if overrides:
            edit_params(Layout(path).params, overrides)
        if commit is not None:  # that commit's params with the overrides, before any stage
            P.preflight(path, None)
        results = [run_stage(stage, str(path), tracking) for stage in STAGES]
        extra = "Promotion: " + promote_challenger(str(path), tracking) if promote else ""
        recorded = record_run(str(path), name, overrides, push, tracking) if isolate else None
        if recorded is not None:
            rec = recorded.record
            extra += f"\n\nRecorded as `{rec.git_branch}` ({rec.git_commit[:12]}) in {rec.git_remote}"
        elif push:
            extra += f"\n\nDVC push: {dvc_push(str(path))}"
        create_markdown_artifact(P.summary_markdown(path, results, extra), key="olora-pipeline-run",
                                 description="stages, scores, MLflow")
        if isolate:
            workspace.remove(path)  # recorded and pushed: nothing left only here
    return {"name": name, "stages": [r.to_json() for r in results], **(recorded.to_json() if recorded else {})}


@flow(name="olora-sweep", log_prints=False)
def olora_sweep(root: str = ".", grid: dict[str, list[Any]] | None = None, deployment: str | None = None,
                push: bool = True) -> list[dict[str, Any]]:
    """Every combination of `grid` (default init × r) as its own isolated pipeline run; compared in one table.

    With `deployment` (e.g. "olora-pipeline/on-demand") each variant is a separate flow run of that
    deployment, so any free worker picks it up; the comparison waits for all of them. Without it the
    variants run here one after another, as subflows. Either way each variant is recorded on its
    own runs/ branch, and the table is built from the shared MLflow store.
    """
    source = Path(root).resolve()
    variants = P.variants(source, grid)  # every variant checked before any runs
    keys = list(variants[0])
    names = [f"{run_name()}-v{i}" for i in range(len(variants))]
    with stack_env(source):
        tracking = Tracking.of(load_config(Layout(source).params), source)
        P.check_durable(source, None, tracking, push)
        if tracking.enabled:  # reach (and, for a new SQLite store, create) the store once, before variants race to
            tracking.client()
        if deployment:  # separate flow runs of that deployment, whichever workers pick them up
            states = P.run_on_deployment(deployment, variants, names, push)
        else:
            states = {}
            for v, n in zip(variants, names):
                try:
                    olora_pipeline(root=str(source), overrides=v, name=n, promote=False, push=push)
                    states[n] = "COMPLETED"
                except Exception as exc:  # noqa: BLE001 - one failed variant must not hide the others
                    get_run_logger().error("variant %s failed: %s", v, exc)
                    states[n] = "FAILED"
        rows = [{"variant": v, "name": n, "state": states[n], **P.variant_result(tracking, n).to_json()} for v, n in zip(variants, names)]
    create_markdown_artifact(P.sweep_table(keys, rows), key="olora-sweep", description="variants compared")
    return rows


if __name__ == "__main__":
    olora_pipeline()
