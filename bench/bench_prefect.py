"""Benchmark: Prefect's overhead per process, ephemeral API vs a running `prefect server`.

Times, in fresh processes: plain Python calling a no-op function (baseline), the same wrapped as a
Prefect flow with one task on the ephemeral API, and on a real server started here on a loopback
port. Overhead = flow time - baseline. Prints a table; writes JSON + markdown under --out.

    python bench/bench_prefect.py [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import publish

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from ports import free_port  # noqa: E402 - the tests' one free-port helper

PLAIN = "def step(x):\n    return x + 1\nprint(step(1))\n"
FLOW = (
    "from prefect import flow, task\n"
    "@task\ndef step(x):\n    return x + 1\n"
    "@flow\ndef trivial():\n    return step(1)\n"
    "print(trivial())\n"
)


def timed(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="prefect-bench-")
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
    env.pop("PREFECT_API_URL", None)
    rows = {"plain python": [timed(PLAIN, env) for _ in range(args.repeats)]}
    rows["flow, ephemeral API"] = [timed(FLOW, env) for _ in range(args.repeats)]

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        served = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        rows["flow, prefect server"] = [timed(FLOW, served) for _ in range(args.repeats)]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

    base = statistics.median(rows["plain python"])
    lines = ["Prefect overhead per process (median of %d fresh processes)" % args.repeats, "",
             "| case | median s | overhead vs plain s |", "|---|---|---|"]
    for name, values in rows.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.2f} | {med - base:+.2f} |")
    publish(args.out, "prefect", rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
