"""Gate designs on real comparisons (issue 32, items 3 and 4): decision, looks, questions and scoring time of each.

    python experiments/gate_designs.py CHALLENGER CHAMPION [--root .] [--stages 100,400,0]
        [--metrics mean_acc,pooled_acc] [--out reports/gate_designs.md]

For two registered versions of the project's model and each metric, three designs through the gate's own code
(`olora.tracking.gate.sequential_comparison`): the fixed gate at the first stage, the sequential gate over the
stages, the fixed gate at the last stage (0: the whole splits), each on its stages only (the gate itself never
decides on less than the sides hold). Nothing is promoted or tagged; what the designs
score is cached in the versions' runs as the gate caches it, so a design run after another reuses those scores
and its seconds count only what it scored itself (run the designs in a fresh registry to time each alone).
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
            last = looks[-1]
            lines.append(f"| {metric} | {label} | {last.outcome} | {len(looks)} | {last.n} | "
                         f"{sum(lk.seconds for lk in looks):.1f} | {comparison.diff * 100:+.2f} | "
                         f"[{last.low * 100:+.2f}, {last.high * 100:+.2f}] ({last.level * 100:.4g} %) | "
                         f"{comparison.mde * 100:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("challenger")
    parser.add_argument("champion")
    parser.add_argument("--root", default=".", help="the project (params.yaml, its tracking server)")
    parser.add_argument("--stages", default="100,400,0", help="questions per task at each look (0: the whole split)")
    parser.add_argument("--metrics", default="mean_acc,pooled_acc")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    text = table(Path(args.root).resolve(), args.challenger, args.champion, [int(s) for s in args.stages.split(",")],
                 args.metrics.split(","))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
