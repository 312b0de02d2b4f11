"""Benchmark: the shared stack (`make stack`: docker/compose.yaml) and isolated runs on its workers.

In a temporary project on free loopback ports, with the tiny overlay model and two workers on this machine
(tests/stackfix.py's ComposeStack, as the stack tier runs them; the images must be present or buildable:
`python tests/containers/harness.py build` where the registries cannot be reached):
- `make stack` cold start (first `up`: initdb, migrations, bucket, pool) and warm start (`down` + `up`);
- two tiny pipeline variants (on-demand deployment runs, each in its own workspace, recorded and pushed)
  run one after the other, then two more run at once on the stack's two workers: wall time of each mode;
- the cost of isolation in each run: the `open_workspace` (clone + DVC checkout) and `record_run`
  (commit, `dvc push` to the S3 remote, `git push`, MLflow tags) task times, against the flow run's time.

A warm-up run first fills the shared DVC cache with the stages every variant shares (prepare, init,
base evaluation), so every timed variant runs the same work: train, evaluate, register (variants
differ only in `train.seed`). Prints a table; writes JSON + markdown under --out.

    python bench/bench_stack.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import publish

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from ports import free_ports  # noqa: E402 - the tests' one free-port helper
from stackfix import ComposeStack, harness  # noqa: E402 - the stack tier's driver of the compose stack

REPO = Path(__file__).resolve().parents[1]
from olora.ops import envfile, prefect_api, stack
from olora.overlay import build_tiny_llama, team_checkout

BIN = Path(sys.executable).parent


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.monotonic()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.monotonic() - start


class Runs:
    def __init__(self, config: stack.StackConfig, secret: dict, root: Path, env: dict[str, str]):
        self.url, self.headers, self.root, self.env = config.prefect_url, prefect_api.headers(secret), root, env

    def start(self, seed: int) -> str:
        out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "olora-pipeline/on-demand", "--param",
                              "overrides=" + json.dumps({"train.seed": seed})], cwd=self.root, env=self.env,
                             capture_output=True, text=True, check=True)
        return next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)

    def wait(self, ids: list[str], seconds: float = 1800) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            states = {i: prefect_api.request(f"{self.url}/flow_runs/{i}", headers=self.headers)[1]["state"]["type"] for i in ids}
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()):
                if set(states.values()) != {"COMPLETED"}:
                    raise SystemExit(f"flow runs ended {states}")
                return
            time.sleep(1)
        raise SystemExit(f"flow runs {ids} not done in {seconds} s")

    def costs(self, run_id: str) -> dict[str, float]:
        run = prefect_api.request(f"{self.url}/flow_runs/{run_id}", headers=self.headers)[1]
        _, tasks = prefect_api.request(f"{self.url}/task_runs/filter", headers=self.headers,
                                  data={"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
        by = {}
        for t in tasks:
            name = t["name"].split("-")[0] if t["name"].startswith(("open_workspace", "record_run")) else t["name"]
            by[name] = by.get(name, 0.0) + float(t["total_run_time"])
        return {"flow": float(run["total_run_time"]), "open_workspace": by.get("open_workspace", 0.0),
                "record_run": by.get("record_run", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        tmp = Path(tmp)
        if reason := harness.missing():
            raise SystemExit(reason)
        harness.build_standins()
        if not harness.exists(harness.IMAGE):
            harness.build_all()
        env = {k: v for k, v in harness.env().items()
               if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "OLORA_STACK_", "COMPOSE_"))}
        env.update(PATH=f"{BIN}:{env['PATH']}", DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   OLORA_NUM_THREADS="1", PREFECT_HOME=str(tmp / "prefect-home"),
                   COMPOSE_PROJECT_NAME=f"olora-bench-{os.getpid()}")
        for (_, var, _), port in zip(stack.PORTS.values(), free_ports(len(stack.PORTS))):
            env[var] = str(port)
        model = build_tiny_llama(tmp / "tiny-llama")
        remote = tmp / "team.git"
        root = team_checkout(tmp / "deployer", remote, model, {"evaluate.tasks": ["arc_easy"]}, env)
        s = ComposeStack(root, env)
        try:
            for command in ("up", "down", "up"):
                s.run(command)
            (cold, warm), (down,) = s.timings["up"], s.timings["down"]
            s.start_worker(1)
            s.start_worker(2)
            config, secret = s.config, s.secret
            env.update(envfile.read_env_file(root / "stack.env"), OLORA_GIT_REMOTE=str(remote), OLORA_GIT_BRANCH="main")
            timed([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], root, env)
            runs = Runs(config, secret, root, env)
            warmup = runs.start(0)
            runs.wait([warmup])
            start = time.monotonic()
            sequential = []
            for seed in (1, 2):
                sequential.append(runs.start(seed))
                runs.wait(sequential[-1:])
            seq_seconds = time.monotonic() - start
            start = time.monotonic()
            parallel = [runs.start(seed) for seed in (3, 4)]
            runs.wait(parallel)
            par_seconds = time.monotonic() - start
            costs = [runs.costs(i) for i in sequential + parallel]
        finally:
            s.stop_workers()
            subprocess.run([sys.executable, "-m", "olora.ops.stack", "down", "--volumes"], cwd=root, env=env, capture_output=True)
    iso = [c["open_workspace"] + c["record_run"] for c in costs]
    payload = {
        "stack_cold_up_s": round(cold, 1), "stack_down_s": round(down, 1), "stack_warm_up_s": round(warm, 1),
        "two_variants_sequential_s": round(seq_seconds, 1), "two_variants_two_workers_s": round(par_seconds, 1),
        "speedup": round(seq_seconds / par_seconds, 2),
        "runs": costs, "isolation_s_median": round(statistics.median(iso), 2),
        "isolation_share_median": round(statistics.median(i / c["flow"] for i, c in zip(iso, costs)), 3),
        "cpus": os.cpu_count(),
    }
    lines = [
        f"Shared stack and isolated runs (tiny overlay, {os.cpu_count()} CPU cores, 1 torch thread per run)", "",
        "| measure | seconds |", "|---|---|",
        f"| `make stack` cold start (first `up`) | {payload['stack_cold_up_s']} |",
        f"| `make stack-down` | {payload['stack_down_s']} |",
        f"| `make stack` warm start (data kept) | {payload['stack_warm_up_s']} |",
        f"| two variants, one after the other | {payload['two_variants_sequential_s']} |",
        f"| two variants at once on two workers | {payload['two_variants_two_workers_s']} (x{payload['speedup']}) |",
        "", "Isolation cost per run (Prefect task run times):", "",
        "| run | flow run s | open_workspace s | record_run s (dvc push, git push, tags) | isolation share |", "|---|---|---|---|---|",
    ]
    for mode, c in zip(["sequential 1", "sequential 2", "parallel 1", "parallel 2"], costs):
        share = (c["open_workspace"] + c["record_run"]) / c["flow"]
        lines.append(f"| {mode} | {c['flow']:.1f} | {c['open_workspace']:.1f} | {c['record_run']:.1f} | {share:.2f} |")
    publish(args.out, "stack", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
