"""`olora` command line: one subcommand per pipeline stage (what dvc.yaml's `cmd:` lines run), from the stage table.

Besides the stages: `promote`/`rollback` (registry aliases), `check` (print the resolved params),
`dvc-yaml` (generate dvc.yaml from the stage table) and `params-table` (the README's parameter table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from olora.envfile import load_env
from olora.errors import OloraError
from olora.layout import Layout
from olora.stages import STAGES

README_MARKERS = ("<!-- params-table:start -->", "<!-- params-table:end -->")


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OloraError(f"--set {item!r} must look like key=value, e.g. adapter.r=16")
        out[key] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olora", description="OLoRA fine-tuning pipeline stages")
    parser.add_argument("--root", default=".", help="project root holding params.yaml (default: .)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, list[str]] = {}
    for stage in STAGES.values():  # `evaluate base` and `evaluate adapter` share one subcommand
        head, *rest = stage.cli or (stage.name,)
        commands.setdefault(head, []).extend(rest)
    for head, choices in commands.items():
        names = [s.name for s in STAGES.values() if (s.cli or (s.name,))[0] == head]
        p = sub.add_parser(head, help=" / ".join(STAGES[n].help for n in names))
        if choices:
            p.add_argument("which", choices=choices)
    pr = sub.add_parser("promote", help="move alias champion to the challenger if it passes the gate")
    pr.add_argument("--model", help="registered model name (default: from params)")
    pr.add_argument("--version", help="version to consider (default: the challenger)")
    pr.add_argument("--force", action="store_true", help="promote regardless of the gate")
    rb = sub.add_parser("rollback", help="restore the previous champion")
    rb.add_argument("--model", help="registered model name (default: from params)")
    sv = sub.add_parser("serve", help="answer HTTP requests with a registered version (MLflow's scoring app under uvicorn, "
                        "POST /reload follows the alias), on 127.0.0.1")
    sv.add_argument("--model", help="registered model name (default: from params)")
    sv.add_argument("--alias", default="champion", help="alias to serve (default: champion)")
    sv.add_argument("--version", help="serve this fixed version instead of an alias (reload is then a no-op)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=5001)
    rs = sub.add_parser("restore", help="check out a registered version's recorded run here: git fetch + checkout + dvc pull")
    rs.add_argument("--model", help="registered model name (default: from params)")
    rs.add_argument("--alias", default="champion", help="alias to restore (default: champion)")
    rs.add_argument("--version", help="restore this version instead of an alias")
    sub.add_parser("check", help="validate params.yaml and print the resolved configuration")
    dy = sub.add_parser("dvc-yaml", help="print dvc.yaml as generated from the stage table")
    dy.add_argument("--write", action="store_true", help="write it to ROOT/dvc.yaml")
    dy.add_argument("--check", action="store_true", help="exit 1 when ROOT/dvc.yaml differs")
    pt = sub.add_parser("params-table", help="print the parameter table generated from the config's docstrings")
    pt.add_argument("--write", metavar="README", help="replace the table between the markers in this file")
    return parser


def _stage_for(args) -> str | None:
    for stage in STAGES.values():
        head, *rest = stage.cli or (stage.name,)
        if head == args.command and (not rest or getattr(args, "which", None) == rest[0]):
            return stage.name
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    layout = Layout(Path(args.root))
    try:
        if applied := load_env(layout.root):  # the shared services' settings (`make stack`), unless already set
            logging.getLogger("olora").info("using %s/stack.env (%s)", layout.root, ", ".join(sorted(applied)))
        overrides = _parse_set(args.set)
        stage = _stage_for(args)
        if stage is not None:
            result = STAGES[stage].run(layout, overrides)
            if stage == "register":
                print(json.dumps(result, indent=2))
        elif args.command == "check":
            from olora.config import dump_config, load_config

            print(dump_config(load_config(layout.params, overrides)), end="")
        elif args.command in ("promote", "rollback"):
            from olora.config import load_config
            from olora.tracking import registry

            cfg = load_config(layout.params, overrides)
            if args.command == "promote":
                decision = registry.promote(cfg, layout.root, args.model, args.version, args.force)
                print(("PROMOTED: " if decision.promote else "KEPT CHAMPION: ") + decision.reason)
            else:
                print(f"champion is now version {registry.rollback(cfg, layout.root, args.model)}")
        elif args.command == "restore":
            from olora.config import load_config
            from olora.tracking import registry

            cfg = load_config(layout.params, overrides)
            restored = registry.restore(cfg, layout.root, args.model, args.alias, args.version)
            print(json.dumps(restored, indent=2))
        elif args.command == "serve":
            return _serve(layout, overrides, args)
        elif args.command == "dvc-yaml":
            return _dvc_yaml(layout, args.write, args.check)
        elif args.command == "params-table":
            return _params_table(args.write)
    except OloraError as exc:
        print(f"olora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(layout, overrides, args) -> int:
    """MLflow's scoring app for the registered version under uvicorn, with `POST /reload` and `GET /served` (olora.serving)."""
    from olora.config import load_config
    from olora.serving import serve
    from olora.tracking.registry import model_name

    cfg = load_config(layout.params, overrides)
    serve(cfg, layout.root, args.model or model_name(cfg), args.alias, args.version, args.host, args.port)
    return 0


def _dvc_yaml(layout, write: bool, check: bool) -> int:
    from olora.layout import DVC_YAML
    from olora.stages import dvc_yaml

    text = dvc_yaml()
    target = layout.path(DVC_YAML)
    if check:
        if not target.is_file() or target.read_text() != text:
            print(f"{target} differs from the stage table; run `olora dvc-yaml --write`", file=sys.stderr)
            return 1
        return 0
    if write:
        target.write_text(text)
    else:
        print(text, end="")
    return 0


def replace_between_markers(text: str, table: str) -> str:
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise OloraError(f"the README has no {start} ... {end} markers to replace")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{table}\n{end}{tail}"


def _params_table(readme: str | None) -> int:
    from olora.config import params_table

    table = params_table()
    if readme:
        path = Path(readme)
        path.write_text(replace_between_markers(path.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
