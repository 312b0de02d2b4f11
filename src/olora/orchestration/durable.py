"""Whether a run can record durably: its MLflow tracking store and its DVC remote outside the folders it deletes.

A Prefect process worker runs each deployment's `git_clone` pull step in a temporary folder that it
deletes when the flow run ends, and an isolated run removes its own workspace once recorded. A
tracking store or DVC remote that resolves inside either (the SQLite fallback `<clone>/mlflow.db`, a
relative remote such as `../.dvc-remote`) would vanish with it while the run reports success. The
flows and the data watcher call `check` before any stage; `olora check --deployment` runs it by hand
on a clone of the checkout, as a worker would see it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from olora import dvc
from olora.errors import OloraError
from olora.layout import Layout
from olora.tracking.client import Tracking, redact_uri

log = logging.getLogger("olora")
WORKER_TEMP = re.compile(r"^tmp.*prefect$")  # Prefect's process worker: tempfile.TemporaryDirectory(suffix="prefect")
FIX_TRACKING = ("set MLFLOW_TRACKING_URI, where the worker (or this command) starts, to a tracking server (`make stack` "
                "writes it to stack.env) or to a store outside it, e.g. sqlite:////abs/path/mlflow.db")
FIX_DVC = ("make the default DVC remote a server URL or an absolute folder outside it (`dvc remote add -d --force NAME "
           "/abs/path`, committed in .dvc/config for workers that clone, or in .dvc/config.local beside a checkout), "
           "or set OLORA_DVC_REMOTE_URL (stack.env does)")


class DurabilityError(OloraError):
    """The run's tracking store or DVC remote lies inside a folder that is deleted when the run ends."""


@dataclass(frozen=True)
class Folder:
    path: Path
    why: str
    """What the folder is and why it goes, e.g. "the temporary folder this deployment run was cloned into"."""
    clone: bool = False
    """A deployment's temporary clone: its DVC cache goes too, so a DVC remote is required."""


def temporary_clone(source: Path) -> Folder | None:
    """The deployment's temporary folder that holds `source` (deleted when the flow run ends, with why), or None.

    Either it lies under a Prefect process worker's temporary working folder, or this flow run's
    deployment clones its code with a `git_clone` pull step (asked of the Prefect API).
    """
    source, temp = Path(source).resolve(), Path(tempfile.gettempdir()).resolve()
    for parent in (source, *source.parents):
        if parent.parent == temp and WORKER_TEMP.match(parent.name):
            return Folder(parent, f"the Prefect worker's temporary folder {parent}, deleted when the flow run ends", True)
    try:
        from prefect.runtime import deployment

        deployment_id = deployment.id
    except Exception:  # noqa: BLE001 - no Prefect context: not a deployment run
        return None
    if not deployment_id:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            steps = client.read_deployment(deployment_id).pull_steps or []
    except Exception as exc:  # noqa: BLE001 - the API answers every flow run; say so rather than guess
        log.warning("could not read deployment %s's pull steps (%s); assuming its code was cloned", deployment_id, exc)
        steps = [{"git_clone": {}}]
    if any("git_clone" in name for step in steps for name in step):
        return Folder(source, f"the folder {source} that deployment {deployment.name!r}'s git_clone pull step cloned this "
                      "run's code into, deleted when the flow run ends", True)
    return None


def inside(path: Path, folders: list[Folder]) -> Folder | None:
    path = Path(os.path.abspath(path))
    return next((f for f in folders if path == f.path.resolve() or f.path.resolve() in path.parents), None)


def _local_path(url: str) -> Path | None:
    """The folder a local store URL names (None for a server URL)."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url or re.match(r"^[A-Za-z][\w+.-]*:", url):
        return None
    return Path(url)


def tracking_problem(tracking: Tracking, folders: list[Folder]) -> str | None:
    """Why the tracking store would be lost with one of `folders`, or None."""
    if not tracking.enabled:
        return None
    uri = tracking.uri
    if uri.startswith("sqlite:"):
        raw = uri.removeprefix("sqlite:///").split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if not raw:
            return f"the MLflow tracking store {redact_uri(uri)} is in memory; {FIX_TRACKING}"
        path = Path(raw)
    else:
        path = _local_path(uri)
    if path is None:
        return None  # a tracking server (reached with retries by the first stage that records)
    found = inside(path, folders)  # a relative path: against the working folder, which is the clone in a deployment
    if found:
        return (f"the MLflow tracking store {redact_uri(uri)} lies inside {found.why}: the run and its registered "
                f"version would be lost with it (`olora promote` and `olora serve` elsewhere would find nothing); "
                f"{FIX_TRACKING}")
    return None


def dvc_remote(root: Path) -> tuple[str, str] | None:
    """The default DVC remote of the checkout `root` as DVC resolves it (name, URL), else $OLORA_DVC_REMOTE_URL's."""
    out = dvc.run(root, "remote", "default", check=False)
    name = out.stdout.strip() if out.returncode == 0 else ""
    if name and not name.startswith("No default remote"):  # what DVC prints where none is set
        return name, dvc.run(root, "config", f"remote.{name}.url", check=False).stdout.strip()
    if os.environ.get("OLORA_DVC_REMOTE_URL"):  # what a clone without a remote gets (workspace.add_team_remote)
        return os.environ.get("OLORA_DVC_REMOTE") or "team", os.environ["OLORA_DVC_REMOTE_URL"]
    return None


