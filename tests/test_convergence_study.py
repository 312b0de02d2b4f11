"""The recorded convergence study stays readable: its report rebuilds from the committed runs; new studies are
`olora compare` (tests/orchestration/test_compare.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from overlay import REPO


def test_recorded_study_report_rebuilds_and_the_grid_driver_points_at_olora_compare(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    shutil.copy(REPO / "docs/results/convergence_runs.json", tmp_path / "docs/results/convergence_runs.json")
    script = str(REPO / "experiments" / "convergence.py")
    done = subprocess.run([sys.executable, script, "--report-only", "--root", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "docs/results.md").read_text()
    assert report.splitlines()[0] == (REPO / "docs/results.md").read_text().splitlines()[0]
    assert "| 8 | olora |" in report and (tmp_path / "docs/figures/convergence_val_loss.png").stat().st_size > 1000
    refused = subprocess.run([sys.executable, script, "--root", str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode != 0 and "olora compare" in refused.stderr
