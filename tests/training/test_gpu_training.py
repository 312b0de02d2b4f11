"""GPU tier (opt-in: -m gpu): QLoRA through the pipeline, and the sharded strategies on CUDA.

These need a CUDA device (QLoRA: bitsandbytes; ZeRO-3: deepspeed, neither in requirements.lock: the GPU
machine's own install, see bench/results/gpu/harness/run_gpu.sh). On CPU the same settings are refused
before any model loads (tests/test_errors.py: quantization-on-cpu, deepspeed-on-cpu).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olora.layout import Layout
from olora.stages import STAGES

from overlay import write_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BIN = Path(sys.executable).parent


def _olora(root: Path, *sets: str) -> None:
    args = [str(BIN / "olora")]
    for item in sets:
        args += ["--set", item]
    out = subprocess.run([*args, "train"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _losses(layout: Layout) -> list[float]:
    return [float(line.split(",")[1]) for line in layout.plot("train_loss").read_text().splitlines()[1:]]


def test_qlora_through_the_pipeline(tmp_path, tiny_model_dir):
    """model.quantization=4bit: a 4-bit NF4 base, OLoRA through PEFT's dequantise-initialise-requantise
    path, trained, exported and evaluated like any adapter."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes on the GPU machine")
    write_params(tmp_path, tiny_model_dir, {"model.quantization": "4bit", "tracking.enabled": False})
    layout = Layout(tmp_path)
    STAGES["prepare"].run(layout)
    init = STAGES["init"].run(layout)
    assert init["max_orthonormality_error"] < 1e-2
    metrics = STAGES["train"].run(layout)
    assert metrics["device"].startswith("cuda") and metrics["steps"] == 6 and math.isfinite(metrics["final_val_loss"])
    exported = load_file(str(layout.exported / "adapter_model.safetensors"))
    assert exported and all(torch.isfinite(v).all() for v in exported.values())
    STAGES["evaluate_base"].run(layout)
    scores = STAGES["evaluate"].run(layout)
    assert 0.0 <= scores.mean_acc <= 1.0


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategy_on_one_gpu_trains_as_ddp(tmp_path, tiny_model_dir, strategy):
    """train.strategy fsdp / deepspeed (ZeRO-3) under the launcher on one GPU: the loss curve of plain
    training within bf16 noise, a complete adapter and export."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed on the GPU machine")
    layouts = {}
    for name, sets in (("plain", ()), (strategy, (f"train.strategy={strategy}",))):
        root = tmp_path / name
        write_params(root, tiny_model_dir, {"tracking.enabled": False})
        layouts[name] = layout = Layout(root)
        STAGES["prepare"].run(layout)
        STAGES["init"].run(layout)
        _olora(root, *sets)
    metrics = json.loads(layouts[strategy].metrics("train").read_text())
    assert metrics["strategy"] == strategy and metrics["sharded"] and metrics["steps"] == 6
    for a, b in zip(_losses(layouts[strategy]), _losses(layouts["plain"]), strict=True):
        assert a == pytest.approx(b, rel=2e-2)
    assert (layouts[strategy].exported / "adapter_model.safetensors").is_file()
