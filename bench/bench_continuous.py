"""Benchmark: continuous training's latencies on real services, and the docs' screenshots.

Runs `tests/orchestration/test_continuous_training.py` (a `prefect server`, `prefect deploy --all`, a
process worker, a bare git remote, a DVC remote folder, SQLite MLflow, the tiny model) and reports
what it measured: `olora publish-data` (its git push) to the triggered flow run's start and to the
version's registration, and `olora promote` to the first answer from the new version of a running
`olora serve --alias champion` (polling every 2 s), with the requests a client sent meanwhile. With
chromium on PATH, also writes the Prefect automation, the triggered run and the MLflow version page
as PNGs into --figures.

    python bench/bench_continuous.py [--out bench/results] [--figures docs/figures]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import publish

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/orchestration/test_continuous_training.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--figures", default=str(REPO / "docs" / "figures"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        env = {**os.environ, "OLORA_CT_TIMINGS": str(timings)}
        if shutil.which("chromium"):
            Path(args.figures).mkdir(parents=True, exist_ok=True)
            env["OLORA_CT_SCREENSHOTS"] = str(Path(args.figures).resolve())
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-m", "integration", TEST],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not timings.is_file():
            sys.exit(f"the continuous-training run failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
        row = json.loads(timings.read_text())
    table = "\n".join([
        f"Continuous training on real services (tiny model, {os.cpu_count()} cores): latencies of one data version",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| `olora publish-data` (git push) -> triggered flow run starts | {row['push_to_flow_run_start_s']} |",
        f"| `olora publish-data` (git push) -> version registered | {row['push_to_registration_s']} |",
        f"| `olora promote` -> `olora serve --alias champion` answers from it | {row['promotion_to_served_switch_s']} |",
        "",
        f"{row['requests_during_switch']} requests sent during the data run and the switch, every one answered 200.",
    ])
    publish(args.out, "continuous", row, table)


if __name__ == "__main__":
    main()
