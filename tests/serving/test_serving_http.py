"""`olora serve` for real: one tiny registered model, real servers on free loopback ports.

MLflow's scoring app answers bad requests with 400 and the reason; `POST /reload` follows a
promotion and a rollback while a client keeps getting answers; a fixed `--version` does not reload;
`mlflow models serve` serves the same pyfunc; a model whose files changed after registration is
refused on load; registration retried after a lost response, or re-run after a crash between
upload and create, leaves exactly one version and no orphan artifacts; the serving benchmark's
HTTP part measures a running server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from olora.config import load_config
from olora.tracking.client import Tracking
from olora.layout import Layout
from olora.stages import STAGES
from olora.evaluation.result import EvalResult
from olora.tracking import client as tracking
from olora.tracking import registry
from olora.tracking import gate

from conftest import free_port, running_server
from overlay import write_params

pytestmark = [pytest.mark.integration, pytest.mark.fault]
PROMPTS = ["What is the capital of France?", "Name a colour."]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_untied_model_dir) -> Layout:
    """A tiny project whose trained adapter is version 1 of its registered model, and its champion."""
    root = tmp_path_factory.mktemp("served")
    write_params(root, tiny_untied_model_dir, {"evaluate.tasks": ["arc_easy"]})
    layout = Layout(root)
    for stage in ("prepare", "init", "train", "evaluate_base", "evaluate", "register"):
        STAGES[stage].run(layout)
    assert gate.promote(load_config(layout.params), Tracking.of(load_config(layout.params), root)).promote
    return layout


def _client(layout):
    return Tracking.of(load_config(layout.params), layout.root).client()


def _name(layout) -> str:
    return registry.model_name(load_config(layout.params))


def running(command: list[str], layout: Layout, env: dict | None = None):
    """Start a server on a free loopback port; yield its base URL; stop it (its output is shown on failure)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")},
           "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin", **(env or {})}  # a fresh shell
    log = layout.root / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
    return running_server(lambda port: [*command, "--port", str(port)], layout.root, "/ping", env, log_path=log)


def olora_serve(layout: Layout, *args: str):
    return running([str(BIN / "olora"), "--root", str(layout.root), "serve", *args], layout)


def call(base: str, path: str, payload=None, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; a 4xx/5xx is returned, not raised."""
    data = body if body is not None else (json.dumps(payload).encode() if payload is not None else None)
    request = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def invoke(base: str, prompts=PROMPTS, **params) -> tuple[int, dict]:
    return call(base, "/invocations", {"inputs": {"prompt": prompts}, "params": {"max_new_tokens": 4, **params}})


@pytest.fixture(scope="module")
def server(registered):
    with olora_serve(registered, "--poll-seconds", "0") as base:  # alias champion, 127.0.0.1; switches only on /reload
        yield base


def test_serves_the_champion_and_says_which_version(registered, server):
    status, body = invoke(server)
    assert status == 200 and len(body["predictions"]) == 2 and all(isinstance(a, str) for a in body["predictions"])
    status, served = call(server, "/served")
    assert status == 200
    assert served["name"] == _name(registered) and served["alias"] == "champion" and served["version"] == "1"
    assert served["model_uri"] == f"models:/{_name(registered)}/1"
    with urllib.request.urlopen(server + "/version", timeout=30) as response:  # MLflow's own endpoints are there too
        import mlflow

        assert response.read().decode() == mlflow.__version__
    assert call(server, "/served", method="POST", body=b"")[0] == 405 and call(server, "/reload")[0] == 405


def test_bad_requests_get_400_with_the_reason(server):
    status, body = call(server, "/invocations", body=b'{"inputs": {"prompt": ["Hi"]')
    assert status == 400 and body["error_code"] == "BAD_REQUEST" and "valid JSON" in body["message"]
    status, body = call(server, "/invocations", {"dataframe_split": {"columns": ["question"], "data": [["Hi"]]}})
    assert status == 400 and "missing inputs ['prompt']" in body["message"]
    status, body = invoke(server, ["word " * 500])
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "the model's context is 512 tokens, so with max_new_tokens=4 a prompt may hold at most 508" in body["message"]
    status, body = invoke(server, max_new_tokens=0)
    assert status == 400 and "max_new_tokens must be between 1 and 1024, got 0" in body["message"]
    status, body = invoke(server, max_new_tokens=5000)
    assert status == 400 and "max_new_tokens must be between 1 and 1024, got 5000" in body["message"]
    assert invoke(server)[0] == 200  # and the server is still answering


def test_the_load_benchmark_measures_the_server(server, tmp_path):
    """bench/bench_serve.py's http part, from its own process, against the running server (few requests)."""
    from overlay import REPO

    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_serve.py"), "--url", server, "--requests", "4",
                           "--concurrency", "1", "2", "--max-new-tokens", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "serve_http.json").read_text())
    assert [(r["concurrency"], r["requests"], r["ok"]) for r in result["rows"]] == [(1, 4, 4), (2, 4, 4)]
    assert all(0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["requests_per_second"] > 0 for r in result["rows"])
    assert result["served"]["version"] == "1" and "| concurrency | requests |" in (tmp_path / "serve_http.md").read_text()


