"""Device, dtype and thread settings, resolved in one place for every stage."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from olora.config import ModelConfig, RuntimeConfig
from olora.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"  # model.quantization: none | 4bit (bitsandbytes NF4, CUDA only)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def set_threads(runtime: RuntimeConfig | None = None) -> None:
    """torch's CPU threads: `runtime.num_threads`, else $OLORA_NUM_THREADS, else torch's default (per machine)."""
    threads = runtime.num_threads if runtime is not None and runtime.num_threads else int(os.environ.get("OLORA_NUM_THREADS") or 0)
    if threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # training processes on this machine share the cores
        torch.set_num_threads(max(1, threads // local))


def resolve_runtime(model: ModelConfig, runtime: RuntimeConfig | None = None) -> Runtime:
    """Turn `model.device`/`model.dtype` (possibly `auto`) into a concrete device and dtype; set threads.

    auto: CUDA when available (bf16 where the GPU supports it, else fp16), otherwise CPU in fp32.
    """
    set_threads(runtime)
    name = model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={model.device!r} but no CUDA device is visible; use model.device=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("model.device='mps' but MPS is not available; use model.device=cpu or auto")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per process under a distributed launcher
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(name)
    if model.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = DTYPES[model.dtype]
    check_quantization(model.quantization, device)
    return Runtime(device=device, dtype=dtype, quantization=model.quantization)


def check_quantization(quantization: str, device: torch.device) -> None:
    """A 4-bit (QLoRA) base needs CUDA and bitsandbytes: refused by name before any model loads."""
    if quantization == "none":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"model.quantization={quantization!r} loads the base through bitsandbytes, which needs a CUDA device, "
            f"but this run is on {device.type}; use model.quantization=none here, or run on a machine with a GPU"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={quantization!r} needs the bitsandbytes package, which is not installed; "
            "`pip install bitsandbytes` on the GPU machine, or use model.quantization=none"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass


def peak_memory_bytes(runtime: Runtime) -> int:
    """Peak accelerator memory on CUDA; otherwise the process's peak resident set size."""
    if runtime.is_cuda:
        return int(torch.cuda.max_memory_allocated(runtime.device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
