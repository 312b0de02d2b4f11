"""The 2026 OLoRA-vs-LoRA convergence study's recorded runs, kept readable; new comparisons are `olora compare`.

    python experiments/convergence.py --report-only   # rebuild docs/results.md and figures from docs/results/convergence_runs.json
    olora compare --methods olora,lora --ranks 8,32 --seeds 0,1,2    # a new study (`make study`): Optuna rate search per
                                                                     # method on Prefect workers, then the paired report

The study that produced docs/results.md ran each run as a `dvc exp run` in the checkout, one after another, over a
fixed rate grid (its settings and every run are in the manifest). `olora compare` (olora.orchestration.compare)
replaces it: a learning-rate search per method, runs in isolated workspaces on any worker, Holm-corrected paired
differences, and a resumable report under reports/compare/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the recorded runs")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--root", default=str(ROOT), help="the project that holds OUT/results/convergence_runs.json")
    args = parser.parse_args()
    if not args.report_only:
        sys.exit("the grid study is replaced by `olora compare` (e.g. `olora compare --methods olora,lora --ranks 8,32 "
                 "--seeds 0,1,2`, or `make study`); this script only rebuilds the recorded study's report: --report-only")
    out = Path(args.root).resolve() / args.out
    manifest_path = out / "results" / "convergence_runs.json"
    if not manifest_path.is_file():
        sys.exit(f"no recorded runs at {manifest_path}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convergence_report import write_report

    write_report(json.loads(manifest_path.read_text()), out)
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
