"""Gate designs on real comparisons (issue 32, items 3 and 4): decision, looks, questions and scoring time of each.

    python experiments/gate_designs.py CHALLENGER CHAMPION [--root .] [--stages 100,400,0]
        [--metrics mean_acc,pooled_acc] [--out reports/gate_designs.md]
    python experiments/gate_designs.py --evaluations CHALLENGER_DIR CHAMPION_DIR [--stages ...] [...]

For two registered versions of the project's model and each metric, three designs through the gate's own code
(`olora.tracking.gate.sequential_comparison`): the fixed gate at the first stage, the sequential gate over the
stages, the fixed gate at the last stage (0: the whole splits), each on its stages only (the gate itself never
decides on less than the sides hold). Nothing is promoted or tagged; what the designs
score is cached in the versions' runs as the gate caches it, so a design run after another reuses those scores
and its seconds count only what it scored itself (run the designs in a fresh registry to time each alone).

`--evaluations` compares two evaluations already made on the whole splits instead (each folder: `samples.csv` and
`metrics.json`, the evaluate stage's per-question results and metrics at `evaluate.limit: 0`, e.g. `eval/whole/*`),
so that a pair with no registered version (the base model) or no registry is compared too: the same looks and
decisions (`olora.tracking.gate.look_plan`, `run_looks`), each look on the first N questions of each task as
lm-eval's limit takes them. Its seconds are what the gate would spend scoring both sides from nothing (each look
scores the questions the previous look lacked, as `olora promote` does for a zero-shot set; a few-shot set's looks
are scored whole), at each evaluation's measured seconds per request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def designs(stages: list[int]) -> list[tuple[str, list[int]]]:
    def name(n: int) -> str:
        return "the whole splits" if n == 0 else f"{n} a task"

    return [(f"fixed, {name(stages[0])}", stages[:1]), (f"sequential {stages}", stages),
            (f"fixed, {name(stages[-1])}", stages[-1:])]


def table(root: Path, challenger: str, champion: str, stages: list[int], metrics: list[str]) -> str:
    from olora.config import load_config
    from olora.tracking.client import Tracking
    from olora.tracking.gate import sequential_comparison
    from olora.tracking.names import model_name
    from olora.tracking.registry import open_model

    lines = [f"Challenger v{challenger} against champion v{champion}.", "",
             "| metric | design | decision | looks | questions per side | scoring s | gain | interval (level) | MDE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for metric in metrics:
        for label, design in designs(stages):
            cfg = load_config(root / "params.yaml", {"register.stages": design, "register.promote_metric": metric})
            name = model_name(cfg)
            c = open_model(Tracking.of(cfg, root), name)
            comparison, _, looks = sequential_comparison(cfg, c, name, challenger, champion, root, whole_set=False)
            lines.append(_row(metric, label, comparison, looks))
    return "\n".join(lines) + "\n"


def _evaluation(folder: Path):
    """An evaluation's per-question rows, their fingerprint and its seconds per log-likelihood request."""
    import json

    from olora.evaluation import samples
    from olora.evaluation.result import EvalResult

    metrics = EvalResult.from_json(json.loads((folder / "metrics.json").read_text()), str(folder / "metrics.json"))
    rows = samples.read_samples(folder / "samples.csv")
    samples.check_matches(rows, metrics.questions or {}, str(folder / "samples.csv"))
    return rows, metrics.questions, metrics.timing.seconds / metrics.timing.requests


def table_from_files(root: Path, challenger: Path, champion: Path, stages: list[int], metrics: list[str]) -> str:
    from olora.config import load_config
    from olora.evaluation import samples
    from olora.tracking import gate

    ours, theirs = _evaluation(challenger), _evaluation(champion)
    lines = [f"Challenger {challenger} against champion {champion} (seconds: scoring both sides at their measured "
             "rates, each look the questions the one before lacked).", "",
             "| metric | design | decision | looks | questions per side | scoring s | gain | interval (level) | MDE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for metric in metrics:
        for label, design in designs(stages):
            cfg = load_config(root / "params.yaml", {"register.stages": design, "register.promote_metric": metric})
            final = gate.comparison_set(cfg, ours[1], theirs[1])

            held: list[set] = [set(), set()]  # what each side was scored on at the looks before

            def sides_at(target, held=held):
                cut = [[r for r in samples.first(side[:2], target["limit"])[0] if r["task"] in target["tasks"]]
                       for side in (theirs, ours)]
                for done in held if final["num_fewshot"] else ():  # a few-shot set is scored whole at each look
                    done.clear()
                seconds = sum(len(r["loglik"]) * side[2] for rows, side, done in zip(cut, (theirs, ours), held)
                              for r in rows if (r["task"], r["doc_id"]) not in done)
                for rows, done in zip(cut, held):
                    done.update((r["task"], r["doc_id"]) for r in rows)
                return cut[0], cut[1], {}, seconds

            comparison, _, looks = gate.run_looks(cfg, final, gate.look_plan(cfg, final, root, whole_set=False), sides_at)
            lines.append(_row(metric, label, comparison, looks))
    return "\n".join(lines) + "\n"


def _row(metric: str, label: str, comparison, looks) -> str:
    last = looks[-1]
    return (f"| {metric} | {label} | {last.outcome} | {len(looks)} | {last.n} | {sum(lk.seconds for lk in looks):.1f} | "
            f"{comparison.diff * 100:+.2f} | [{last.low * 100:+.2f}, {last.high * 100:+.2f}] ({last.level * 100:.4g} %) | "
            f"{comparison.mde * 100:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("challenger", help="a registered version, or with --evaluations an evaluation's folder")
    parser.add_argument("champion")
    parser.add_argument("--evaluations", action="store_true",
                        help="CHALLENGER and CHAMPION are folders of whole-split evaluations (samples.csv, metrics.json)")
    parser.add_argument("--root", default=".", help="the project (params.yaml, its tracking server)")
    parser.add_argument("--stages", default="100,400,0", help="questions per task at each look (0: the whole split)")
    parser.add_argument("--metrics", default="mean_acc,pooled_acc")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    root, stages = Path(args.root).resolve(), [int(s) for s in args.stages.split(",")]
    if args.evaluations:
        text = table_from_files(root, Path(args.challenger), Path(args.champion), stages, args.metrics.split(","))
    else:
        text = table(root, args.challenger, args.champion, stages, args.metrics.split(","))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
