"""Stage `init`: params -> models/init (A0, B0, adapter config, olora_init.json) and metrics/init.json.

The QR mathematics is `olora.core.olora`; applying it to PEFT's layers and checking the invariants
is `olora.modeling.initialise`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from olora.io import write_json
from olora.layout import Layout
from olora.modeling.initialise import init_adapter

log = logging.getLogger("olora")


def init(layout: Layout = Layout(), overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stage: params -> models/init and metrics/init.json."""
    from olora.stages import setup

    cfg, ref, runtime = setup(layout, overrides)
    result = init_adapter(cfg, ref, runtime, layout.init)
    write_json(layout.metrics("init"), result.metrics)
    log.info("init: %s layers, max output diff %.3g", result.metrics["layers"], result.metrics["max_output_diff"])
    return result.metrics


if __name__ == "__main__":  # dvc.yaml's command
    from olora.stages.entry import main

    sys.exit(main("init", init))
