"""`olora` command line: one subcommand per pipeline stage (what dvc.yaml's `cmd:` lines run), from the stage table.

Every other command (promote, rollback, restore, serve, check, dvc-yaml, params-table) lives in
`olora.admin` and is imported only when one of them runs, so that editing them reruns no stage
(this module and what it imports at module level are every stage's code dependencies).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from olora.errors import OloraError
from olora.layout import Layout
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


def _command_word(argv: list[str]) -> str | None:
    """The subcommand in argv (skipping the global options and their values), or None."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--root", "--set"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def _stage_for(args) -> str | None:
    for stage in STAGES.values():
        head, *rest = stage.cli or (stage.name,)
        if head == args.command and (not rest or getattr(args, "which", None) == rest[0]):
            return stage.name
    return None


def setup_process(root: Path) -> None:
    """What every `olora` command does first: logging, and the shared services' settings (`make stack`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if applied := load_env(root):  # stack.env, unless already set
        logging.getLogger("olora").info("using %s/stack.env (%s)", root, ", ".join(sorted(applied)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _command_word(argv) not in stage_commands():  # an admin command, --help, or a typo (admin's parser says)
        from olora.admin import main as admin_main

        return admin_main(argv)
    args = base_parser().parse_args(argv)
    layout = Layout(Path(args.root))
    try:
        setup_process(layout.root)
        result = STAGES[_stage_for(args)].run(layout, parse_set(args.set))
        if args.command == "register":
            print(json.dumps(result, indent=2))
    except OloraError as exc:
        print(f"olora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
