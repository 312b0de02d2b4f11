"""Named points in a stage's work, logged so fault tests can act at a precise moment (no timing guesses)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("olora")


def marker(name: str) -> None:
    """Log `olora-marker <name>`; when $OLORA_PAUSE_AT names it, pause there.

    A paused process creates $OLORA_PAUSE_DIR/<name>.reached and waits until $OLORA_PAUSE_DIR/<name>
    exists: a test can then kill it, stop a server, or start a competing run at exactly that point.
    """
    log.info("olora-marker %s", name)
    if name in os.environ.get("OLORA_PAUSE_AT", "").split(","):
        folder = Path(os.environ.get("OLORA_PAUSE_DIR", "."))
        (folder / f"{name}.reached").write_text(str(os.getpid()))
        while not (folder / name).exists():
            time.sleep(0.05)
