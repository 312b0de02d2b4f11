"""stack.env: the shared services' client settings (written by `make stack`), picked up by the pipeline.

`olora` commands (so `dvc repro`'s stages) and the Prefect flows load `<project>/stack.env` when it
exists, so they log to the team's MLflow server, use its S3 store and DVC remote, without the user
exporting anything. Variables already set in the environment win; a missing file changes nothing
(the project's local defaults apply). The `mlflow`, `prefect` and `dvc` CLIs read the same file
after `set -a; . ./stack.env; set +a`. A stack.env whose MLflow server takes no connection (its stack
is down) stops the command at once with one line saying so (`check_stack_answers`); `make stack-down`
moves this machine's stack.env aside (`stack.stopped.env`).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from olora.errors import OloraError

ENV_FILE = "stack.env"
STOPPED_FILE = "stack.stopped.env"  # where `make stack-down` moves stack.env: git-ignored (*.env), read by nothing
PROBE_SECONDS = 2.0


class EnvFileError(OloraError):
    """A stack.env line that is not KEY=value."""


class ServiceError(OloraError):
    """The team's services could not be configured, started, stopped or reached (`make stack`)."""


class StackDownError(EnvFileError):
    """stack.env names an MLflow server that does not answer: the stack it was written for is down."""


def check_stack_answers(path: Path | str, values: dict[str, str], seconds: float = PROBE_SECONDS) -> None:
    """Raise StackDownError, in one line and within `seconds`, when stack.env's MLflow server takes no connection.

    Without this, a stack.env left behind by a stopped stack sends every command to a dead server
    (retries, then a connection error), and the project's own local store is silently out of reach.
    """
    uri = values.get("MLFLOW_TRACKING_URI", "")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=seconds):
            return
    except (OSError, ValueError):
        pass
    raise StackDownError(
        f"{path} points at a stack that is down (no MLflow server answers at {uri}): start it with `make stack`, "
        f"or stop using it with `mv {ENV_FILE} {STOPPED_FILE}` (`make stack-down` does) to use the project's own stores"
    )


def read_env_file(path: Path | str) -> dict[str, str]:
    """KEY=value lines (comments, blanks and `export ` allowed; values may be shell-quoted)."""
    values = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, raw = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise EnvFileError(f"{path}:{number}: expected KEY=value (as `python -m olora.ops.stack up` writes it)")
        parts = shlex.split(raw, comments=True) if raw.strip() else [""]
        values[key.strip()] = parts[0] if parts else ""
    return values


def load_env(root: Path | str = ".", *, path: Path | str | None = None, override: bool = False) -> dict[str, str]:
    """Put the stack's client variables (root/stack.env) into os.environ; variables already set win.

    Returns what it set. A missing file sets nothing (no stack: the pipeline's local defaults apply).
    A file whose MLflow server takes no connection (the stack is down) raises StackDownError.
    """
    path = Path(path) if path is not None else Path(root) / ENV_FILE
    if not path.is_file():
        return {}
    values = read_env_file(path)
    if override or "MLFLOW_TRACKING_URI" not in os.environ:  # its server is the one commands would use
        check_stack_answers(path, values)
    applied = {}
    for key, value in values.items():
        if override or key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


@contextlib.contextmanager
def stack_env(root: Path | str) -> Iterator[dict[str, str]]:
    """load_env for the duration of a block (a flow run), then the environment as it was."""
    applied = load_env(root)
    try:
        yield applied
    finally:
        for key in applied:
            os.environ.pop(key, None)
