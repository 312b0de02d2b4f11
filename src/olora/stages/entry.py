"""What `python -m olora.stages.<stage>` runs (each dvc.yaml `cmd:`): arguments, logging, the stage lock, the error line.

A stage starts its own module directly, not through the `olora` dispatcher, so its DVC deps are
the code it runs and nothing else: editing the CLI, the admin commands, `ops/` or the docs reruns no
stage. The stage reads its settings from params.yaml and the environment only. It does not read
`stack.env` itself: the shared services' variables (MLflow's URI and credentials) come from whoever
starts it: `olora <stage>`, `make run` and the Prefect flows load `stack.env` first; a plain `dvc repro`
uses the shell's environment (`set -a; . ./stack.env; set +a` exports it), and a tracked stage warns
when a `stack.env` is present but not loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from olora.errors import OloraError
from olora.layout import Layout
from olora.stages.lock import stage_lock

log = logging.getLogger("olora")
STACK_ENV = "stack.env"  # written by `make stack`; read by olora.ops.envfile, outside every stage


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` items (values parsed as YAML) -> overrides."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OloraError(f"--set {item!r} must look like key=value, e.g. adapter.r=16")
        out[key] = yaml.safe_load(value)
    return out


def setup_logging() -> None:
    """Logging and the settings every olora process starts with."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def warn_unloaded_stack_env(root: Path, stage: str) -> None:
    """A tracked stage started without the team's settings while the project has them: say so, and how to load them."""
    if (Path(root) / STACK_ENV).is_file() and "MLFLOW_TRACKING_URI" not in os.environ:
        log.warning("%s: %s/%s exists but is not loaded, so this stage logs to tracking.uri or the project's own "
                    "store; export it first (`set -a; . ./stack.env; set +a`), or run `olora %s` or `make run`",
                    stage, root, STACK_ENV, stage)


def main(stage: str, fn: Callable[..., dict[str, Any]], argv: list[str] | None = None, *, tracked: bool = False,
         show: bool = False) -> int:
    """Run one stage function as a process: `python -m olora.stages.<stage> [--root DIR] [--set KEY=VALUE ...]`."""
    parser = argparse.ArgumentParser(prog=f"python -m olora.stages.{stage}", description=(fn.__doc__ or "").split("\n")[0])
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    layout = Layout(Path(args.root))
    setup_logging()
    try:
        overrides = parse_set(args.set)
        if tracked:
            warn_unloaded_stack_env(layout.root, stage)
        with stage_lock(layout.root, stage):
            result = fn(layout, overrides)
    except OloraError as exc:
        print(f"olora {stage}: error: {exc}", file=sys.stderr)
        return 2
    if show:
        print(json.dumps(result, indent=2))
    return 0
