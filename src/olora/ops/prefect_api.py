"""A small client of Prefect's REST API for what the stack sets up: the work pool, the crashed-run
automation, and which workers are online (used by `olora.ops.stack`, its tests and bench_stack).

Functions take the server's API URL and its auth headers (`headers(secret)`), nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Mapping

from olora.ops.envfile import ServiceError

PREFECT_USER = "olora"


def basic_auth(user_password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()}


def request(url: str, *, headers: Mapping[str, str] | None = None, data: dict | None = None, method: str | None = None,
            timeout: float = 10) -> tuple[int, object]:
    """One JSON request to a Prefect server's REST API; returns (HTTP status, decoded body or None)."""
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def headers(secret: Mapping[str, str], user: str = PREFECT_USER) -> dict[str, str]:
    """The stack's Prefect server credentials (basic auth) from its secrets."""
    return basic_auth(f"{user}:{secret['prefect_password']}")


def ensure_work_pool(url: str, auth: Mapping[str, str], pool: str) -> None:
    """The process work pool, with Prefect's default process job template (kept if it exists)."""
    status, _ = request(f"{url}/work_pools/{pool}", headers=auth)
    if status == 200:
        return
    from prefect.workers.process import ProcessWorker

    status, _ = request(f"{url}/work_pools/", headers=auth, data={
        "name": pool, "type": "process", "description": "OLoRA pipeline runs (olora.ops.stack)",
        "base_job_template": ProcessWorker.get_default_base_job_template(),
    })
    if status not in (200, 201, 409):
        raise ServiceError(f"prefect at {url}: creating work pool {pool!r} answered {status}")


CRASH_AUTOMATION = "olora: mark flow runs whose heartbeats stopped as crashed"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
CRASH_AFTER_VAR = "OLORA_STACK_CRASH_AFTER"  # seconds without a heartbeat before a run is marked crashed


def crash_after_seconds(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    raw = environ.get(CRASH_AFTER_VAR, "90")
    try:
        seconds = int(raw)
    except ValueError:
        seconds = -1
    if seconds < 2 * HEARTBEAT_SECONDS:
        raise ServiceError(f"{CRASH_AFTER_VAR}={raw!r}: expected whole seconds, at least {2 * HEARTBEAT_SECONDS} "
                           f"(two heartbeats of {HEARTBEAT_SECONDS} s), so a busy run is not taken for a dead one")
    return seconds


def crash_automation(within: int) -> dict:
    """Prefect's documented zombie-flow automation: no heartbeat (and no final state) within `within` s -> CRASHED."""
    return {
        "name": CRASH_AUTOMATION,
        "description": "A worker or machine that dies mid-run stops the run's heartbeats; this marks the run "
                       "Crashed so it can be retried (`prefect flow-run retry <id>`). Created by olora.ops.stack.",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                       "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
            "threshold": 1,
            "within": within,
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {within} s: the worker or its machine died (olora.ops.stack automation)"}],
    }


def ensure_crash_automation(url: str, auth: Mapping[str, str], within: int) -> None:
    """Create (or update) the zombie-run automation on the stack's Prefect server."""
    body = crash_automation(within)
    status, found = request(f"{url}/automations/filter", headers=auth, data={})
    if status != 200:
        raise ServiceError(f"prefect at {url}: listing automations answered {status}")
    existing = [a for a in found if a.get("name") == CRASH_AUTOMATION]
    if existing:
        status, _ = request(f"{url}/automations/{existing[0]['id']}", headers=auth, data=body, method="PUT")
    else:
        status, _ = request(f"{url}/automations/", headers=auth, data=body)
    if status not in (200, 201, 204):
        raise ServiceError(f"prefect at {url}: creating the automation {CRASH_AUTOMATION!r} answered {status}")


def online_workers(url: str, auth: Mapping[str, str], pool: str, since: float = 0.0) -> dict[str, dict]:
    """The pool's workers that are ONLINE (and, with `since`, heartbeat after that Unix time), by name."""
    from datetime import datetime

    status, workers = request(f"{url}/work_pools/{pool}/workers/filter",
                               headers=auth, data={"limit": 200})
    if status != 200 or not isinstance(workers, list):
        return {}
    found = {}
    for worker in workers:
        beat = worker.get("last_heartbeat_time")
        when = datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() if beat else 0.0
        if worker.get("status") == "ONLINE" and when >= since:
            found[worker["name"]] = worker
    return found
