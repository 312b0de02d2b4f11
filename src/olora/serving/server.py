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
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
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


class ServingApp:
    """ASGI app: `/served` and `/reload` here, every other request to the current version's MLflow scoring app."""

    def __init__(self, client, name: str, alias: str | None = "champion", version: str | None = None):
        if version is None and not alias:
            raise OloraError("serve needs an alias or a version")
        self.client, self.name = client, name
        self.alias = None if version is not None else alias
        self.current = self.load(str(version) if version is not None else self.resolve())
        self._reloading = asyncio.Lock()

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
                "model_uri": f"models:/{self.name}/{current.version}", "loaded_at": current.loaded_at}

    async def reload(self) -> tuple[int, dict[str, Any]]:
        if self.alias is None:
            return 200, {"reloaded": False, **self.describe(),
                         "message": f"serving the fixed version {self.current.version} (--version): nothing to reload; "
                                    "start `olora serve` with --alias to follow promotions and rollbacks"}
        async with self._reloading:  # one reload at a time; the current version answers meanwhile
            try:
                version = await asyncio.to_thread(self.resolve)
                if version == self.current.version:
                    return 200, {"reloaded": False, **self.describe(),
                                 "message": f"{self.alias} is still version {version}; nothing to reload"}
                new = await asyncio.to_thread(self.load, version)
            except Exception as exc:  # the current version keeps serving; the caller gets the reason
                log.exception("serve: reload failed; still serving version %s", self.current.version)
                return 500, {"reloaded": False, **self.describe(), "error": f"{type(exc).__name__}: {exc}",
                             "message": f"reload failed; still serving version {self.current.version}"}
            previous, self.current = self.current.version, new  # the swap: new requests go to the new app
        log.info("serve: %s now answers with version %s (was %s)", self.follows, new.version, previous)
        return 200, {"reloaded": True, "previous_version": previous, **self.describe()}

    async def __call__(self, scope, receive, send) -> None:
        from starlette.responses import JSONResponse

        if scope["type"] == "http" and scope["path"] in ("/served", "/reload"):
            wanted = "GET" if scope["path"] == "/served" else "POST"
            if scope["method"] != wanted:
                status, body = 405, {"error": f"{scope['path']} takes {wanted}"}
            elif scope["path"] == "/served":
                status, body = 200, self.describe()
            else:
                status, body = await self.reload()
            await JSONResponse(body, status_code=status)(scope, receive, send)
            return
        await self.current.app(scope, receive, send)


def serve(cfg, tracking, name: str, alias: str | None, version: str | None, host: str, port: int) -> None:
    """Load the version (before binding, so a bad model never answers), then run uvicorn until stopped."""
    import uvicorn

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from olora.modeling.runtime import set_threads

    uri = tracking.uri
    mlflow.set_tracking_uri(uri)  # this process only serves: models:/ URIs resolve against the pipeline's registry
    mlflow.set_registry_uri(uri)
    set_threads(cfg.runtime)
    app = ServingApp(tracking.client(), name, alias, version)
    print(f"serving {app.follows} (version {app.current.version}) on http://{host}:{port}: POST /invocations, "
          f"GET /served, POST /reload", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, lifespan="off", log_level="info")
