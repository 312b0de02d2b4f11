"""What the Prefect flows do, as plain functions: run a stage under DVC's judgement, the retry rule, the
CUDA out-of-memory back-off, recording a run, and the sweep's variants, deployment runs and table.

The flows (`flows/olora_pipeline.py`) wrap these in tasks and flows; only `run_on_deployment` (and its
`start_runs`, `wait_final`) talk to Prefect, so each rule is testable without it.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from olora import dvc
from olora.config import edit_params, load_config
from olora.data.versions import data_version
from olora.errors import OloraError
from olora.layout import DATA, RUN_FILE, Layout
from olora.orchestration import durable, workspace
from olora.stages import STAGES
from olora.stages.lock import WorkspaceBusyError
from olora.tracking.client import Tracking, TrackingError
from olora.tracking.lineage import TAGS, RunRecord

log = logging.getLogger("olora")
DEFAULT_GRID = {"adapter.init": ["olora", "lora"], "adapter.r": [8, 16, 32]}


def is_transient(exc: BaseException) -> bool:
    """Retry infrastructure failures; never retry a user error (bad params, bad data)."""
    if isinstance(exc, (TrackingError, WorkspaceBusyError, workspace.GitPushError)):  # a server that comes back, a run that finishes
        return True
    return not isinstance(exc, (OloraError, KeyboardInterrupt))


def halved_batch(micro_batch_size: int, accumulation: int) -> tuple[int, int]:
    """OOM back-off: half the micro-batch, twice the accumulation (same effective batch)."""
    if micro_batch_size <= 1:
        raise OloraError("out of memory at train.micro_batch_size=1; enable train.gradient_checkpointing or use a smaller model")
    return micro_batch_size // 2, accumulation * 2


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def train_with_oom_backoff(layout: Layout, tracking: Tracking | None = None) -> dict[str, Any]:  # the train stage's record
    """The train stage; on CUDA out-of-memory, half the micro-batch and twice the accumulation (the same
    effective batch), written back to params.yaml so dvc.lock tells the truth, until it fits."""
    while True:
        try:
            return STAGES["train"].run(layout, tracking=tracking)
        except BaseException as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if not is_oom(exc):
                raise
            t = load_config(layout.params).train
            micro, accumulation = halved_batch(t.micro_batch_size, t.gradient_accumulation_steps)
            edit_params(layout.params, {"train.micro_batch_size": micro, "train.gradient_accumulation_steps": accumulation})
            log.warning("out of memory in train: retrying with micro_batch_size=%s, gradient_accumulation_steps=%s",
                        micro, accumulation)


@dataclass(frozen=True)
class StageRun:
    """One stage of a flow run: whether it ran (or DVC found it up to date) and how long it took."""

    stage: str
    ran: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "ran": self.ran, "seconds": self.seconds}


def run_stage(stage: str, layout: Layout, tracking: Tracking | None = None) -> StageRun:
    """Run one stage unless DVC says it is up to date, then record its outputs in dvc.lock (`dvc commit`)."""
    if dvc.up_to_date(layout.root, stage):
        log.info("stage %s is up to date (DVC); skipped", stage)
        return StageRun(stage, False, 0.0)
    start = time.perf_counter()
    if stage == "train":
        train_with_oom_backoff(layout, tracking)
    else:
        STAGES[stage].run(layout, **({"tracking": tracking} if STAGES[stage].tracked else {}))
    dvc.commit(layout.root, stage)
    seconds = time.perf_counter() - start
    log.info("stage %s finished in %.1f s", stage, seconds)
    return StageRun(stage, True, round(seconds, 2))


def promote(layout: Layout, tracking: Tracking) -> str:
    from olora.tracking import gate

    from olora.layout import PROMOTION

    decision = gate.promote(load_config(layout.params), tracking, report=layout.path(PROMOTION), root=layout.root)
    return ("promoted: " if decision.promote else "kept champion: ") + decision.reason


def check_durable(source: Path, name: str | None, tracking: Tracking, push: bool) -> None:
    """Before any stage: refuse a run whose tracking store or DVC remote lies in a folder deleted when it ends (its
    workspace `name`, or the deployment's temporary clone `source`), naming the store and the fix."""
    ws = workspace.runs_dir(source) / workspace.safe_name(name) if name else None
    durable.check(source, tracking, durable.run_folders(source, ws), push, f"flow run {name}" if name else "this flow run")


def library_logs_to_prefect() -> None:
    """The library's own lines (logger `olora`: workspace, stages, recording) in the flow run's logs.

    Deployments set PREFECT_LOGGING_EXTRA_LOGGERS=olora in the worker's job environment (prefect.yaml), read when the
    engine configures logging; a flow started otherwise (`python flows/...`, a test) gets the same handlers here. The
    level: Prefect's root logger passes WARNING and up only.
    """
    import prefect  # noqa: F401 - importing it configures Prefect's logging (the handlers copied below)

    logger = logging.getLogger("olora")
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    for handler in logging.getLogger("prefect.extra").handlers:
        if not any(type(h) is type(handler) for h in logger.handlers):
            logger.addHandler(handler)


def open_workspace(source: Path, name: str, commit: str | None = None) -> Path:
    """The run's own workspace (a clone of the source's commit, or of `commit`); a rerun of the same flow run continues in it."""
    target = workspace.runs_dir(source) / workspace.safe_name(name)
    if target.is_dir():
        log.info("continuing in the workspace %s (an earlier attempt of this run)", target)
        return target
    return workspace.create(source, name, commit)


def not_a_commit(source: Path, commit: str | None) -> Path:
    """`isolate=False` runs in the checkout as it is: a requested commit is refused rather than ignored."""
    if commit:
        raise OloraError(f"commit={commit!r} needs isolate=True (the run checks that commit out in a workspace of its "
                         f"own); {source} itself is never switched to another commit")
    return source


def record(layout: Layout, name: str, overrides: dict[str, Any] | None, push: bool, tracking: Tracking) -> Recorded:
    """Commit the run on runs/<name>, push data (DVC) and branch (git); tag the MLflow run and version with it."""
    from olora.tracking import runs

    message = f"olora run {name}" + (f": {json.dumps(overrides, sort_keys=True)}" if overrides else "")
    rec = workspace.record(layout.root, name, message, push=push)
    record = RunRecord(git_branch=rec.branch, git_commit=rec.commit, run_name=name, git_remote=rec.git_remote,
                       source_commit=rec.source_commit, dvc_pushed=rec.dvc_pushed)
    try:  # the data version the run trained on (the event-triggered runs' key): data/raw's content ids at that commit
        record = replace(record, data_version=data_version(layout.root, rec.source_commit).hash,
                         data_commit=rec.source_commit)
        record = replace(record, data_hash=dvc.out_hash(layout.root, "prepare", DATA))  # the prepared data, as the run records it
    except OloraError as exc:
        log.warning("no data version recorded: %s", exc)
    reg = json.loads(layout.registration.read_text()) if layout.registration.is_file() else {}
    run = json.loads((layout.adapter / RUN_FILE).read_text()) if (layout.adapter / RUN_FILE).is_file() else {}
    if tracking.enabled and (run or reg.get("registered")):
        runs.tag_recorded(tracking, record.to_tags(), run.get("run_id"), reg.get("name"), reg.get("version"))
    return Recorded(record, reg.get("model_uri", ""))


@dataclass(frozen=True)
class Recorded:
    """What `record` did: the run's record (its tags) and the registered model's URI ("" when none)."""

    record: RunRecord
    registered: str

    def to_json(self) -> dict[str, str]:
        """The tags and `registered`: what the olora-pipeline flow returns."""
        return {**self.record.to_tags(), "registered": self.registered}


def summary_markdown(root: Path, results: list[StageRun], extra: str = "") -> str:
    layout = Layout(root)
    lines = ["# olora-pipeline run", "", "| stage | ran | seconds |", "|---|---|---|"]
    lines += [f"| {r.stage} | {'yes' if r.ran else 'cached'} | {r.seconds} |" for r in results]
    if layout.registration.is_file():
        reg = json.loads(layout.registration.read_text())
        if reg.get("registered"):
            lines += ["", f"Registered `{reg['model_uri']}` (MLflow run `{reg['run_id']}`, tracking `{reg['tracking_uri']}`)."]
    if layout.report.is_file():
        lines += ["", layout.report.read_text()]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def variants(source: Path, grid: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    """Every combination of `grid` (default init × r), each checked against the params before any runs."""
    grid = grid or DEFAULT_GRID
    out = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    for variant in out:
        check_overrides(source, variant)
    return out


def check_overrides(source: Path, overrides: dict[str, Any] | None) -> None:
    """Fail on a bad params file or bad overrides before anything runs (nothing is written)."""
    load_config(Layout(source).params)
    if overrides:
        load_config(Layout(source).params, overrides)


def preflight(source: Path, overrides: dict[str, Any] | None, commit: str | None = None) -> None:
    """A bad params file or override (`check_overrides`), then every stage's pre-flight checks (`olora.stages.preflight`,
    as `olora check` runs them) on the source's params with the overrides, before a workspace is made; its data files
    need not be here (the workspace pulls them)."""
    from olora.stages import preflight as stages_preflight

    check_overrides(source, overrides)
    if commit is not None:  # another commit's params: the flow checks them in its workspace, before any stage
        return
    stages_preflight(load_config(Layout(source).params, overrides), source, present=False)


@dataclass(frozen=True)
class VariantResult:
    """A recorded run's scores and where it is (`-` where no run of that name was found)."""

    mean_acc: float | None
    final_val_loss: float | None
    run: str
    """The MLflow run id."""
    branch: str
    """The runs/* branch it was recorded on."""

    def to_json(self) -> dict[str, Any]:
        return {"mean_acc": self.mean_acc, "final_val_loss": self.final_val_loss, "run": self.run, "branch": self.branch}


def variant_result(tracking: Tracking, name: str) -> VariantResult:
    """A recorded run's scores, looked up in the shared MLflow store by its run name tag."""
    from olora.tracking.client import experiment_id

    c = tracking.client()
    found = c.search_runs([experiment_id(c, tracking.experiment)], filter_string=f"tags.`{TAGS['run_name']}` = '{name}'")
    if not found:
        return VariantResult(None, None, "-", "-")
    run = found[0]
    return VariantResult(run.data.metrics.get("eval/mean_acc"), run.data.metrics.get("train/final_val_loss"),
                         run.info.run_id, run.data.tags.get(TAGS["git_branch"], "-"))


def sweep_table(keys: list[str], rows: list[dict[str, Any]]) -> str:
    table = ["| " + " | ".join(keys) + " | state | mean acc | val loss | MLflow run | recorded as |", "|" + "---|" * (len(keys) + 5)]
    for row in rows:
        acc = f"{row['mean_acc']:.4f}" if row["mean_acc"] is not None else "-"
        loss = f"{row['final_val_loss']:.4f}" if row["final_val_loss"] is not None else "-"
        table.append("| " + " | ".join(str(row["variant"][k]) for k in keys)
                     + f" | {row['state']} | {acc} | {loss} | {row['run']} | {row['branch']} |")
    return "# olora sweep\n\n" + "\n".join(table)


def run_on_deployment(deployment: str, variants: list[dict[str, Any]], names: list[str], push: bool,
                      poll: float = 2.0) -> dict[str, str]:
    """Start one flow run of `deployment` per variant and wait until all are final; returns name -> final state."""
    return wait_final(start_runs(deployment, variants, names, push), poll,
                      lambda name, state: log.info("variant %s: %s", name, state))


def start_runs(deployment: str, variants: list[dict[str, Any]], names: list[str], push: bool) -> dict[str, Any]:
    """One flow run per variant (name -> flow run id). A run of the deployment with the same parameters that has not
    started yet (Scheduled, Late, AwaitingConcurrencySlot, Pending: left by an earlier call that was stopped) is
    taken over, not started twice. A Running one is not: its worker may be gone, and waiting on it could never end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment

    wanted = {n: {"overrides": v, "name": n, "promote": False, "push": push} for v, n in zip(variants, names)}
    waiting: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        for state_type in (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING):
            offset = 0
            while page := client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])), offset=offset, limit=200,
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state_type])))):
                offset += len(page)
                for run in page:
                    name = (run.parameters or {}).get("name")
                    if name in wanted and all(run.parameters.get(k) == v for k, v in wanted[name].items()):
                        if state_type is StateType.RUNNING:
                            log.warning("variant %s: flow run %s is already Running; a new one starts (if its worker is "
                                        "gone, `prefect flow-run cancel %s`)", name, run.id, run.id)
                        else:
                            waiting.setdefault(name, run.id)
    if waiting:
        log.info("%s variant(s) already have a flow run waiting to start, taken over: %s", len(waiting), sorted(waiting))
    return {n: waiting.get(n) or run_deployment(deployment, parameters=p, timeout=0).id for n, p in wanted.items()}


def wait_final(flow_run_ids: dict[str, Any], poll: float = 2.0, on_final=None) -> dict[str, str]:
    """Wait until every flow run (name -> id) is in a final state; returns name -> that state's type."""
    from prefect.client.orchestration import get_client

    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(flow_run_ids):
            for name, flow_run_id in flow_run_ids.items():
                state = client.read_flow_run(flow_run_id).state
                if name not in states and state is not None and state.is_final():
                    states[name] = state.type.value
                    if on_final is not None:
                        on_final(name, states[name])
            if len(states) < len(flow_run_ids):
                time.sleep(poll)
    return states
