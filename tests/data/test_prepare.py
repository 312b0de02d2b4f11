"""Data preparation: sources, validation errors that name file and row, dedupe, split, statistics."""

from __future__ import annotations

import json

import pytest

from olora.config import DataConfig
from olora.errors import ConfigError, DataError
from olora.data.sources import embedded_records
from olora.data.templates import Record, encode, render
from olora.io import read_jsonl
from olora.data.prepare import prepare_data as prepare


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"instruction": f"Say {i}", "input": "" if i % 2 else f"ctx {i}", "output": f"answer {i}"} for i in range(30)]


def test_embedded_sets_become_instruction_pairs():
    seen = {}
    for record in embedded_records(["commonsense_qa", "social_i_qa", "trivia_qa"]):
        seen.setdefault(record.origin.split(":")[0], record)
    assert set(seen) == {"commonsense_qa", "social_i_qa", "trivia_qa"}
    csqa = seen["commonsense_qa"]
    assert "\nA. " in csqa.input and csqa.output[0] in "ABCDE" and csqa.output[1:3] == ". "
    assert seen["trivia_qa"].output and not seen["trivia_qa"].input
    with pytest.raises(ConfigError, match="available: commonsense_qa, social_i_qa, trivia_qa"):
        list(embedded_records(["hellaswag"]))


def test_prepare_jsonl_dedupes_splits_deterministically_and_counts(tmp_path, tokenizer):
    src = _write_jsonl(tmp_path / "d.jsonl", ROWS + ROWS[:5])
    cfg = DataConfig(source=str(src), validation_fraction=0.2, seed=7)
    first = prepare(cfg, tokenizer, tmp_path / "out1")
    second = prepare(cfg, tokenizer, tmp_path / "out2")
    assert first.stats["dropped_duplicate"] == 5
    assert first.stats["train_examples"] == 24 and first.stats["validation_examples"] == 6
    assert read_jsonl(first.validation_path) == read_jsonl(second.validation_path)
    other = prepare(DataConfig(source=str(src), validation_fraction=0.2, seed=8), tokenizer, tmp_path / "out3")
    assert read_jsonl(other.validation_path) != read_jsonl(first.validation_path)
    train = read_jsonl(first.train_path)
    assert all(r["prompt"].endswith("### Response:\n") for r in train)
    assert {r["response"] for r in train + read_jsonl(first.validation_path)} == {r["output"] for r in ROWS}
    assert first.stats["token_length"]["max"] >= first.stats["token_length"]["p50"] > 0


@pytest.mark.parametrize("suffix", ["csv", "parquet", "json"])
def test_other_file_formats_and_custom_fields(tmp_path, tokenizer, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": r["instruction"], "a": r["output"]} for r in ROWS]
    path = tmp_path / f"d.{suffix}"
    if suffix == "csv":
        path.write_text("q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in rows))
    elif suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows))
    cfg = DataConfig(source=str(path), instruction_field="q", output_field="a", input_field=None)
    result = prepare(cfg, tokenizer, tmp_path / "out")
    assert result.stats["examples"] == 30


def test_malformed_and_incomplete_rows_are_named(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, column 2: not valid JSON"):
        prepare(DataConfig(source=str(bad)), tokenizer, tmp_path / "out")
    missing = _write_jsonl(tmp_path / "m.jsonl", [ROWS[0], {"instruction": "x"}, {"instruction": "y", "output": " "}])
    with pytest.raises(DataError) as info:
        prepare(DataConfig(source=str(missing)), tokenizer, tmp_path / "out")
    message = str(info.value)
    assert "m.jsonl:2: missing or empty field(s) ['output']" in message and "m.jsonl:3" in message
    assert "data.invalid_rows=drop" in message
    result = prepare(DataConfig(source=str(_write_jsonl(tmp_path / "k.jsonl", ROWS + [{"instruction": "z"}])), invalid_rows="drop"), tokenizer, tmp_path / "out")
    assert result.stats["dropped_invalid"] == 1
    assert not (tmp_path / "out.tmp").exists()


def test_missing_file_empty_data_and_offline_hub(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(DataError, match="nope.jsonl not found"):
        prepare(DataConfig(source=str(tmp_path / "nope.jsonl")), tokenizer, tmp_path / "out")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no examples left after filtering"):
        prepare(DataConfig(source=str(empty)), tokenizer, tmp_path / "out")
    long = _write_jsonl(tmp_path / "l.jsonl", [{"instruction": "word " * 200, "output": "x"}])
    with pytest.raises(DataError, match="no examples left.*'dropped_prompt_too_long': 1"):
        prepare(DataConfig(source=str(long), max_seq_length=64), tokenizer, tmp_path / "out")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is offline.*data.source=embedded"):
        prepare(DataConfig(source="yahma/alpaca-cleaned"), tokenizer, tmp_path / "out")


def test_failed_prepare_keeps_previous_output(tmp_path, tokenizer):
    good = _write_jsonl(tmp_path / "g.jsonl", ROWS)
    out = tmp_path / "out"
    prepare(DataConfig(source=str(good)), tokenizer, out)
    before = (out / "train.jsonl").read_bytes()
    with pytest.raises(DataError):
        prepare(DataConfig(source=str(tmp_path / "missing.jsonl")), tokenizer, out)
    assert (out / "train.jsonl").read_bytes() == before


def test_encode_masks_prompt_and_truncates_response(tokenizer):
    prompt, response = render(Record("Name a colour", "", "blue " * 50, "t"), "alpaca")
    ids, labels, truncated = encode(tokenizer, prompt, response, 64)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert len(ids) == len(labels) == 64 and truncated
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    ids, labels, truncated = encode(tokenizer, prompt, "blue", 256)
    assert not truncated and ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
