"""`olora` command line: one subcommand per pipeline stage (what dvc.yaml's `cmd:` lines run)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from olora.errors import OloraError


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
    sub.add_parser("prepare", help="load, validate, render, dedupe and split the fine-tuning data")
    sub.add_parser("init", help="initialise the adapter with OLoRA (or LoRA) and check the invariants")
    sub.add_parser("train", help="fine-tune the adapter and export a plain LoRA")
    ev = sub.add_parser("evaluate", help="lm-eval on the benchmark tasks")
    ev.add_argument("which", choices=["base", "adapter"], help="the untouched base or base + exported adapter")
    sub.add_parser("register", help="register the exported adapter in the MLflow Model Registry (alias challenger)")
    pr = sub.add_parser("promote", help="move alias champion to the challenger if it passes the gate")
    pr.add_argument("--model", help="registered model name (default: from params)")
    pr.add_argument("--version", help="version to consider (default: the challenger)")
    pr.add_argument("--force", action="store_true", help="promote regardless of the gate")
    rb = sub.add_parser("rollback", help="restore the previous champion")
    rb.add_argument("--model", help="registered model name (default: from params)")
    sub.add_parser("check", help="validate params.yaml and print the resolved configuration")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from olora import pipeline
    from olora.config import dump_config, load_config

    layout = pipeline.Layout(Path(args.root))
    try:
        overrides = _parse_set(args.set)
        if args.command == "check":
            print(dump_config(load_config(layout.params, overrides)), end="")
        elif args.command == "prepare":
            pipeline.stage_prepare(layout, overrides)
        elif args.command == "init":
            pipeline.stage_init(layout, overrides)
        elif args.command == "train":
            pipeline.stage_train(layout, overrides)
        elif args.command == "evaluate":
            pipeline.stage_evaluate(args.which, layout, overrides)
        elif args.command == "register":
            print(json.dumps(pipeline.stage_register(layout, overrides), indent=2))
        elif args.command in ("promote", "rollback"):
            from olora import registry

            cfg = load_config(layout.params, overrides)
            if args.command == "promote":
                decision = registry.promote(cfg, layout.root, args.model, args.version, args.force)
                print(("PROMOTED: " if decision.promote else "KEPT CHAMPION: ") + decision.reason)
            else:
                print(f"champion is now version {registry.rollback(cfg, layout.root, args.model)}")
    except OloraError as exc:
        print(f"olora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