def dvc_problem(root: Path, folders: list[Folder], required: bool) -> str | None:
    """Why the DVC remote would be lost with one of `folders` (or is missing where it is `required`), or None."""
    remote = dvc_remote(root)
    if remote is None:
        return (f"there is no DVC remote, so the adapter and data would stay only in the DVC cache inside "
                f"{folders[0].why}; {FIX_DVC}") if required else None
    name, url = remote
    path = _local_path(url)
    if path is None:
        return None  # s3://, ssh://, ...: a server
    found = inside(path if path.is_absolute() else Path(root) / path, folders)
    if found:
        return (f"the DVC remote {name!r} ({url}) lies inside {found.why}: the adapter and data `dvc push` writes "
                f"there would be lost, and the run's runs/* branch would point at objects that exist nowhere; {FIX_DVC}")
    return None


def check(root: Path, tracking: Tracking | None, folders: list[Folder], push: bool = True, what: str = "this run") -> None:
    """Refuse, before any stage, a run whose tracking store or DVC remote lies in a folder it deletes.

    `root` is the checkout whose DVC configuration the run uses; `folders` the folders deleted when it
    ends (its workspace, the deployment's temporary clone); `push` whether it pushes to (or reads) the DVC remote:
    a run in a clone that pushes nothing (`push=False`, recorded as `olora.dvc_pushed=false`) needs none.
    `tracking` None: no tracking store to check (the data watcher).
    """
    if not folders:
        return
    clone = any(f.clone for f in folders)
    problems = [p for p in (tracking_problem(tracking, folders) if tracking else None,
                            dvc_problem(root, folders, required=clone and push) if push or clone else None) if p]
    if problems:
        raise DurabilityError(f"{what} cannot record durably, so it was not started: " + ". Also: ".join(problems)
                              + ". Nothing was run")
    found = ([f"tracking {redact_uri(tracking.uri)}"] if tracking and tracking.enabled else []) + \
        [f"DVC remote {(dvc_remote(root) or ('', 'none'))[1]}"]
    log.info("%s records durably: %s", what, ", ".join(found))


def run_folders(source: Path, workspace: Path | None) -> list[Folder]:
    """The folders a flow run deletes: the deployment's temporary clone (when it is one), then its own workspace."""
    folders = []
    clone = temporary_clone(source)
    if clone:
        folders.append(clone)
    if workspace is not None:
        folders.append(Folder(Path(workspace), f"the run's own workspace {workspace}, removed once the run is recorded"))
    return folders


def check_deployment(root: Path, cfg) -> str:
    """`olora check --deployment`: the check a deployment run makes, on a clone of this checkout's HEAD in a folder
    like the worker's (what its `git_clone` pull step gives it), with this environment. Returns what it found."""
    import subprocess

    from olora.config import load_config

    root = Path(root).resolve()
    with tempfile.TemporaryDirectory(suffix="prefect") as tmp:  # named as Prefect's process worker names its folders
        clone = Path(tmp) / "clone"
        out = subprocess.run(["git", "clone", "--quiet", str(root), str(clone)], capture_output=True, text=True)
        if out.returncode != 0:
            raise DurabilityError(f"{root} could not be cloned as a worker would clone it ({out.stderr.strip()[-300:]}); "
                                  "deployments clone the committed branch: `git init` and commit first")
        params = Layout(clone).params
        tracking = Tracking.of(load_config(params) if params.is_file() else cfg, clone)
        try:
            check(clone, tracking, run_folders(clone, None), push=True, what="a deployment run of this checkout")
        except DurabilityError as exc:
            text = str(exc).replace(str(clone), "<clone>").replace(str(Path(tmp).resolve()), "<worker temp>")
            raise DurabilityError(text) from None
        remote = dvc_remote(clone)
    return (f"deployment check passed: a worker's clone of this checkout records to {redact_uri(tracking.uri)} and "
            f"pushes to the DVC remote {remote[0]!r} ({remote[1]}), both outside the clone")
