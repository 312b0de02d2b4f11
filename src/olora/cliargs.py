"""What every `olora` command shares: the global options, the stage subcommands, `--set` parsing and process set-up.

Used by `olora.cli` (the stage commands, which dvc.yaml runs) and by `olora.admin` (everything else).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from olora.errors import OloraError
from olora.ops.envfile import load_env
from olora.stages import STAGES


def parse_set(items: list[str]) -> dict:
    """`--set key=value` items (values parsed as YAML) -> overrides."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OloraError(f"--set {item!r} must look like key=value, e.g. adapter.r=16")
        out[key] = yaml.safe_load(value)
    return out


def base_parser() -> argparse.ArgumentParser:
    """The global options and one subcommand per stage (`evaluate base` and `evaluate adapter` share one)."""
    parser = argparse.ArgumentParser(prog="olora", description="OLoRA fine-tuning pipeline stages")
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    sub = parser.add_subparsers(dest="command", required=True)
    for head, names in stage_commands().items():
        p = sub.add_parser(head, help=" / ".join(STAGES[n].help for n in names))
        choices = [r for n in names for r in (STAGES[n].cli or (n,))[1:]]
        if choices:
            p.add_argument("which", choices=choices)
    return parser


def stage_commands() -> dict[str, list[str]]:
    """First CLI word -> the stages it runs."""
    commands: dict[str, list[str]] = {}
    for stage in STAGES.values():
        commands.setdefault((stage.cli or (stage.name,))[0], []).append(stage.name)
    return commands


def setup_process(root: Path) -> None:
    """What every `olora` command does first: logging, and the shared services' settings (`make stack`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if applied := load_env(root):  # stack.env, unless already set
        logging.getLogger("olora").info("using %s/stack.env (%s)", root, ", ".join(sorted(applied)))