def test_reload_follows_promotion_and_rollback_while_answering(registered, server):
    cfg, c, name = load_config(registered.params), _client(registered), _name(registered)
    status, body = call(server, "/reload", method="POST", body=b"")
    assert status == 200 and not body["reloaded"] and body["message"] == "champion is still version 1; nothing to reload"

    v1 = c.get_model_version(name, "1")  # version 2: the same files registered again (with their checksum tag)
    v2 = str(c.create_model_version(name, v1.source, run_id=v1.run_id, tags=v1.tags).version)
    results: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            start = time.monotonic()
            status = invoke(server)[0]
            results.append((start, time.monotonic(), status))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    windows = []
    try:
        time.sleep(0.5)
        assert gate.promote(cfg, Tracking.of(cfg, registered.root), version=v2, force=True).promote
        start = time.monotonic()
        status, body = call(server, "/reload", method="POST", body=b"")
        windows.append((start, time.monotonic()))
        assert status == 200 and body["reloaded"] and body["previous_version"] == "1" and body["version"] == v2
        assert call(server, "/served")[1]["version"] == v2

        assert registry.rollback(cfg, Tracking.of(cfg, registered.root)) == "1"
        start = time.monotonic()
        status, body = call(server, "/reload", method="POST", body=b"")
        windows.append((start, time.monotonic()))
        assert status == 200 and body["reloaded"] and body["previous_version"] == v2 and body["version"] == "1"
        assert call(server, "/served")[1]["version"] == "1"
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join(timeout=120)
    assert results and all(status == 200 for _, _, status in results), results
    for start, end in windows:  # requests in flight while the new version loaded were answered (200 above)
        assert any(began <= end and done >= start for began, done, _ in results), (start, end, results)


def use_registry(layout: Layout, monkeypatch) -> None:
    """Resolve models:/ URIs in this process against the project's registry, as `olora serve` does (undone after)."""
    from mlflow.tracking._model_registry import utils as registry_uri
    from mlflow.tracking._tracking_service import utils as tracking_uri

    uri = tracking.resolve_uri(load_config(layout.params).tracking, layout.root)
    monkeypatch.setattr(tracking_uri, "_tracking_uri", uri)
    monkeypatch.setattr(registry_uri, "_registry_uri", uri)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # scoring_server.init sets it; undone after


def test_a_fixed_version_does_not_reload(registered, monkeypatch):
    """`olora serve --version 1`'s app, called in this process (the same ASGI calls, without a socket)."""
    from starlette.testclient import TestClient

    from olora.serving.server import ServingApp

    use_registry(registered, monkeypatch)
    with TestClient(ServingApp(_client(registered), _name(registered), version="1")) as app:
        response = app.post("/reload")
        body = response.json()
        assert response.status_code == 200 and not body["reloaded"] and body["version"] == "1" and body["alias"] is None
        assert body["message"].startswith("serving the fixed version 1 (--version): nothing to reload")
        assert app.post("/invocations", json={"inputs": {"prompt": PROMPTS}, "params": {"max_new_tokens": 4}}).status_code == 200


