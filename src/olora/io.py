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
from olora.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
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


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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
    config, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config.is_file() or not weights.is_file():
        raise OloraError(f"{path} is not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as exc:
        raise OloraError(f"{weights} is unreadable or truncated: {exc}") from exc
