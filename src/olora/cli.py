"""`olora` command line: one subcommand per pipeline stage (what dvc.yaml's `cmd:` lines run)."""

from __future__ import annotations

import argparse
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
    except OloraError as exc:
        print(f"olora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
