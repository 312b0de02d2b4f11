"""What every `olora` command shares: the global options, the stage subcommands, `--set` parsing and process set-up.

Used by `olora.cli` (the stage commands a user runs by hand; dvc.yaml starts each stage's module
directly) and by `olora.admin` (everything else). No stage imports it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from olora.ops.envfile import load_env
from olora.stages import STAGES
from olora.stages.entry import parse_set, setup_logging

__all__ = ["STAGE_HELP", "base_parser", "parse_set", "setup_process", "stage_commands"]

# One line per stage for `olora --help`: here, not in the stage table, so editing it reruns no stage.
STAGE_HELP = {
    "prepare": "load, validate, render, dedupe and split the fine-tuning data",
    "init": "initialise the adapter (adapter.init: OLoRA, LoRA or a PEFT sibling) and check the invariants",
    "train": "fine-tune the adapter and export a plain LoRA",
    "evaluate_base": "lm-eval on the untouched base (every question's outcome kept)",
    "evaluate": "lm-eval on base + exported adapter, paired with the base on the same questions",
    "register": "register the exported adapter in the MLflow Model Registry (alias challenger)",
}


def base_parser() -> argparse.ArgumentParser:
    """The global options and one subcommand per stage (`evaluate base` and `evaluate adapter` share one)."""
    parser = argparse.ArgumentParser(prog="olora", description="OLoRA fine-tuning pipeline stages")
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    sub = parser.add_subparsers(dest="command", required=True)
    for head, names in stage_commands().items():
        p = sub.add_parser(head, help=" / ".join(STAGE_HELP[n] for n in names))
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
    setup_logging()
    if applied := load_env(root):  # stack.env, unless already set
        logging.getLogger("olora").info("using %s/stack.env (%s)", root, ", ".join(sorted(applied)))
