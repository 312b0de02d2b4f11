"""`olora` command line: one subcommand per pipeline stage, from the stage table, after loading `stack.env`.

`olora train` is `python -m olora.stages.train` (what dvc.yaml runs) with the team's `stack.env`
loaded first. Every other command (promote, rollback, restore, serve, publish-data, serve-webhook,
check, doctor, eval-plan, compare, dvc-yaml, params-table) lives in `olora.admin` and is imported only when one of them runs.
No stage imports this module, so editing it reruns no stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from olora.cliargs import base_parser, parse_set, setup_process, stage_commands
from olora.errors import OloraError
from olora.layout import Layout
from olora.stages import STAGES


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
