"""Initialising the adapter: build the PEFT LoRA model on the base and initialise it with `adapter.init`
(OLoRA, LoRA or one of PEFT's siblings: PiSSA, orthogonal, EVA, CorDA, LoRA-GA).

The QR mathematics is `olora.core.olora`; applying it to PEFT's layers is `olora.modeling.peft_glue`.

Saves the initial adapter (A0, B0 and config) and records per-layer checks: max |B0^T B0 - I| and
the largest output difference between the base and the initialised model on a fixed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olora.modeling import models, peft_glue
from olora.config import Config
from olora.io import atomic_dir, write_json
from olora.layout import INIT_META
from olora.modeling.runtime import Runtime

def fixed_batch(vocab_size: int, device: torch.device, batch: int = 2, length: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


@dataclass(frozen=True)
class InitResult:
    adapter_dir: Path
    metrics: dict[str, Any]


def init_adapter(cfg: Config, ref: models.ModelRef, runtime: Runtime, out_dir: Path,
                 calibration: list[dict[str, torch.Tensor]] | None = None) -> InitResult:
    """Initialise adapters on the base, check the invariants and save the initial adapter.

    `calibration`: batches of the prepared train split, for the data-driven inits (eva, corda, lora_ga).
    adapter.target_modules and adapter.r are checked before (the init stage's `preflight`).
    """
    base = models.load_base(ref, runtime)
    batch = fixed_batch(base.config.vocab_size, runtime.device)
    with torch.no_grad():
        before = base(input_ids=batch).logits.float()
    if calibration:
        calibration = [{k: v.to(runtime.device) for k, v in b.items()} for b in calibration]
    model = peft_glue.initialise(base, cfg.adapter, calibration)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=batch).logits.float()
    metrics = {
        "init": cfg.adapter.init,
        "rewrites_base": cfg.adapter.rewrites_base,
        "export_rank": cfg.adapter.export_rank,  # 2r where the base is rewritten: the export is then [B, -B0]·[A; A0]
        "layers": len(peft_glue.lora_layers(model)),
        "layer_ranks": sorted({layer.r["default"] for layer in peft_glue.lora_layers(model).values()}),  # eva_rho > 1 varies them
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "max_output_diff": float((after - before).abs().max()),
        "max_abs_logit": float(before.abs().max()),
    }
    per_layer: dict[str, float] = {}
    if cfg.adapter.init == "olora":  # B0 has orthonormal columns only under OLoRA (LoRA's B0 is zero)
        per_layer = peft_glue.orthonormality_errors(model)
        metrics["max_orthonormality_error"] = max(per_layer.values())
        by_kind: dict[str, float] = {}
        for name, error in per_layer.items():
            kind = name.rsplit(".", 1)[-1]
            by_kind[kind] = max(by_kind.get(kind, 0.0), error)
        metrics["orthonormality_error_by_module"] = by_kind
    with atomic_dir(out_dir) as tmp:
        peft_glue.save_initial(model, tmp, ref.name)
        write_json(
            tmp / INIT_META,
            {
                "init": cfg.adapter.init,
                "r": cfg.adapter.r,
                "alpha": cfg.adapter.alpha,
                "scaling": cfg.adapter.scaling,
                "dora": cfg.adapter.dora,
                "rslora": cfg.adapter.rslora,
                "base_model": ref.name,
                "base_revision": ref.revision,
                "dtype": runtime.dtype_name,
                "orthonormality_error_per_layer": per_layer,
            },
        )
    return InitResult(out_dir, metrics)
