"""Stage `train`: data/prepared + models/init -> models/adapter, models/exported, metrics/train.json, loss curves.

The training itself is `olora.training` (Trainer set-up, checkpoints and resume, packing, the
distributed launch). The stage opens the adapter's MLflow run (main process only) and records its
id in models/adapter; with `train.processes` > 1 it relaunches itself under torch.distributed's
launcher (always, with train.strategy fsdp or deepspeed) and returns rank 0's metrics.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from olora.config import Config
from olora.io import write_csv, write_json
from olora.layout import Layout
from olora.training import checkpoints, distributed
from olora.training.trainer import TrainPaths, check_initial_adapter, train_adapter

log = logging.getLogger("olora")


def preflight(cfg: Config, root: Path, present: bool = True) -> None:
    """What train refuses before any weights load: the base model, device and quantisation, and a distributed
    launch (processes, nodes, strategy) this machine cannot run."""
    from olora.modeling.runtime import resolve_runtime
    from olora.stages import base_model

    ref = base_model(cfg, root, present)
    runtime = resolve_runtime(cfg.model, cfg.runtime)
    if not distributed.launched() and (cfg.train.processes > 1 or cfg.train.strategy != "ddp"):
        distributed.check_nodes(cfg)
        distributed.check_distributed(cfg, runtime, ref.path if ref and ref.local and not ref.gguf_file else None)


def train(layout: Layout = Layout(), overrides: dict[str, Any] | None = None, callbacks=None, tracking=None) -> dict[str, Any]:
    """The stage. `tracking` (an `olora.tracking.client.Tracking`) overrides the config's server."""
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides, preflight)
    rank, world_size = distributed.world()
    if not distributed.launched() and (cfg.train.processes > 1 or cfg.train.strategy != "ddp"):
        node_rank, master = distributed.check_nodes(cfg)  # checked by preflight; here for its values
        return distributed.launch(layout.root, overrides, cfg.train.processes, layout.checkpoints, layout.metrics("train"),
                                  cfg.train.nodes, node_rank, master)
    distributed.check_world(cfg)
    main = rank == 0
    paths = TrainPaths.of(layout)
    check_initial_adapter(cfg, paths.init)  # a missing or stale initial adapter is named before any work
    fingerprint = checkpoints.run_fingerprint(cfg, paths.data, paths.init)
    callbacks, run, batch_logger = list(callbacks or []), None, None
    if cfg.tracking.enabled and main:  # one MLflow run, opened by the main process only
        from olora.tracking import runs
        from olora.tracking.callback import BatchLogger
        from olora.tracking.client import Tracking

        previous = checkpoints.resumable_run_id(paths.checkpoints, fingerprint)  # a resume continues its run
        run = runs.start_training_run(cfg, tracking or Tracking.of(cfg, layout.root), layout.root, ref.name,
                                      ref.revision, resume_run_id=previous)
        held = BatchLogger.held_by(run.client, run.run_id) if previous else None
        batch_logger = BatchLogger(run.client, run.run_id, held=held)
        callbacks.append(batch_logger.callback)
    try:
        result = train_adapter(cfg, ref, runtime, paths, fingerprint, callbacks, run_id=run.run_id if run else None)
    except BaseException as exc:
        if run and not isinstance(exc, KeyboardInterrupt):
            try:  # best effort: the error itself matters more than the run's status
                run.client.set_terminated(run.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - e.g. the tracking server is down too
                log.warning("train: could not mark MLflow run %s as failed", run.run_id)
        raise
    if not main:
        return result.metrics
    metrics, history = result.metrics, result.history
    if run:
        metrics.update(tracking_seconds=round(batch_logger.seconds, 4), tracking_sends=batch_logger.sends,
                       tracking_values_sent=batch_logger.values_sent,
                       tracking_share_of_train_time=round(batch_logger.seconds / max(metrics["train_seconds"], 1e-9), 6))
        runs.finish_training_run(run, cfg, metrics, history, layout.exported, layout.adapter)
    write_csv(layout.plot("train_loss"), ["step", "loss"], [(h["step"], h["loss"]) for h in history if "loss" in h])
    write_csv(layout.plot("val_loss"), ["step", "val_loss"], [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h])
    write_json(layout.metrics("train"), metrics)
    checkpoints.remove(layout.checkpoints)
    log.info("train: %s steps, final val loss %.4f", metrics["steps"], metrics["final_val_loss"])
    return metrics


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("train", train, tracked=True))
