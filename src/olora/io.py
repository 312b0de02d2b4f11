"""File helpers: atomic writes (a failed stage never leaves a half-written output), JSONL, adapter-folder checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from olora.errors import DataError, OloraError
from olora.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INIT, INIT_META, metrics_path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on failure it is removed."""
    from olora.faults import marker

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # what a killed writer left behind (the stage lock makes this process the only writer)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        marker(f"{target.name}:written")  # complete in the temp folder, not yet swapped in
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, header: list[str], rows) -> None:
    """Write a CSV file atomically (temp file + rename): a header row, then `rows`."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


class MissingOutputError(OloraError, FileNotFoundError):
    """A file an earlier stage writes is not there."""


# file (project-relative suffix) -> the DVC stage that writes it, for the message naming the fix
WRITTEN_BY = {
    f"{INIT}/{INIT_META}": "init",
    metrics_path("train"): "train",
    metrics_path("eval_base"): "evaluate_base",
    metrics_path("eval_adapter"): "evaluate",
}


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        stage = next((s for rel, s in WRITTEN_BY.items() if path.as_posix().endswith("/" + rel) or path.as_posix() == rel), None)
        hint = f"; the {stage} stage writes it: run it first (`dvc repro {stage}`)" if stage else ""
        raise MissingOutputError(f"{path} not found{hint}")
    return json.loads(path.read_text())


def write_jsonl_atomic(out_dir: Path, files: dict[str, list[dict[str, Any]]], extra_json: dict[str, Any] | None = None) -> None:
    """Write every file (and `extra_json` files) into a sibling temp folder, then swap it in: a failure leaves the old folder."""
    with atomic_dir(out_dir) as tmp:
        for name, rows in files.items():
            with (tmp / name).open("w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage first (`dvc repro prepare`)")
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def check_adapter_dir(path: Path) -> None:
    """Refuse an adapter folder with missing or unreadable files before anything loads it."""
    from safetensors import safe_open

    path = Path(path)
    rebuild = "re-run the train stage to write it again (`dvc repro train`, or `dvc checkout` to restore it)"
    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    missing = [f.name for f in (config, weights) if not f.is_file()]
    if missing:
        raise OloraError(
            f"{path} is not a PEFT adapter folder (missing {' and '.join(missing)}); {rebuild}"
        )
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise OloraError(f"{config} is not valid JSON ({exc}); {rebuild}") from None
    if not isinstance(values, dict) or "peft_type" not in values:
        raise OloraError(f"{config} is not a PEFT adapter config (no peft_type); {rebuild}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as exc:
        raise OloraError(f"{weights} is unreadable or truncated ({exc}); {rebuild}") from exc