def test_mlflow_models_serve_serves_the_same_pyfunc(registered):
    uri = tracking.resolve_uri(load_config(registered.params).tracking, registered.root)
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{_name(registered)}@champion",
               "--env-manager", "local", "--host", "127.0.0.1"]
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": f"{BIN}:/usr/bin:/bin"}  # uvicorn by name
    with running(command, registered, env) as base:
        status, body = invoke(base)
        assert status == 200 and len(body["predictions"]) == 2
        status, body = invoke(base, max_new_tokens=0)
        assert status == 400 and "max_new_tokens must be between 1 and 1024, got 0" in body["message"]


def _version_files(c, run_id: str, path: str = "model") -> set[str]:
    out = set()
    for info in c.list_artifacts(run_id, path):
        out |= _version_files(c, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_a_lost_response_is_retried_without_a_second_version(registered, monkeypatch):
    from mlflow import MlflowClient

    cfg = load_config(registered.params, {"register.model_name": "olora-lost-response"})
    real, calls = MlflowClient.create_model_version, []

    def created_but_response_lost(self, *args, **kwargs):
        calls.append(args)
        version = real(self, *args, **kwargs)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer (the version was created)")
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", created_but_response_lost)
    reg = registry.register(cfg, Tracking.of(cfg, registered.root), registered.root, registered.adapter, registered.exported,
                          EvalResult.read(registered.metrics("eval_adapter")))
    assert len(calls) == 1  # the retry found the version the lost call created, and created none
    c = _client(registered)
    assert [str(v.version) for v in c.search_model_versions("name='olora-lost-response'")] == ["1"] == [reg.version]


def test_a_rerun_after_a_crash_between_upload_and_create_registers_once(registered, monkeypatch):
    import olora.faults

    class Crash(BaseException):
        """The process dies here: nothing below runs, no retry."""

    c = _client(registered)
    run_id = c.get_model_version(_name(registered), "1").run_id
    files = _version_files(c, run_id)
    assert "model/MLmodel" in files and "model/artifacts/adapter/adapter_model.safetensors" in files

    cfg = load_config(registered.params, {"register.model_name": "olora-crashed"})

    def crash(name):
        if name == "register:uploaded":
            raise Crash(name)

    monkeypatch.setattr(olora.faults, "marker", crash)
    with pytest.raises(Crash):
        registry.register(cfg, Tracking.of(cfg, registered.root), registered.root, registered.adapter, registered.exported,
                          EvalResult.read(registered.metrics("eval_adapter")))
    assert not c.search_model_versions("name='olora-crashed'")  # uploaded, not registered
    monkeypatch.undo()
    reg = registry.register(cfg, Tracking.of(cfg, registered.root), registered.root, registered.adapter, registered.exported,
                          EvalResult.read(registered.metrics("eval_adapter")))
    assert reg.created and [str(v.version) for v in c.search_model_versions("name='olora-crashed'")] == ["1"]
    assert _version_files(c, run_id) == files  # the re-upload overwrote the same files: no orphans
    again = registry.register(cfg, Tracking.of(cfg, registered.root), registered.root, registered.adapter, registered.exported,
                          EvalResult.read(registered.metrics("eval_adapter")))
    assert not again.created and again.version == "1"


def test_a_changed_file_fails_on_load_and_on_reload(registered, server, monkeypatch):
    import mlflow
    import yaml

    from olora.serving.server import ServingApp
    from olora.serving.pyfunc import TamperedModelError, file_sha256

    name, c = _name(registered), _client(registered)
    (weights,) = (registered.root / "mlartifacts").rglob("model/artifacts/adapter/adapter_model.safetensors")
    stored = weights.parents[2]  # the registered model's folder in the project's artifact store
    mlmodel = stored / "MLmodel"
    original, original_mlmodel = weights.read_bytes(), mlmodel.read_text()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of one byte
        with pytest.raises(TamperedModelError, match=r"^checksum mismatch for adapter/adapter_model.safetensors: the "
                                                     r"registered model's files were changed after registration"):
            mlflow.pyfunc.load_model(str(stored))

        # a running server refuses to switch to it and keeps answering with what it serves
        v1 = c.get_model_version(name, "1")
        bad = str(c.create_model_version(name, v1.source, run_id=v1.run_id, tags=v1.tags).version)
        c.set_registered_model_alias(name, "champion", bad)
        status, body = call(server, "/reload", method="POST", body=b"")
        assert status == 500 and not body["reloaded"] and body["version"] == "1"
        assert "checksum mismatch for adapter/adapter_model.safetensors" in body["error"]
        assert invoke(server)[0] == 200 and call(server, "/served")[1]["version"] == "1"

        # the MLmodel's checksum edited to match the changed file: the pyfunc loads, serving checks the registry tag
        meta = yaml.safe_load(original_mlmodel)
        meta["metadata"]["artifact_sha256"]["adapter/adapter_model.safetensors"] = file_sha256(weights)
        mlmodel.write_text(yaml.safe_dump(meta))
        mlflow.pyfunc.load_model(str(stored))
        use_registry(registered, monkeypatch)
        with pytest.raises(TamperedModelError, match="records other file checksums than its registry tag artifact_sha256"):
            ServingApp(c, name, version="1")
    finally:
        weights.write_bytes(original)
        mlmodel.write_text(original_mlmodel)
        c.set_registered_model_alias(name, "champion", "1")


# ---------------------------------------------------------------- following the alias: polling and webhooks

SECRET = "test-webhook-secret-0123456789"


def _signed(payload: dict, secret: str = SECRET, age: int = 0) -> tuple[bytes, dict[str, str]]:
    """A delivery signed exactly as MLflow's webhook sender signs it (its own function)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body, delivery, stamp = json.dumps(payload), "d-1", str(int(time.time()) - age)
    return body.encode(), {"x-mlflow-signature": _generate_hmac_signature(secret, delivery, stamp, body),
                           "x-mlflow-delivery-id": delivery, "x-mlflow-timestamp": stamp}


def test_webhook_signatures_are_checked():
    from olora.serving.server import verify_webhook

    event = {"entity": "model_version_alias", "action": "created", "data": {"name": "m", "alias": "champion", "version": "2"}}
    body, headers = _signed(event)
    now = time.time()
    assert verify_webhook(SECRET, headers, body, now) is None
    assert verify_webhook(SECRET, {}, body, now)[0] == 401  # unsigned
    assert verify_webhook("another-secret-0123456789", headers, body, now)[0] == 403
    assert verify_webhook(SECRET, headers, body.replace(b'"2"', b'"3"'), now)[0] == 403  # changed payload
    old_body, old_headers = _signed(event, age=3600)
    assert verify_webhook(SECRET, old_headers, old_body, now)[0] == 403  # a replayed old delivery
    assert verify_webhook(None, headers, body, now)[0] == 403  # no secret configured: webhooks are off


def _raw(base: str, path: str, body: bytes = b"", headers: dict | None = None, method: str = "POST"):
    request = urllib.request.Request(base + path, data=body if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _wait_for_version(base: str, version: str, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        served = call(base, "/served")[1]
        if served["version"] == version:
            return served
        time.sleep(0.2)
    raise AssertionError(f"still serving {call(base, '/served')[1]} after {seconds} s; wanted version {version}")


def _new_version(c, name: str, tags_edit=None) -> str:
    v1 = c.get_model_version(name, "1")
    tags = dict(v1.tags)
    if tags_edit:
        tags_edit(tags)
    return str(c.create_model_version(name, v1.source, run_id=v1.run_id, tags=tags).version)


def test_polling_follows_the_alias_reports_a_broken_version_once_and_says_who_answered(registered):
    c, name = _client(registered), _name(registered)
    log = registered.root / "poll-server.log"
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")},
           "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin", "OLORA_WEBHOOK_SECRET": SECRET}
    command = [str(BIN / "olora"), "--root", str(registered.root), "serve", "--poll-seconds", "1"]
    try:
        with running_server(lambda port: [*command, "--port", str(port)], registered.root, "/ping", env, log_path=log) as base:
            status, body, headers = _raw(base, "/invocations", json.dumps(
                {"inputs": {"prompt": PROMPTS[:1]}, "params": {"max_new_tokens": 2}}).encode())
            assert status == 200 and headers["x-olora-model-version"] == "1"
            served = call(base, "/served")[1]
            assert served["poll_seconds"] == 1 and served["webhook"] and served["last_failure"] is None

            # unsigned or wrongly signed webhook calls are refused and change nothing
            event = {"entity": "model_version_alias", "action": "created", "data": {"name": name, "alias": "champion", "version": "9"}}
            assert _raw(base, "/webhook", json.dumps(event).encode())[0] == 401
            body, headers = _signed(event, secret="not-the-secret-0123456789")
            assert _raw(base, "/webhook", body, headers)[0] == 403
            assert call(base, "/served")[1]["version"] == "1"

            # the alias moves (as `olora promote` moves it): the poller switches; every request meanwhile answered
            good = _new_version(c, name)
            c.set_registered_model_alias(name, "champion", good)
            _wait_for_version(base, good)
            assert _raw(base, "/invocations", json.dumps({"inputs": {"prompt": PROMPTS[:1]},
                                                           "params": {"max_new_tokens": 2}}).encode())[2]["x-olora-model-version"] == good

            # a version whose registry tag disagrees with its files: reported once, not retried, the old one serves
            def tamper(tags):
                checksums = json.loads(tags["artifact_sha256"])
                checksums[next(iter(checksums))] = "0" * 64
                tags["artifact_sha256"] = json.dumps(checksums)

            broken = _new_version(c, name, tamper)
            c.set_registered_model_alias(name, "champion", broken)
            deadline = time.monotonic() + 60
            while call(base, "/served")[1]["last_failure"] is None and time.monotonic() < deadline:
                time.sleep(0.2)
            served = call(base, "/served")[1]
            assert served["version"] == good and served["last_failure"]["version"] == broken
            assert "TamperedModelError" in served["last_failure"]["error"] and served["last_failure"]["trigger"] == "poll"
            assert invoke(base)[0] == 200
            time.sleep(3.5)  # three more polls
            assert log.read_text().count(f"could not switch to version {broken}") == 1

            # a signed delivery for another model is accepted as genuine and ignored
            other = {"entity": "model_version_alias", "action": "created", "data": {"name": "other", "alias": "champion", "version": "1"}}
            status, body, _ = _raw(base, "/webhook", *_signed(other))
            assert status == 200 and not body["accepted"]
    finally:
        c.set_registered_model_alias(name, "champion", "1")


def test_a_real_registry_webhook_switches_the_server(registered, tmp_path):
    """MLflow's own webhook delivery (a SQL-backed `mlflow server`, loopback allowed) reaches `olora serve`,
    registered with `olora serve-webhook`; the signed alias event switches the version with polling off."""
    from mlflow import MlflowClient

    c, name = _client(registered), _name(registered)
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow_port = free_port()
    mlflow_env = {**clean, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                  "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}
    mlflow_command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--workers", "1",
                      "--backend-store-uri", f"sqlite:///{registered.root / 'mlflow.db'}",
                      "--artifacts-destination", str(tmp_path / "artifacts")]
    serve_env = {**clean, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin", "OLORA_WEBHOOK_SECRET": SECRET}
    serve_command = [str(BIN / "olora"), "--root", str(registered.root), "serve", "--poll-seconds", "0"]
    try:
        with running_server(lambda port: [*mlflow_command, "--port", str(port)], registered.root, "/health", mlflow_env,
                            log_path=tmp_path / "mlflow.log", port=mlflow_port) as registry_url, \
             running_server(lambda port: [*serve_command, "--port", str(port)], registered.root, "/ping", serve_env,
                            log_path=tmp_path / "serve.log") as base:
            out = subprocess.run([str(BIN / "olora"), "--root", str(registered.root), "serve-webhook", "--url", f"{base}/webhook"],
                                 env={**serve_env, "MLFLOW_TRACKING_URI": registry_url}, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr[-3000:]
            version = _new_version(c, name)
            MlflowClient(registry_url, registry_uri=registry_url).set_registered_model_alias(name, "champion", version)
            served = _wait_for_version(base, version)
            assert served["last_failure"] is None
            assert f"webhook: models:/{name}@champion now answers with version {version}" in (tmp_path / "serve.log").read_text()
    finally:
        c.set_registered_model_alias(name, "champion", "1")
