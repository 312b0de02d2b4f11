"""Stage `init`: params (+ the prepared train split, for eva, corda, lora_ga) -> models/init (A0, B0, adapter
config, olora_init.json) and metrics/init.json.

The QR mathematics is `olora.core.olora`; applying it to PEFT's layers and checking the invariants
is `olora.modeling.initialise`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from olora.config import DATA_DRIVEN_INITS, Config
from olora.io import write_json
from olora.layout import Layout
from olora.modeling.initialise import init_adapter
from olora.modeling.models import check_targets, linear_layers
from olora.modeling.runtime import resolve_runtime

log = logging.getLogger("olora")


def preflight(cfg: Config, root: Path, present: bool = True) -> None:
    """What init refuses before any weights load: the base model, device and quantisation, and
    adapter.target_modules and adapter.r against the base's linear layers (built from its config alone)."""
    from olora.stages import base_model

    ref = base_model(cfg, root, present)
    resolve_runtime(cfg.model, cfg.runtime)
    if ref is not None:
        check_targets(linear_layers(ref), cfg.adapter.target_modules, cfg.adapter.r)


def init(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage: params -> models/init and metrics/init.json."""
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides, preflight)
    calibration = None
    if cfg.adapter.init in DATA_DRIVEN_INITS:  # eva, corda, lora_ga read a sample of the prepared train split
        from olora.data.calibration import calibration_batches
        from olora.modeling.models import load_tokenizer

        a = cfg.adapter
        calibration = calibration_batches(layout.data, load_tokenizer(ref), cfg.data.max_seq_length,
                                          a.calibration_samples, a.calibration_batch)
    result = init_adapter(cfg, ref, runtime, layout.init, calibration)
    write_json(layout.metrics("init"), result.metrics)
    log.info("init: %s layers, max output diff %.3g", result.metrics["layers"], result.metrics["max_output_diff"])
    return result.metrics


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("init", init))
