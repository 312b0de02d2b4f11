"""`olora serve`: MLflow's own scoring app for a registered version, under uvicorn, with hot reload.

Each loaded version is served by the FastAPI app that `mlflow.pyfunc.scoring_server.init(model)`
builds (the app `mlflow models serve` runs: `/invocations`, `/ping`, `/health`, `/version`, its
request parsing, schema checks and error answers). In front of it sits a tiny ASGI dispatcher that
adds two endpoints and forwards everything else to the current app:

- `GET /served`: the registered model name, the alias followed (none for a fixed `--version`), the
  version being served and when it was loaded;
- `POST /reload`: re-resolves `models:/<name>@<alias>`; when it points at another version, loads
  that version in a worker thread while the current one keeps answering, then swaps the app
  reference (one assignment: a request is answered entirely by the old or entirely by the new
  version). Serving a fixed `--version`, it changes nothing and says so. A version that fails to
  load (missing alias, changed files) leaves the current one serving and answers 500 with the reason.

Besides the pyfunc's own check of every file against the checksums in its metadata, a version is
refused when that metadata disagrees with the version's registry tag `artifact_sha256`.

Following an alias, the server also switches by itself when the alias moves:
- `POST /webhook` receives MLflow's registry webhooks (event `model_version_alias.created`), signed
  with HMAC-SHA256 under the secret in `$OLORA_WEBHOOK_SECRET` (`olora serve-webhook` registers it
  with the registry). A call without a signature is refused with 401, one with a wrong or stale
  signature with 403; neither changes anything;
- polling the alias every `--poll-seconds` is the fallback where webhooks cannot reach the server.
A version that fails to load is reported (log, `GET /served`'s `last_failure`) and not retried by
the webhook or the poller until the alias moves to another version; `POST /reload` retries it.
Every answer carries the version that produced it in the `X-Olora-Model-Version` header
(`/version` stays MLflow's own: the MLflow version of the scoring protocol).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from olora.errors import OloraError

log = logging.getLogger("olora")


@dataclass(frozen=True)
class Loaded:
    version: str
    app: Any  # MLflow's scoring app (ASGI) answering for this version
    loaded_at: str


VERSION_HEADER = b"x-olora-model-version"
SECRET_ENV = "OLORA_WEBHOOK_SECRET"
WEBHOOK_MAX_AGE = 300  # seconds: an older signed delivery is refused (replay protection, as MLflow's docs advise)


def verify_webhook(secret: str | None, headers: dict[str, str], body: bytes, now: float) -> tuple[int, str] | None:
    """None when `body` is a genuine MLflow webhook delivery signed with `secret`; else (status, reason).

    MLflow signs `<delivery id>.<timestamp>.<payload>` with HMAC-SHA256 and sends `v1,<base64>` in
    X-MLflow-Signature, with X-MLflow-Delivery-Id and X-MLflow-Timestamp. `headers`: lower-case names.
    """
    if not secret:
        return 403, f"webhooks are off: start the server with ${SECRET_ENV} set to the webhook's secret"
    signature = headers.get("x-mlflow-signature")
    delivery, stamp = headers.get("x-mlflow-delivery-id"), headers.get("x-mlflow-timestamp")
    if not signature or not delivery or not stamp:
        return 401, "unsigned call: X-MLflow-Signature, X-MLflow-Delivery-Id and X-MLflow-Timestamp are required"
    try:
        age = now - int(stamp)
    except ValueError:
        return 403, f"X-MLflow-Timestamp {stamp!r} is not a Unix time"
    if abs(age) > WEBHOOK_MAX_AGE:
        return 403, f"the delivery is {age:.0f} s old (more than {WEBHOOK_MAX_AGE} s): refused as a possible replay"
    digest = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256).digest()
    if not hmac.compare_digest(signature.encode(), b"v1," + base64.b64encode(digest)):
        return 403, "wrong signature: the secret differs from the webhook's, or the payload was changed"
    return None


class ServingApp:
    """ASGI app: `/served`, `/reload` and `/webhook` here, every other request to the current version's MLflow scoring app."""

    def __init__(self, client, name: str, alias: str | None = "champion", version: str | None = None,
                 webhook_secret: str | None = None):
        if version is None and not alias:
            raise OloraError("serve needs an alias or a version")
        self.client, self.name = client, name
        self.alias = None if version is not None else alias
        self.webhook_secret = webhook_secret
        self.current = self.load(str(version) if version is not None else self.resolve())
        self.last_failure: dict[str, Any] | None = None
        self.poll_seconds = 0.0
        self._switching = threading.Lock()  # one switch at a time, whoever asks (reload, webhook, poller)
        self._stop = threading.Event()

    @property
    def follows(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.current.version}"

    def resolve(self) -> str:
        """The version the alias points at now."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException as exc:
            raise OloraError(f"registered model {self.name!r} has no alias {self.alias!r} ({exc.message.splitlines()[0]}); "
                             "register and promote a version first (`dvc repro register`, `olora promote`)") from None

    def load(self, version: str) -> Loaded:
        """Load `models:/<name>/<version>` (the pyfunc verifies its files) and build MLflow's scoring app for it."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import scoring_server

        from olora.serving.pyfunc import CHECKSUMS_KEY, TamperedModelError

        try:
            tag = self.client.get_model_version(self.name, version).tags.get(CHECKSUMS_KEY)
        except MlflowException as exc:
            raise OloraError(f"registered model {self.name!r} has no version {version} ({exc.message.splitlines()[0]})") from None
        log.info("serve: loading models:/%s/%s", self.name, version)
        model = scoring_server.load_model_with_mlflow_config(f"models:/{self.name}/{version}")
        recorded = (model.metadata.metadata or {}).get(CHECKSUMS_KEY)
        if tag is not None and json.loads(tag) != recorded:
            raise TamperedModelError(
                f"version {version}'s MLmodel records other file checksums than its registry tag {CHECKSUMS_KEY}: the "
                "registered model's files were changed after registration; delete this version and re-register it "
                "(`dvc repro -f register`)"
            )
        return Loaded(version, scoring_server.init(model), datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def describe(self) -> dict[str, Any]:
        current = self.current
        return {"name": self.name, "alias": self.alias, "version": current.version,
                "model_uri": f"models:/{self.name}/{current.version}", "loaded_at": current.loaded_at,
                "poll_seconds": self.poll_seconds, "webhook": bool(self.webhook_secret) and self.alias is not None,
                "last_failure": self.last_failure}

    def switch(self, trigger: str) -> tuple[int, dict[str, Any]]:
        """Follow the alias now (blocking): load the version it points at while the current one answers, then swap.

        `trigger`: reload (an explicit request: retries a version that failed before) | webhook | poll
        (these skip a version that already failed to load, so a broken version is not retried in a loop).
        """
        if self.alias is None:
            return 200, {"reloaded": False, **self.describe(),
                         "message": f"serving the fixed version {self.current.version} (--version): nothing to reload; "
                                    "start `olora serve` with --alias to follow promotions and rollbacks"}
        with self._switching:
            try:
                version = self.resolve()
                if version == self.current.version:
                    return 200, {"reloaded": False, **self.describe(),
                                 "message": f"{self.alias} is still version {version}; nothing to reload"}
                failed = self.last_failure
                if trigger != "reload" and failed and failed["version"] == version:
                    return 200, {"reloaded": False, **self.describe(),
                                 "message": f"version {version} failed to load before; still serving version "
                                            f"{self.current.version} (POST /reload retries it)"}
                new = self.load(version)
            except Exception as exc:  # the current version keeps serving; the caller and /served get the reason
                target = locals().get("version")
                log.error("serve: %s: could not switch to version %s (%s: %s); still serving version %s", trigger,
                          target, type(exc).__name__, exc, self.current.version)
                self.last_failure = {"version": target, "error": f"{type(exc).__name__}: {exc}", "trigger": trigger,
                                     "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                return 500, {"reloaded": False, **self.describe(), "error": f"{type(exc).__name__}: {exc}",
                             "message": f"reload failed; still serving version {self.current.version}"}
            previous, self.current = self.current.version, new  # the swap: new requests go to the new app
            self.last_failure = None
        log.info("serve: %s: %s now answers with version %s (was %s)", trigger, self.follows, new.version, previous)
        return 200, {"reloaded": True, "previous_version": previous, **self.describe()}

    async def reload(self) -> tuple[int, dict[str, Any]]:
        return await asyncio.to_thread(self.switch, "reload")

    def start_polling(self, seconds: float) -> None:
        """Fallback where webhooks cannot reach the server: look at the alias every `seconds`."""
        if not seconds or self.alias is None:
            return
        self.poll_seconds = seconds

        def poll():
            while not self._stop.wait(seconds):
                try:
                    self.switch("poll")
                except Exception:  # noqa: BLE001 - the poller must outlive a registry outage
                    log.exception("serve: polling %s failed; trying again in %s s", self.follows, seconds)

        threading.Thread(target=poll, name="olora-serve-poll", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def webhook(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """A registry webhook delivery: verified, then (for this model's alias) a switch in the background."""
        refused = verify_webhook(self.webhook_secret, headers, body, time.time())
        if refused:
            log.warning("serve: webhook refused (%s): %s", refused[0], refused[1])
            return refused[0], {"error": refused[1]}
        try:
            event = json.loads(body)
            data = event.get("data") or {}
            kind = f"{event.get('entity')}.{event.get('action')}"
        except (ValueError, AttributeError):
            return 400, {"error": "the payload is not an MLflow webhook event (JSON with entity, action, data)"}
        if kind != "model_version_alias.created" or data.get("name") != self.name or data.get("alias") != self.alias:
            return 200, {"accepted": False, "message": f"{kind} for {data.get('name')}@{data.get('alias')}: not what "
                                                        f"this server follows ({self.follows})"}
        threading.Thread(target=self.switch, args=("webhook",), name="olora-serve-webhook", daemon=True).start()
        return 202, {"accepted": True, "message": f"switching to {self.follows} (version {data.get('version')})"}

    async def __call__(self, scope, receive, send) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] == "http" and scope["path"] in ("/served", "/reload", "/webhook"):
            wanted = "GET" if scope["path"] == "/served" else "POST"
            if scope["method"] != wanted:
                status, body = 405, {"error": f"{scope['path']} takes {wanted}"}
            elif scope["path"] == "/served":
                status, body = 200, self.describe()
            elif scope["path"] == "/reload":
                status, body = await self.reload()
            else:
                status, body = self.webhook(_headers(scope), await _body(receive))
            await JSONResponse(body, status_code=status)(scope, receive, send)
            return
        current = self.current  # one version answers the whole request, and says so
        if scope["type"] != "http":
            await current.app(scope, receive, send)
            return

        async def send_with_version(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (VERSION_HEADER, current.version.encode())]}
            await send(message)

        await current.app(scope, receive, send_with_version)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def serve(cfg, tracking, name: str, alias: str | None, version: str | None, host: str, port: int,
          poll_seconds: float = 0.0) -> None:
    """Load the version (before binding, so a bad model never answers), then run uvicorn until stopped."""
    import uvicorn

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from olora.modeling.runtime import set_threads

    uri = tracking.uri
    mlflow.set_tracking_uri(uri)  # this process only serves: models:/ URIs resolve against the pipeline's registry
    mlflow.set_registry_uri(uri)
    set_threads(cfg.runtime)
    app = ServingApp(tracking.client(), name, alias, version, webhook_secret=os.environ.get(SECRET_ENV) or None)
    app.start_polling(poll_seconds)
    following = (f"; follows the alias: webhook {'on' if app.webhook_secret else f'off (${SECRET_ENV} unset)'}, "
                 f"polling {'every %g s' % poll_seconds if poll_seconds else 'off'}") if app.alias else ""
    print(f"serving {app.follows} (version {app.current.version}) on http://{host}:{port}: POST /invocations, "
          f"GET /served, POST /reload, POST /webhook{following}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, lifespan="off", log_level="info")
    finally:
        app.stop()


def register_webhook(client, name: str, url: str, secret: str) -> str:
    """Register (or update) the registry webhook that tells `olora serve` at `url` when an alias of `name` moves."""
    from mlflow.exceptions import MlflowException

    hook_name = f"olora-serve-{name}"
    events = ["model_version_alias.created"]
    try:
        existing = [w for w in client.list_webhooks() if w.name == hook_name]
    except MlflowException as exc:
        raise OloraError(f"the registry at {client._registry_uri} does not keep webhooks ({exc.message.splitlines()[0]}); "
                         "webhooks need a SQL-backed MLflow server (`mlflow server --backend-store-uri postgresql://...` "
                         "or sqlite); use `olora serve --poll-seconds N` instead") from None
    if existing:
        client.update_webhook(existing[0].webhook_id, url=url, events=events, secret=secret, status="ACTIVE")
        return existing[0].webhook_id
    return client.create_webhook(hook_name, url, events, description=f"olora serve follows {name}'s aliases",
                                 secret=secret).webhook_id
