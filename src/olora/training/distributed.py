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


GIB = 1024**3
PROCESS_BASELINE = GIB // 2
"""Memory of one training process beyond its model copy (interpreter, torch, transformers): a low estimate."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, as a container or `taskset` limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (`MemAvailable`); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def weight_bytes(folder: Path, dtype: torch.dtype) -> int | None:
    """Bytes of one copy of the model's weights in `dtype`, from its safetensors headers (no weights read)."""
    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    count = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                size = 1
                for dim in entry["shape"]:
                    size *= dim
                count += size
    return count * torch.empty((), dtype=dtype).element_size()


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.0f} MiB"


def check_distributed(cfg: Config, runtime: Runtime, model_path: str | None = None) -> None:
    """Refuse a process count the machine cannot run, before any model loads.

    On CPU: no more processes than usable cores, and no more model copies (weights in the run's dtype
    plus PROCESS_BASELINE each) than the memory available; `model_path` is the base model's local folder.
    """
    n = cfg.train.processes
    if runtime.device.type == "cpu":
        cores = usable_cores()
        if n > cores:
            raise ConfigError(
                f"train.processes={n} but this machine has {cores} usable CPU core(s); use train.processes<={cores} "
                "(each process needs a core of its own; raise micro_batch_size or gradient_accumulation_steps for a larger batch)"
            )
        weights = weight_bytes(Path(model_path), runtime.dtype) if model_path else None
        free = available_memory()
        if weights is not None and free is not None and n * (weights + PROCESS_BASELINE) > free:
            fits = max(free // (weights + PROCESS_BASELINE), 1)
            raise ConfigError(
                f"train.processes={n} would hold {n} copies of the model ({_size(weights)} of weights in "
                f"{runtime.dtype_name}, + {_size(PROCESS_BASELINE)} a process) = {_size(n * (weights + PROCESS_BASELINE))}, "
                f"but only {_size(free)} of memory is available; use train.processes<={fits}"
            )
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
