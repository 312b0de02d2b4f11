"""Shared by the benchmark scripts: one case per subprocess, and one way to publish a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_case(cmd: list[str]) -> dict | None:
    """Run one benchmark case in a fresh process; its last stdout line is its JSON row (None on failure)."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_label(device: str, dtype: str, threads: int | None = None) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()} ({dtype})"
    return f"CPU ({os.cpu_count()} cores, {threads if threads is not None else '?'} threads, {dtype})"


def publish(out_dir: str | Path, tag: str, payload, table: str) -> None:
    """Print the table and write it as `tag`.md next to the raw results in `tag`.json."""
    print(table)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{tag}.md").write_text(table + "\n")
