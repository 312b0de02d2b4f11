"""`olora` commands that are not stages: registry aliases, restore, serving, and the generated files.

    olora promote [--version N] [--force]    move alias champion to the challenger if it passes the gate
    olora rollback                           restore the previous champion
    olora restore [--version N]              check out a registered version's recorded run here
    olora serve [--alias champion]           answer HTTP requests with a registered version, following its alias
    olora serve-webhook --url URL            register the registry webhook that tells a server the alias moved
    olora publish-data PATH [-m MSG]         dvc add + dvc push + commit + git push + the Prefect data event
    olora eval-plan --mde 1.5                questions per task a paired comparison needs to detect 1.5 points
    olora compare --methods olora,lora       which method wins here: rate search per method, methods x ranks x seeds, report
    olora doctor [--no-load]                 every registered version, alias and runs/* branch checked against the stores
    olora check [--deployment]               validate params.yaml, run every stage's pre-flight checks, print the configuration
                                             (--deployment: a worker's run would record outside its clone)
    olora dvc-yaml [--write|--check]         dvc.yaml from the stage table
    olora params-table [--write FILE]        the parameter table from the config's docstrings

Each command resolves the tracking server once (`Tracking.of`) and passes it down. Imported by
`olora.cli` only when one of these runs: no stage depends on this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from olora.cliargs import base_parser, parse_set, setup_process
from olora.errors import OloraError
from olora.layout import Layout


def build_parser():
    parser = base_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # the subparsers action base_parser made
    pr = sub.add_parser("promote", help="move alias champion to the challenger if its gain on the same questions is "
                        "significant (the paired gate)")
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
    sv.add_argument("--poll-seconds", type=float, default=30.0,
                    help="look at the alias every N seconds and switch when it moved (0: off; the fallback where the "
                         "registry's webhooks cannot reach this server). Webhooks: set $OLORA_WEBHOOK_SECRET")
    wh = sub.add_parser("serve-webhook", help="register (or update) the registry webhook (event model_version_alias.created) "
                        "that tells `olora serve` at URL when an alias moves, signed with $OLORA_WEBHOOK_SECRET")
    wh.add_argument("--model", help="registered model name (default: from params)")
    wh.add_argument("--url", required=True, help="the server's webhook endpoint, e.g. http://10.0.0.5:5001/webhook")
    rs = sub.add_parser("restore", help="check out a registered version's recorded run here: git fetch + checkout + dvc pull")
    rs.add_argument("--model", help="registered model name (default: from params)")
    rs.add_argument("--alias", default="champion", help="alias to restore (default: champion)")
    rs.add_argument("--version", help="restore this version instead of an alias")
    pd = sub.add_parser("publish-data", help="publish a data file under data/raw/ as a new data version: dvc add, dvc push, "
                        "commit its .dvc pointer, git push, then the Prefect event olora.data.published that starts a retrain")
    pd.add_argument("path", help="the data file, e.g. data/raw/train.jsonl")
    pd.add_argument("-m", "--message", help="commit message (default: 'data: PATH')")
    pd.add_argument("--no-event", action="store_true",
                    help="send no event (no Prefect API here); the data watcher deployment announces the version")
    cp = sub.add_parser("compare", help="which adapter.init wins here: a learning-rate search per method (Optuna, on "
                        "Prefect workers), then methods x ranks x seeds through the pipeline, one report (resumes)")
    cp.add_argument("--methods", default="olora,lora", help="adapter.init values, comma-separated (default: olora,lora)")
    cp.add_argument("--ranks", default="8", help="adapter.r values, comma-separated (default: 8)")
    cp.add_argument("--seeds", default="0,1", help="seeds, comma-separated, at least two (default: 0,1)")
    cp.add_argument("--lr-range", help="LOW,HIGH learning rates searched log-uniformly (default: 1e-5,3e-3)")
    for flag, what in (("--trials", "trial budget per study"), ("--startup-trials", "trials before the pruner acts"),
                       ("--steps", "train.max_steps of a trial"), ("--eval-steps", "steps between a trial's reported losses"),
                       ("--heartbeat", "seconds between trial heartbeats"), ("--grace", "seconds without one: trial failed, retried")):
        cp.add_argument(flag, type=int, help=what)
    cp.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    cp.add_argument("--storage", help="Optuna storage URL (default: $OLORA_OPTUNA_STORAGE, else .olora/optuna.db)")
    cp.add_argument("--trial-deployment", default="olora-search-trial/search-trial")
    cp.add_argument("--run-deployment", default="olora-pipeline/on-demand")
    cp.add_argument("--no-push", action="store_true", help="runs skip `dvc push` (a machine without a DVC remote)")
    cp.add_argument("--adopt", metavar="FILE", help="write a comparison's adopt.yaml into params.yaml, and stop")
    ep = sub.add_parser("eval-plan", help="questions per task (and time) a paired comparison needs to detect a target "
                        "difference, from the base model's per-question results")
    ep.add_argument("--mde", type=float, required=True, help="the target difference, in accuracy points (e.g. 1.5)")
    dr = sub.add_parser("doctor", help="check the project's stores in one pass: every registered version's run, model files "
                        "and card, every alias (champion loaded), every runs/* branch's DVC outputs in the DVC remote; "
                        "prints what is broken and how to repair it, exit 1 if anything is")
    dr.add_argument("--no-load", action="store_true", help="do not download and load the champion (faster)")
    ck = sub.add_parser("check", help="validate params.yaml, run every stage's pre-flight checks (no weights load: the "
                        "base's config gives its layers) and print the resolved configuration")
    ck.add_argument("--deployment", action="store_true", help="also check, on a clone of HEAD as a worker makes it, that "
                    "a deployment run's MLflow store and DVC remote lie outside that clone (else they are lost with it)")
    dy = sub.add_parser("dvc-yaml", help="print dvc.yaml as generated from the stage table")
    dy.add_argument("--write", action="store_true", help="write it to ROOT/dvc.yaml")
    dy.add_argument("--check", action="store_true", help="exit 1 when ROOT/dvc.yaml differs")
    pt = sub.add_parser("params-table", help="print the parameter table generated from the config's docstrings")
    pt.add_argument("--write", metavar="FILE", help="replace the table between the markers in this file")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(Path(args.root))
    try:
        setup_process(layout.root)
        if args.command == "dvc-yaml":
            return _dvc_yaml(layout, args.write, args.check)
        if args.command == "params-table":
            return _params_table(args.write)
        if args.command == "publish-data":
            from olora.orchestration.publish import publish_data

            done = publish_data(layout.root, args.path, args.message, event=not args.no_event)
            print(f"published {done.path}: commit {done.commit[:12]} on {done.branch} ({done.git_remote}), content in "
                  f"{done.dvc_remote}, data version {done.data_version[:16]}; event "
                  + ("olora.data.published sent" if done.event_sent else "not sent (the data watcher announces it)"))
            return 0
        if args.command == "compare":
            return _compare(layout, args)
        from olora.config import dump_config, load_config

        cfg = load_config(layout.params, parse_set(args.set))
        if args.command == "check":
            from olora.stages import preflight

            preflight(cfg, layout.root)  # every stage's checks that need no weights, with the stages' own messages
            print(dump_config(cfg), end="")
            if args.deployment:
                from olora.orchestration.durable import check_deployment

                print(check_deployment(layout.root, cfg))
            return 0
        if args.command == "eval-plan":
            from olora.evaluation.plan import eval_plan

            print(eval_plan(cfg, layout, args.mde))
            return 0
        from olora.tracking.client import Tracking

        tracking = Tracking.of(cfg, layout.root)
        if args.command == "promote":
            from olora.tracking import gate

            from olora.layout import PROMOTION

            decision = gate.promote(cfg, tracking, args.model, args.version, args.force, layout.path(PROMOTION),
                                        layout.root)
            print(("PROMOTED: " if decision.promote else "KEPT CHAMPION: ") + decision.reason)
        elif args.command == "doctor":
            from olora.orchestration.doctor import doctor

            report = doctor(tracking, layout.root, load=not args.no_load)
            print(report.text())
            return 0 if report.healthy else 1
        elif args.command == "rollback":
            from olora.tracking import registry

            print(f"champion is now version {registry.rollback(cfg, tracking, args.model)}")
        elif args.command == "restore":
            from dataclasses import asdict

            from olora.orchestration.restore import restore

            print(json.dumps(asdict(restore(cfg, tracking, layout.root, args.model, args.alias, args.version)), indent=2))
        elif args.command == "serve":
            from olora.serving.server import serve
            from olora.tracking.names import model_name

            if args.poll_seconds < 0:
                raise OloraError(f"--poll-seconds={args.poll_seconds} is negative; use 0 (off) or a number of seconds")
            serve(cfg, tracking, args.model or model_name(cfg), args.alias, args.version, args.host, args.port,
                  args.poll_seconds)
        elif args.command == "serve-webhook":
            import os

            from olora.serving.server import SECRET_ENV, register_webhook
            from olora.tracking.names import model_name

            secret = os.environ.get(SECRET_ENV, "")
            if len(secret) < 16:
                raise OloraError(f"${SECRET_ENV} must hold the webhook's secret, at least 16 characters (e.g. "
                                 "`openssl rand -hex 32`); the server is started with the same value")
            name = args.model or model_name(cfg)
            hook = register_webhook(tracking.client(), name, args.url, secret)
            print(f"webhook {hook}: model_version_alias.created of {name} -> {args.url}")
    except OloraError as exc:
        print(f"olora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _compare(layout: Layout, args) -> int:
    from olora.orchestration import compare

    if args.adopt:
        print(json.dumps(compare.adopt(layout.root, Path(args.adopt)), indent=2))
        return 0
    spec = compare.spec_from_args(args.methods, args.ranks, args.seeds, args.lr_range, args.confidence, trials=args.trials,
                                  startup_trials=args.startup_trials, steps=args.steps, eval_steps=args.eval_steps,
                                  heartbeat=args.heartbeat, grace=args.grace)
    out = compare.run(layout.root, spec, args.trial_deployment, args.run_deployment, not args.no_push, args.storage)
    print(json.dumps(out, indent=2))
    return 0


def _dvc_yaml(layout: Layout, write: bool, check: bool) -> int:
    from olora.devtools import dvc_yaml
    from olora.layout import DVC_YAML

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


def _params_table(path: str | None) -> int:
    from olora.devtools import params_table, replace_between_markers

    table = params_table()
    if path:
        Path(path).write_text(replace_between_markers(Path(path).read_text(), table))
    else:
        print(table)
    return 0
