"""Benchmark: docker/'s CPU image and compose stack with podman: build times, size, a tiny run, stack start.

Uses tests/containers/harness.py (the container tier's stand-ins, build secrets and podman settings):
- build of docker/Dockerfile: cold (`--no-cache`), warm (nothing changed) and after a change under src/
  (a copy of the build context with one line added to a module: only the project layer rebuilds);
- the image's size and what takes it (podman history's layers, the largest installed packages);
- `dvc repro` of the tiny overlay in a mounted project, in the container and on the host, one after the other;
- docker/compose.yaml started with podman-compose until every service is ready, then `down`.

    python bench/bench_containers.py [--out bench/results] [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import publish

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "containers"))
sys.path.insert(0, str(REPO / "src"))
import harness  # noqa: E402

BIN = Path(sys.executable).parent
UID = 10001


def build_times(skip_cold: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    with harness.torch_index() as index:
        args = {"TORCH_INDEX_URL": index}
        if not skip_cold:
            start = time.monotonic()
            harness.podman("build", "--no-cache", "--pull=never", "--network", "host", "--format", "docker", *harness.build_secrets(),
                           "--build-arg", f"TORCH_INDEX_URL={index}", "--ignorefile", str(harness.DOCKER / "Dockerfile.dockerignore"),
                           "-f", str(harness.DOCKER / "Dockerfile"), "-t", harness.IMAGE, str(REPO))
            out["cold (--no-cache)"] = time.monotonic() - start
        out["warm (nothing changed)"] = harness.build(harness.IMAGE, REPO, harness.DOCKER / "Dockerfile", args,
                                                      harness.DOCKER / "Dockerfile.dockerignore")
        with tempfile.TemporaryDirectory() as tmp:  # the context as the dockerignore cuts it, one module edited
            context = Path(tmp)
            for name in ("requirements.lock", "pyproject.toml", "README.md"):
                shutil.copy(REPO / name, context / name)
            (context / "docker").mkdir()
            for name in ("Dockerfile", "Dockerfile.dockerignore", "not-in-image.txt"):
                shutil.copy(REPO / "docker" / name, context / "docker" / name)
            shutil.copytree(REPO / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            with open(context / "src" / "olora" / "cli.py", "a") as f:
                f.write(f"# bench {uuid.uuid4().hex}\n")
            out["after a change under src/"] = harness.build("olora-pipeline:bench", context, context / "docker" / "Dockerfile", args,
                                                            context / "docker" / "Dockerfile.dockerignore")
            harness.podman("rmi", "olora-pipeline:bench", check=False)
    return out


def layer_label(created_by: str) -> str:
    """A Dockerfile step as `podman history` records it, without the build-argument prefix and the shell."""
    words = " ".join(created_by.split())
    words = re.sub(r"^\|\d+ (\S+=\S+ )+", "", words)
    words = words.replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", "RUN ")
    words = re.sub(r"--mount=type=secret,\S+ ", "", words)
    return (words[:80] + "…") if len(words) > 80 else words


def size_breakdown() -> dict:
    layers = []
    for line in harness.podman("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", harness.IMAGE).stdout.splitlines():
        size, created = line.split("\t", 1)
        if size not in ("0 B", "0B"):
            layers.append([size, layer_label(created)])
    script = ("import json, pathlib, subprocess; site = pathlib.Path('/opt/venv/lib/python3.11/site-packages'); "
              "sizes = {p.name: int(subprocess.run(['du', '-sk', str(p)], capture_output=True, text=True).stdout.split()[0]) "
              "for p in site.iterdir() if p.is_dir() and not p.name.endswith('-info')}; "
              "pyc = sum(f.stat().st_size for f in site.rglob('*.pyc')) // 1024; "
              "print(json.dumps({'packages': sorted(sizes.items(), key=lambda kv: -kv[1])[:12], 'pyc_kb': pyc}))")
    inside = json.loads(harness.podman("run", "--rm", harness.IMAGE, "python", "-c", script).stdout.strip().splitlines()[-1])
    return {"bytes": harness.image_size(harness.IMAGE), "layers": layers, **inside}


def tiny_repro() -> dict[str, float]:
    from olora.overlay import build_tiny_llama, copy_project, write_params

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(Path(tmp) / "tiny-llama")
        inside = Path(tmp) / "inside"
        inside.mkdir()
        copy_project(inside)
        write_params(inside, model, {"evaluate.tasks": ["arc_easy"]})
        for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
            subprocess.run(args, cwd=inside, check=True, capture_output=True)
        host = Path(tmp) / "host"
        shutil.copytree(inside, host, symlinks=True)
        subprocess.run(["chown", "-R", f"{UID}:{UID}", str(inside)], check=True)
        start = time.monotonic()
        harness.podman("run", "--rm", "-v", f"{inside}:/home/olora/work/p", "-w", "/home/olora/work/p", harness.IMAGE, "dvc", "repro")
        container = time.monotonic() - start
        start = time.monotonic()
        subprocess.run([str(BIN / "dvc"), "repro"], cwd=host, check=True, capture_output=True,
                       env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
        on_host = time.monotonic() - start
    return {"container": container, "host": on_host}


def stack_start() -> dict:
    sys.path.append(str(REPO / "tests"))
    from ports import free_port
    from olora.ops import stack

    with tempfile.TemporaryDirectory() as tmp:
        config = stack.stack_config(Path(tmp) / "s", environ={var: str(free_port()) for _, var, _ in stack.PORTS.values()})
        env_file = stack.write_private(Path(tmp) / "compose.env", "".join(
            f"{k}={v}\n" for k, v in stack.compose_env(config, stack.load_secrets(config.state_dir)).items()))
        (Path(tmp) / "remote.git").mkdir()
        compose = harness.Compose(f"olora-b-{uuid.uuid4().hex[:8]}", env_file, {"OLORA_TEST_GIT_REMOTE": str(Path(tmp) / "remote.git")})
        try:
            start = time.monotonic()
            with harness.healthcheck_ticker(label=f"com.docker.compose.project={compose.project}"):
                ready = compose.up_in_order()
            total = time.monotonic() - start
        finally:
            start = time.monotonic()
            compose.down()
            down = time.monotonic() - start
            left = compose.leftovers()
    return {"ready_s": total, "per_service": ready, "down_s": down, "left": left}


def render(payload: dict) -> str:
    builds, size, repro, started = payload["builds"], payload["size"], payload["tiny_repro"], payload["stack"]
    rows = ["| measure | value |", "|---|---|"]
    rows += [f"| build {k} | {v:.1f} s |" for k, v in builds.items()]
    rows += [f"| image size ({harness.IMAGE}) | {size['bytes'] / 1e9:.2f} GB |",
             f"| .pyc files in the venv | {size['pyc_kb'] / 1e3:.0f} MB |"]
    rows += ["| layer: " + created.replace("|", "\\|") + f" | {s} |" for s, created in size["layers"]]
    rows += [f"| package {name} | {kb / 1e3:.0f} MB |" for name, kb in size["packages"]]
    rows += [f"| tiny `dvc repro`, container | {repro['container']:.1f} s |", f"| tiny `dvc repro`, host | {repro['host']:.1f} s |",
             f"| container / host | {repro['container'] / repro['host']:.2f} |",
             f"| compose stack: `up` until every service is ready | {started['ready_s']:.1f} s |",
             f"| compose stack: `down --volumes` | {started['down_s']:.1f} s |",
             f"| left after `down` | {sum(len(v) for v in started['left'].values())} |"]
    return (f"Containers with podman ({payload['machine']}; one run, shared machine)\n\n" + "\n".join(rows)
             + "\n\nPer service, seconds from `up` until ready: " + json.dumps(started["per_service"]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--skip-cold", action="store_true", help="no --no-cache build (it downloads every package again)")
    args = parser.parse_args()
    if reason := harness.missing():
        sys.exit(f"bench_containers: {reason}")
    prepared = harness.build_all()  # base and stand-ins where absent, and the image (cached where it can be)
    builds = build_times(args.skip_cold)
    size = size_breakdown()
    repro = tiny_repro()
    started = stack_start()
    payload = {"prepared": prepared, "builds": builds, "size": size, "tiny_repro": repro, "stack": started,
               "machine": f"{os.cpu_count()} cores, podman {harness.podman('version', '--format', '{{.Client.Version}}').stdout.strip()}"}
    publish(args.out, "containers", payload, render(payload))


if __name__ == "__main__":
    main()
