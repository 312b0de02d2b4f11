"""Data-parallel training (DDP) through torch.distributed's launcher (torchrun): gloo on CPU, NCCL on CUDA.

The train stage relaunches itself in `train.processes` processes; every process trains from the
same initial adapter and only rank 0 writes outputs and talks to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from olora.config import Config
from olora.errors import ConfigError, OloraError
from olora.io import read_json
from olora.modeling.runtime import Runtime

log = logging.getLogger("olora")


def world() -> tuple[int, int]:
    """(rank, world size) of this process under a torch.distributed launcher; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_distributed(cfg: Config, runtime: Runtime) -> None:
    """Refuse a process count the machine cannot run, before any model loads."""
    n = cfg.train.processes
    if runtime.device.type == "mps":
        raise ConfigError(f"train.processes={n} is not supported on MPS; use train.processes=1")
    if runtime.device.type == "cuda":
        if runtime.device.index is not None and cfg.model.device != "auto":
            raise ConfigError(
                f"model.device={cfg.model.device!r} pins one GPU, but train.processes={n} needs one GPU per process; "
                "use model.device=cuda or auto"
            )
        visible = torch.cuda.device_count()
        if n > visible:
            raise ConfigError(
                f"train.processes={n} but only {visible} CUDA device(s) are visible; use train.processes<={visible} "
                "(one process per GPU), or model.device=cpu"
            )


def check_world(cfg: Config) -> None:
    """A stage launched by hand under torchrun must say the process count that ran (it is in the record)."""
    _, world_size = world()
    if world_size != cfg.train.processes:
        raise ConfigError(
            f"this train stage was launched with {world_size} processes but train.processes={cfg.train.processes}; "
            f"set train.processes={world_size} so the recorded effective batch is the one that ran"
        )


def weights_checksum(model) -> float:
    """A number that differs when any trainable weight does (compared across ranks after training)."""
    trainable = (q for _, q in sorted(model.named_parameters()) if q.requires_grad)
    return float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(trainable)))


def gather_checksums(model, world_size: int) -> list[float]:
    if world_size == 1:
        return [weights_checksum(model)]
    import torch.distributed as dist

    checksums: list[Any] = [None] * world_size
    dist.all_gather_object(checksums, weights_checksum(model))
    return checksums


def launch(root: Path, overrides: dict[str, Any] | None, processes: int, checkpoints: Path, metrics_file: Path) -> dict[str, Any]:
    """Run the train stage in `processes` processes through torch.distributed's launcher and wait; rank 0's metrics."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "olora.cli", "--root", str(root)]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    command.append("train")
    log.info("train: launching %d processes: %s", processes, " ".join(command))
    done = subprocess.run(command, env=os.environ.copy())
    if done.returncode != 0:
        raise OloraError(
            f"distributed training with train.processes={processes} failed (exit code {done.returncode}); the "
            f"processes' errors are printed above. Complete checkpoints in {checkpoints} are kept, so a "
            "re-run resumes from the last one"
        )
    return read_json(metrics_file)
