"""The calibration sample the data-driven inits (eva, corda, lora_ga) read: the first examples of the prepared
train split, tokenized exactly as training tokenizes them (prompt tokens masked) and padded into batches."""

from __future__ import annotations

from pathlib import Path

import torch

from olora.data.templates import encode, encode_segments
from olora.errors import DataError
from olora.io import read_jsonl
from olora.layout import TRAIN_FILE


def calibration_batches(data_dir: Path, tokenizer, max_len: int, samples: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """Up to `samples` training examples as batches of input_ids, attention_mask and labels (right-padded;
    padding and prompt tokens labelled -100). A train split with no usable example is a DataError."""
    rows = []
    for row in read_jsonl(Path(data_dir) / TRAIN_FILE):
        if "segments" in row:
            encoded = encode_segments(tokenizer, [(text, bool(trainable)) for text, trainable in row["segments"]], max_len)
        else:
            encoded = encode(tokenizer, row["prompt"], row["response"], max_len)
        if encoded is not None:
            rows.append(encoded[:2])
        if len(rows) == samples:
            break
    if not rows:
        raise DataError(f"{Path(data_dir) / TRAIN_FILE} has no example that fits data.max_seq_length={max_len}, so "
                        "adapter.init cannot read a calibration sample; re-run prepare or raise data.max_seq_length")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(chunk):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            labels[i, :len(row_labels)] = torch.tensor(row_labels)
            mask[i, :len(row_ids)] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
