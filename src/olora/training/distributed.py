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


NODE_RANK_ENV = "OLORA_NODE_RANK"
MASTER_ENV = "OLORA_MASTER_ADDR"


def node() -> tuple[int, str | None]:
    """(this machine's node rank, node 0's rendezvous host:port) from the environment; (0, None) by default."""
    return int(os.environ.get(NODE_RANK_ENV, "0") or 0), os.environ.get(MASTER_ENV) or None


def check_nodes(cfg: Config) -> tuple[int, str | None]:
    """A multi-node launch needs this node's rank and node 0's address, well formed; refused before any model loads."""
    nodes = cfg.train.nodes
    raw_rank = os.environ.get(NODE_RANK_ENV, "0") or "0"
    try:
        rank = int(raw_rank)
    except ValueError:
        raise ConfigError(f"${NODE_RANK_ENV}={raw_rank!r} is not a whole number; set it to this machine's rank, 0 .. {nodes - 1}")
    master = os.environ.get(MASTER_ENV) or None
    if nodes == 1:
        if rank != 0:
            raise ConfigError(f"${NODE_RANK_ENV}={rank} but train.nodes=1; set train.nodes to the number of machines, or unset ${NODE_RANK_ENV}")
        return 0, None
    if not 0 <= rank < nodes:
        raise ConfigError(f"${NODE_RANK_ENV}={rank} is outside 0 .. {nodes - 1} for train.nodes={nodes}; give each machine its own rank")
    host, _, port = (master or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"train.nodes={nodes} needs ${MASTER_ENV}=host:port, node 0's address and a free port that every node "
            f"reaches (e.g. 10.0.0.1:29500); got {master!r}"
        )
    return rank, master


def launched() -> bool:
    """Whether this process was started by torch.distributed's launcher (which sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


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
    n = cfg.train.processes // cfg.train.nodes  # on this machine
    per_node = f" ({n} on each of train.nodes={cfg.train.nodes})" if cfg.train.nodes > 1 else ""
    check_strategy(cfg, runtime)
    if runtime.device.type == "cpu":
        cores = usable_cores()
        if n > cores:
            raise ConfigError(
                f"train.processes={cfg.train.processes}{per_node} but this machine has {cores} usable CPU core(s); "
                f"use train.processes<={cores * cfg.train.nodes} "
                "(each process needs a core of its own; raise micro_batch_size or gradient_accumulation_steps for a larger batch)"
            )
        weights = weight_bytes(Path(model_path), runtime.dtype) if model_path else None
        free = available_memory()
        if weights is not None and free is not None and n * (weights + PROCESS_BASELINE) > free:
            fits = max(free // (weights + PROCESS_BASELINE), 1)
            raise ConfigError(
                f"train.processes={cfg.train.processes}{per_node} would hold {n} copies of the model ({_size(weights)} of weights in "
                f"{runtime.dtype_name}, + {_size(PROCESS_BASELINE)} a process) = {_size(n * (weights + PROCESS_BASELINE))}, "
                f"but only {_size(free)} of memory is available; use train.processes<={fits * cfg.train.nodes}"
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
                f"train.processes={cfg.train.processes}{per_node} but only {visible} CUDA device(s) are visible; "
                f"use train.processes<={visible * cfg.train.nodes} (one process per GPU), or model.device=cpu"
            )


def check_strategy(cfg: Config, runtime: Runtime) -> None:
    """train.strategy against the machine and the model settings, before any model loads."""
    strategy = cfg.train.strategy
    if strategy == "deepspeed":
        if runtime.device.type != "cuda":
            raise ConfigError(
                f"train.strategy=deepspeed (ZeRO-3) needs CUDA devices, but this run is on {runtime.device.type}; "
                "use train.strategy=fsdp to shard on CPU, or run on GPUs"
            )
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.strategy=deepspeed needs the deepspeed package, which is not installed; "
                              "`pip install deepspeed` on the GPU machines, or use train.strategy=fsdp")
    if strategy != "ddp" and runtime.quantization != "none":
        raise ConfigError(
            f"model.quantization={runtime.quantization} with train.strategy={strategy} is not supported: a 4-bit "
            "base is not sharded here; use train.strategy=ddp (each process holds the 4-bit base)"
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


def weights_checksum_of(state: dict[str, torch.Tensor]) -> float:
    """`weights_checksum` of a gathered state dict's adapter weights (after sharded training)."""
    trainable = (v for k, v in sorted(state.items()) if "lora_" in k)
    return float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(trainable)))


def gather_checksums(model, world_size: int) -> list[float]:
    if world_size == 1:
        return [weights_checksum(model)]
    import torch.distributed as dist

    checksums: list[Any] = [None] * world_size
    dist.all_gather_object(checksums, weights_checksum(model))
    return checksums


def launch(root: Path, overrides: dict[str, Any] | None, processes: int, checkpoints: Path, metrics_file: Path,
           nodes: int = 1, node_rank: int = 0, master: str | None = None) -> dict[str, Any]:
    """Run the train stage in `processes` processes (over `nodes` machines: this one's share) through
    torch.distributed's launcher and wait; rank 0's metrics (on other nodes: what ran here).

    One node: `--standalone`. Several: torchrun's static rendezvous at node 0's `master` host:port,
    this node's rank given; every node's launcher waits there until all have joined.
    """
    if nodes == 1:
        where = ["--standalone", f"--nproc-per-node={processes}"]
    else:
        host, _, port = master.rpartition(":")
        where = [f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--nproc-per-node={processes // nodes}",
                 f"--master-addr={host}", f"--master-port={port}"]
    command = [sys.executable, "-m", "torch.distributed.run", *where, "-m", "olora.stages.train", "--root", str(root)]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    log.info("train: launching %d of %d processes: %s", processes // nodes, processes, " ".join(command))
    done = subprocess.run(command, env=os.environ.copy())
    if done.returncode != 0:
        raise OloraError(
            f"distributed training with train.processes={processes} failed (exit code {done.returncode}); the "
            f"processes' errors are printed above. Complete checkpoints in {checkpoints} are kept, so a "
            "re-run resumes from the last one"
        )
    if node_rank != 0:  # node 0's rank 0 wrote the outputs and the MLflow run
        return {"node_rank": node_rank, "nodes": nodes, "processes": processes, "processes_here": processes // nodes}
    return read_json(metrics_file)
