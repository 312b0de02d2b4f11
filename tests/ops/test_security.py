"""Security defaults: authenticated loopback servers, clear credential errors, safe model loading, no secrets in git.

Unit tests run by default; the tests that start real MLflow and Prefect servers are `integration`.
Passwords used here are generated at run time, so this file holds no credential the scan would flag.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port
from olora.config import ModelConfig, TrackingConfig, config_from_dict
from olora.errors import ConfigError
from olora.tracking.client import TrackingError, redact_uri, with_retries

pytestmark = pytest.mark.fault

# ------------------------------------------------------------------ the credential scan

# Committed outputs of the pipeline, scanned even if they ever stop being git-tracked.
ARTIFACTS = ["reports", "metrics", "plots", "dvc.lock", "params.yaml"]
# AWS's documented example key id (docs, SDK tests): not a credential.
ALLOWED_VALUES = {"AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
# Exact (path, line) pairs that are known and reviewed: add a documented placeholder here only if
# the placeholder rule below does not already accept it.
ALLOWED_LINES: set[tuple[str, str]] = set()
PLACEHOLDER = re.compile(
    r"^(|password|passwd|pass|pwd|pw|secret|token|\*+|x+|\.+|-+|<[^>]*>|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?(:-?[^}]*)?\}?|\{\{?[^}]*\}\}?|%\(?\w*\)?s?)$"
    r"|change[-_ ]?me|changeit|placeholder|example|your[-_]|dummy|redacted|not[-_]?set|replace[-_]?me|secret-here",
    re.IGNORECASE,
)
PATTERNS = {
    "AWS access key id": re.compile(r"\b((?:AKIA|ASIA)[0-9A-Z]{16})\b"),
    "private key": re.compile(r"(-----BEGIN (?:[A-Z]+ )?PRIVATE KEY(?: BLOCK)?-----)"),
    "password in URL": re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/:@'\"<>]+:([^\s/@'\"<>]+)@[^\s/@'\"<>]"),
    "aws_secret_access_key": re.compile(
        r"aws_secret_access_key['\"]?\s*[=:]\s*(\"[^\"\n]*\"|'[^'\n]*'|[^\s'\"#,;)]+)", re.IGNORECASE
    ),
    "secret assignment": re.compile(
        r"\b[A-Z][A-Z0-9_]*_(?:PASSWORD|PASSWD|SECRET|SECRET_KEY|SECRET_ACCESS_KEY|TOKEN|AUTH_STRING)\s*=\s*"
        r"(\"[^\"\n]*\"|'[^'\n]*'|[^\s'\"#,;)]+)"
    ),
}


def _is_placeholder(value: str, python: bool) -> bool:
    quoted = value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2
    raw = value[1:-1] if quoted else value
    if python and not quoted:
        return True  # a name or an expression (os.environ[...]): code, not a literal secret
    if any(c in raw for c in "$({[") and not quoted:
        return True  # a shell or template reference
    password = raw.split(":", 1)[1] if raw.count(":") == 1 and not raw.startswith(("http", "s3")) else raw
    return bool(PLACEHOLDER.search(raw) or PLACEHOLDER.search(password)) or raw in ALLOWED_VALUES


def scan_text(text: str, path: str) -> list[str]:
    """Credential-looking lines in `text`, as `path:line: kind: excerpt` (the secret itself masked)."""
    python = path.endswith(".py")
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        if (path, line.strip()) in ALLOWED_LINES:
            continue
        for kind, pattern in PATTERNS.items():
            for match in pattern.finditer(line):
                value = match.group(1)
                if kind in ("AWS access key id", "private key"):
                    if value in ALLOWED_VALUES:
                        continue
                elif _is_placeholder(value, python and kind != "password in URL"):
                    continue
                masked = line.strip().replace(value, value[:4] + "…") if len(value) > 4 else line.strip()
                findings.append(f"{path}:{number}: {kind}: {masked[:160]}")
    return findings


def repository_files(root: Path) -> list[Path]:
    """Tracked files, files git would add (untracked, not ignored), and the committed pipeline outputs."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    files = {root / name for name in listed if name}
    for name in ARTIFACTS:
        path = root / name
        files.update(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return sorted(p for p in files if p.is_file())


def scan_repository(root: Path) -> list[str]:
    findings = []
    for path in repository_files(root):
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (figures): no text to leak
            continue
        findings += scan_text(data.decode("utf-8", errors="replace"), str(path.relative_to(root)))
    return findings


def test_no_credentials_in_the_repository():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    findings = scan_repository(REPO)
    assert not findings, "credential-looking text in files git tracks (or would add):\n" + "\n".join(findings)


def _planted() -> dict[str, str]:
    """Real-looking secrets, assembled here so that this file itself holds none."""
    key_id = "AKIA" + "Q7" * 8
    secret = "wJalrXUtnF" + "k7Qz" * 7 + "AB"
    word = "hunter" + "2" * 8
    return {
        "stack.env": f"MLFLOW_AUTH_ADMIN_PASSWORD={word}\n",
        "deploy.sh": f"export POSTGRES_PASSWORD='{word}'\n",
        "creds.ini": f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n",
        "README.md": f"Point MLflow at postgresql://olora:{word}@db.internal:5432/mlflow\n",
        "settings.py": f'S3_SECRET_ACCESS_KEY = "{secret}"\n',
        "id_ed25519": "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
    }


def test_the_scan_finds_planted_credentials_and_accepts_placeholders(tmp_path):
    planted = _planted()
    for name, text in planted.items():
        found = scan_text(text, name)
        assert found, f"planted credential in {name} not found"
        assert "hunter222" not in " ".join(found)  # the report masks the secret
    kinds = {f.split(": ")[1] for name, text in planted.items() for f in scan_text(text, name)}
    assert kinds == set(PATTERNS)
    harmless = {
        "stack.env.example": "MLFLOW_AUTH_ADMIN_PASSWORD=change-me-to-12-characters\nPOSTGRES_PASSWORD=\n"
        "PREFECT_SERVER_API_AUTH_STRING=olora:<password>\n",
        "Makefile": "MLFLOW_TRACKING_PASSWORD=$${MLFLOW_TRACKING_PASSWORD} mlflow ui\n",
        "docs.md": "use postgresql://user:${PGPASSWORD}@host/db or https://user:<password>@host/\n"
        "AWS's example key id is AKIAIOSFODNN7EXAMPLE\n",
        "code.py": "ADMIN_PASSWORD = os.environ['X']\nAPI_TOKEN = token\nenv[MY_PASSWORD] = password\n",
    }
    for name, text in harmless.items():
        assert scan_text(text, name) == [], name

    # ... and the repository scan fails on a planted credential in a tracked file and an untracked one
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "ok.txt").write_text("nothing to see\n")
    (tmp_path / "stack.env.example").write_text(harmless["stack.env.example"])
    assert scan_repository(tmp_path) == []
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "stack.env").write_text(planted["stack.env"])
    subprocess.run(["git", "add", "config/stack.env"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "run.json").write_text('{"uri": "' + planted["README.md"].split()[3] + '"}\n')
    found = scan_repository(tmp_path)
    assert [f.split(":")[0] for f in found] == ["config/stack.env", "metrics/run.json"], found


# ------------------------------------------------------------------ URIs and credential errors


def test_redact_uri_strips_user_and_password():
    pw, at = "s3cr%40t", "p@ss"  # kept out of the URL literals, which the credential scan reads
    assert redact_uri(f"http://admin:{pw}@mlflow.lan:5000/api") == "http://mlflow.lan:5000/api"
    assert redact_uri(f"postgresql://olora:{at}@db:5432/mlflow") == "postgresql://db:5432/mlflow"
    assert redact_uri("https://token@host/x") == "https://host/x"
    for unchanged in ("http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db", "databricks", "user@example.com"):
        assert redact_uri(unchanged) == unchanged
    assert redact_uri(f"failed at http://u:{pw}@h:1/x and s3://k:{at}@b/o") == "failed at http://h:1/x and s3://b/o"


def test_refused_credentials_are_not_retried_and_say_what_to_set(monkeypatch):
    from mlflow.exceptions import MlflowException

    calls = []

    def refuse():
        calls.append(1)
        raise MlflowException("API request failed with error code 401 != 200", error_code="UNAUTHENTICATED")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    with pytest.raises(TrackingError) as info:
        with_retries("connecting", "http://alice:" + "pw" * 7 + "@tracking.lan:5000", refuse, attempts=3, base_delay=5)
    assert len(calls) == 1
    first = str(info.value).splitlines()[0]
    assert "http://tracking.lan:5000 refused the credentials (user 'alice')" in first
    assert "MLFLOW_TRACKING_USERNAME" in first and "MLFLOW_TRACKING_PASSWORD" in first
    assert "pwpw" not in str(info.value)


# ------------------------------------------------------------------ server configuration (no server started)


def test_the_compose_mlflow_runs_the_basic_auth_app_with_no_secret_in_its_files():
    """docker/compose.yaml's MLflow: the basic-auth app, its configuration file (mounted read-only) holds no credential;
    the admin account and the CSRF key come from required variables (generated by `make stack`)."""
    import configparser

    import yaml

    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["mlflow"]
    assert service["command"][:3] == ["mlflow", "server", "--app-name=basic-auth"]
    mount = next(v for v in service["volumes"] if v.startswith("./mlflow/basic_auth.ini:"))
    assert mount.split(":")[1] == service["environment"]["MLFLOW_AUTH_CONFIG_PATH"] and mount.endswith(":ro")
    ini = configparser.ConfigParser()
    ini.read(REPO / "docker" / "mlflow" / "basic_auth.ini")
    assert not {"admin_password", "admin_username"} & set(ini["mlflow"])
    assert ":" not in ini["mlflow"]["database_uri"].split("@")[0].split("//")[1]  # no password in the URL
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert service["environment"][var].startswith("${") and ":?" in service["environment"][var], var


# ------------------------------------------------------------------ safe model loading


def _fake_model(folder: Path, weights: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / weights).write_bytes(b"\x80\x04not really weights")
    return folder


def test_a_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    from olora.modeling.models import ModelRef, load_base
    from olora.modeling.runtime import resolve_runtime

    folder = _fake_model(tmp_path / "legacy", "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"legacy.*only pickle-based weights \(pytorch_model.bin\).*save_pretrained"):
        from olora.modeling.models import resolve_model

        resolve_model(ModelConfig(name=str(folder)))
    ref = ModelRef(name=str(folder), revision="local", path=str(folder), local=True)
    with pytest.raises(ConfigError, match=str(folder)):
        load_base(ref, resolve_runtime(ModelConfig(device="cpu")))
    _fake_model(tmp_path / "pt", "weights.pt")
    with pytest.raises(ConfigError, match=r"weights.pt"):
        resolve_model(ModelConfig(name=str(tmp_path / "pt")))


def test_trust_remote_code_is_off_unless_set_and_reaches_transformers(tmp_path, monkeypatch):
    import transformers

    from olora.modeling import models
    from olora.modeling.runtime import resolve_runtime

    seen = []

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def from_pretrained(self, *args, **kwargs):
            seen.append((self.kind, kwargs))
            raise OSError("recorded")

    for kind in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(transformers, kind, Recorder(kind))
    folder = _fake_model(tmp_path / "m", "model.safetensors")
    assert config_from_dict({}).model.trust_remote_code is False
    for cfg, expected in ((ModelConfig(name=str(folder)), False), (ModelConfig(name=str(folder), trust_remote_code=True), True)):
        seen.clear()
        ref = models.resolve_model(cfg)
        for load in (models.load_model_config, models.load_tokenizer):
            with pytest.raises(Exception, match="recorded"):
                load(ref)
        with pytest.raises(Exception, match="recorded"):
            models.load_base(ref, resolve_runtime(ModelConfig(device="cpu")))
        assert [k for k, _ in seen] == ["AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"]
        assert all(kwargs["trust_remote_code"] is expected for _, kwargs in seen)
        assert seen[-1][1]["use_safetensors"] is True
    assert config_from_dict({"model": {"trust_remote_code": True}}).model.trust_remote_code is True


def test_safetensors_only_loading_still_loads_a_real_model(tiny_model_dir):
    from olora.modeling.models import load_base, load_tokenizer, resolve_model
    from olora.modeling.runtime import resolve_runtime

    ref = resolve_model(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    assert ref.trust_remote_code is False
    assert load_base(ref, resolve_runtime(ModelConfig(device="cpu"))).config.model_type == "llama"
    assert load_tokenizer(ref).pad_token is not None


# ------------------------------------------------------------------ real servers (integration)


def _status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _listening(process) -> set[tuple[str, int]]:
    import psutil

    root = psutil.Process(process.pid)
    return {
        (c.laddr.ip, c.laddr.port)
        for p in [root, *root.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == "LISTEN"
    }


def _non_loopback_addresses() -> list[str]:
    import psutil

    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """docker/compose.yaml's MLflow command and auth configuration, run here on loopback on SQLite stores."""
    import yaml

    from conftest import wait_for_http

    root = tmp_path_factory.mktemp("mlflow-auth")
    password, port = secrets.token_urlsafe(18), free_port()
    command = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["mlflow"]["command"]
    local = {"--backend-store-uri": f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination": str(root / "artifacts"),
             "--host": "127.0.0.1", "--port": str(port)}
    argv = [a if a.split("=")[0] not in local else f"{a.split('=')[0]}={local[a.split('=')[0]]}" for a in command]
    ini = (REPO / "docker" / "mlflow" / "basic_auth.ini").read_text()
    (root / "basic_auth.ini").write_text(re.sub(r"database_uri = .*", f"database_uri = sqlite:///{root / 'auth.db'}", ini))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_USERNAME="admin",
               MLFLOW_AUTH_ADMIN_PASSWORD=password, MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(16),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    with open(root / "mlflow.log", "wb") as log:
        process = subprocess.Popen([str(Path(sys.executable).parent / argv[0]), *argv[1:]], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", seconds=120)
        yield process, f"http://127.0.0.1:{port}", port, password
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.integration
def test_mlflow_server_refuses_requests_without_credentials(mlflow_server):
    _, url, _, _ = mlflow_server
    assert _status(f"{url}/health") == 200  # the health probe stays open
    assert _status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _status(f"{url}/api/2.0/mlflow/experiments/create", data=b'{"name": "x"}') == 401


@pytest.mark.integration
def test_tracking_client_with_right_and_wrong_credentials(mlflow_server, tmp_path, monkeypatch, caplog):
    from olora.tracking.client import Tracking

    _, url, _, password = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    c = Tracking.resolve(TrackingConfig(uri=url, retries=3), tmp_path).client()
    assert c.create_experiment("security-check")

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-" + secrets.token_urlsafe(8))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="olora"), pytest.raises(TrackingError) as info:
        Tracking.resolve(TrackingConfig(uri=url, retries=3), tmp_path).client()
    assert not [r for r in caplog.records if "retrying in" in r.getMessage()]  # refused: no retries with backoff
    first = str(info.value).splitlines()[0]
    assert f"the MLflow tracking server {url} refused the credentials (user 'admin')" in first
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in first

    # credentials in the URI itself never reach the message
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    leaked = "admin:url-" + secrets.token_urlsafe(8)
    with pytest.raises(TrackingError) as info:
        Tracking.resolve(TrackingConfig(uri=url.replace("http://", f"http://{leaked}@"), retries=3), tmp_path).client()
    assert leaked.split(":")[1] not in str(info.value) and url in str(info.value).splitlines()[0]


@pytest.mark.integration
def test_mlflow_server_listens_on_loopback_only(mlflow_server):
    process, _, port, _ = mlflow_server
    listening = _listening(process)
    assert listening == {("127.0.0.1", port)}, listening
    for address in _non_loopback_addresses():
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((address, port))
