"""Stage `prepare`: params -> data/prepared/{train,validation}.jsonl (+ the prompt template) and metrics/data.json.

The logic (sources, validation, rendering, dedupe, length filter, split) is `olora.data.prepare`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from olora.config import Config, load_config
from olora.data.prepare import prepare_data
from olora.data.sources import check_source
from olora.io import write_json
from olora.layout import Layout

log = logging.getLogger("olora")


def preflight(cfg: Config, root: Path, present: bool = True) -> None:
    """What prepare refuses before it reads anything: the base model's name, the data source (file, location, hub)."""
    from olora.stages import base_model

    base_model(cfg, root, present)
    check_source(cfg.data, root, present)


def prepare(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage: params -> data/prepared/{train,validation}.jsonl and metrics/data.json."""
    from olora.modeling.models import load_tokenizer, resolve_model
    from olora.modeling.runtime import set_threads

    cfg = load_config(layout.params, overrides)
    preflight(cfg, layout.root)
    set_threads(cfg.runtime)
    result = prepare_data(cfg.data, load_tokenizer(resolve_model(cfg.model, layout.root)), layout.data, layout.root)
    write_json(layout.metrics("data"), result.stats)
    log.info("prepare: %s train / %s validation examples", result.stats["train_examples"], result.stats["validation_examples"])
    return result.stats


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("prepare", prepare))
