"""A new data version as a Prefect event, and the set of versions already announced.

`olora publish-data` and the data watcher (`flows/data_watch.py:olora_data_watch`) send one
event `olora.data.published` per data version, on resource `olora.data.<version>`, with the commit
that published it in the payload; the `on-new-data` deployment's trigger (prefect.yaml) turns each
into one pipeline run on that commit. The versions already announced are kept in a Prefect variable
per repository and branch (`olora_data_versions_<key>`: one server may watch several), so a
version is announced once, whoever sees it first.
"""

from __future__ import annotations

import logging
from typing import Any

from olora.errors import OloraError
from olora.data.versions import DataVersion

log = logging.getLogger("olora")
EVENT = "olora.data.published"
RESOURCE_PREFIX = "olora.data."
SEEN_PREFIX = "olora_data_versions_"
SEEN_KEPT = 500  # the newest announced versions kept in the variable


class EventError(OloraError):
    """The Prefect API could not be reached or refused the event (the message names the server)."""


def api_url() -> str:
    """The configured Prefect API ($PREFECT_API_URL or the profile), '' when none (then nothing is sent)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value() or "")


def data_event(version: DataVersion, commit: str, branch: str, remote: str, by: str) -> dict[str, Any]:
    """The event for one data version published at `commit` (JSON, as Prefect's events API takes it)."""
    import uuid

    from prefect.events import Event

    event = Event(
        event=EVENT,
        resource={"prefect.resource.id": RESOURCE_PREFIX + version.short, "prefect.resource.name": f"data {version.short}",
                  "olora.commit": commit, "olora.branch": branch},
        payload={"commit": commit, "branch": branch, "git_remote": remote, "data_version": version.hash,
                 "data_source": version.source, "inputs": version.inputs, "announced_by": by},
        id=uuid.uuid5(uuid.NAMESPACE_URL, f"olora-data:{remote}:{version.hash}"),  # one id per version and remote
    )
    return event.model_dump(mode="json")


def emit(event: dict[str, Any]) -> None:
    """Send one event to the Prefect API, synchronously: an unreachable or refusing server is an EventError."""
    from prefect.client.orchestration import get_client

    url = api_url()
    if not url:
        raise EventError("no Prefect API is configured (PREFECT_API_URL); set it to the team's server, e.g. "
                         "`set -a; . ./stack.env; set +a`, or publish with --no-event and let the data watcher announce it")
    try:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events", json=[event])
    except Exception as exc:  # httpx raises several connection error types
        raise EventError(f"the Prefect API at {url} could not be reached ({exc}); start it or fix PREFECT_API_URL") from exc
    if response.status_code >= 300:
        raise EventError(f"the Prefect API at {url} refused the event ({response.status_code}: {response.text[:300]})")


def repository_key(remote: str, branch: str) -> str:
    """The same key for every spelling of one remote (ssh, scp-like, https, file://, with or without `.git`) and branch."""
    import hashlib
    import re

    where = remote.strip()
    scp = re.match(r"^(?:[^@/]+@)?([^:/]+):(?!//)(.+)$", where)  # git@host:org/repo
    if "://" in where:
        where = re.sub(r"^[a-z0-9+.-]+://(?:[^@/]+@)?", "", where, flags=re.I)  # the scheme and any user
    elif scp:
        where = f"{scp.group(1)}/{scp.group(2)}"
    where = where.rstrip("/").removesuffix(".git").lower()
    return hashlib.sha256(f"{where}#{branch}".encode()).hexdigest()[:12]


def seen_variable(remote: str, branch: str) -> str:
    """The Prefect variable holding the versions announced for that repository and branch."""
    return SEEN_PREFIX + repository_key(remote, branch)


def _variable(name: str, call):
    try:
        return call()
    except Exception as exc:  # httpx and Prefect raise several types for an unreachable or refusing server
        raise EventError(f"the Prefect API at {api_url() or '(none configured)'} could not be reached for the variable "
                         f"{name} ({exc}); start it or fix PREFECT_API_URL") from exc


def seen_versions(remote: str, branch: str) -> set[str] | None:
    """Data versions already announced for that repository and branch; None when nothing was recorded (a watcher's
    first run)."""
    from prefect.variables import Variable

    name = seen_variable(remote, branch)
    value = _variable(name, lambda: Variable.get(name, default=None))
    return None if value is None else set(value)


def mark_seen(remote: str, branch: str, hashes: list[str]) -> None:
    """Add versions to the repository's announced set (the newest SEEN_KEPT are kept)."""
    from prefect.variables import Variable

    name = seen_variable(remote, branch)
    known = list(_variable(name, lambda: Variable.get(name, default=None)) or [])
    known += [h for h in hashes if h not in known]
    _variable(name, lambda: Variable.set(name, known[-SEEN_KEPT:], overwrite=True))
