"""Conversational data: messages / ShareGPT / prompt-completion rows, the chat template, and a loss on every
assistant turn and nothing else (checked by decoding the tokens the loss sees)."""

from __future__ import annotations

import json

import pytest

from olora.config import DataConfig
from olora.data.prepare import prepare_data
from olora.devtools import field_docs
from olora.data.templates import NAMED_CHAT_TEMPLATES, encode_segments, render_conversation, resolve_template
from olora.errors import ConfigError, DataError
from olora.io import read_jsonl
from olora.training.trainer import tokenize_split


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def conversation(i: int, system: bool = True) -> list[dict]:
    turns = [{"role": "system", "content": "Answer in one short sentence."}] if system else []
    return turns + [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        {"role": "user", "content": "And times two?"},
        {"role": "assistant", "content": f"That is {4 * i}."},
    ]


SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def as_sharegpt(turns: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT_ROLE[t["role"]], "value": t["content"]} for t in turns]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_cfg(source: str, fmt: str = "messages", **extra) -> DataConfig:
    return DataConfig(source=source, format=fmt, template="chat", validation_fraction=0.25, **extra)


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The contiguous runs of tokens the loss sees."""
    out: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token  # an unmasked label is the token itself (the model shifts)
            if not previous:
                out.append([])
            out[-1].append(token)
        previous = label != -100
    return out


def test_loss_covers_exactly_every_assistant_turn(tokenizer):
    turns = conversation(3)
    template = resolve_template("chat", tokenizer)
    segments = render_conversation(template, tuple((t["role"], t["content"]) for t in turns), tokenizer)
    ids, labels, truncated = encode_segments(tokenizer, segments, 512)
    assert not truncated
    # the tokens decode to the chat template's own rendering of the whole conversation...
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(turns, tokenize=False)
    # ...and the unmasked ones to each assistant turn, as the template writes it, and nothing else
    end = template.stop[0]
    assert end == "<|im_end|>"
    expected = [t["content"] + end + "\n" for t in turns if t["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in runs(ids, labels)] == expected
    # the prompt side (system, user turns, the template's markup) is all masked
    masked = tokenizer.decode([i for i, label in zip(ids, labels) if label == -100])
    assert "Answer in one short sentence." in masked and "And times two?" in masked and "That is" not in masked


def test_messages_and_sharegpt_give_identical_tokens_and_masks(tmp_path, tokenizer):
    rows = [conversation(i, system=i % 2 == 0) for i in range(12)]
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": r} for r in rows])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": as_sharegpt(r)} for r in rows])
    a = prepare_data(chat_cfg(messages), tokenizer, tmp_path / "a")
    b = prepare_data(chat_cfg(sharegpt, "sharegpt"), tokenizer, tmp_path / "b")
    for split in ("train_path", "validation_path"):
        ra, rb = read_jsonl(getattr(a, split)), read_jsonl(getattr(b, split))
        assert [r["segments"] for r in ra] == [r["segments"] for r in rb]
        assert tokenize_split(tokenizer, ra, 256) == tokenize_split(tokenizer, rb, 256)
    assert a.stats["conversations"] == 12 and a.stats["assistant_turns"] == 24
    assert (tmp_path / "a" / "prompt_template.json").read_text() == (tmp_path / "b" / "prompt_template.json").read_text()
    recorded = json.loads((tmp_path / "a" / "prompt_template.json").read_text())
    assert recorded["kind"] == "chat" and recorded["chat_template"] == tokenizer.chat_template
    assert recorded["stop"] == ["<|im_end|>"]


def test_other_field_names_parquet_and_prompt_completion(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"dialog": conversation(i)} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    result = prepare_data(chat_cfg(str(tmp_path / "d.parquet"), conversation_field="dialog"), tokenizer, tmp_path / "p")
    assert result.stats["assistant_turns"] == 16
    with pytest.raises(DataError, match=r"d.parquet\[row 0\]: no field 'messages' .*set data.conversation_field"):
        prepare_data(chat_cfg(str(tmp_path / "d.parquet")), tokenizer, tmp_path / "q")

    pairs = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(8)])
    alpaca = prepare_data(DataConfig(source=pairs, format="prompt_completion", validation_fraction=0.25), tokenizer, tmp_path / "r")
    train = read_jsonl(alpaca.train_path)
    assert all(r["prompt"].endswith("### Response:\n") and r["prompt"].count("Say ") == 1 for r in train)
    assert {r["response"] for r in train} <= {str(i) for i in range(8)}


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],
     "turn 1 has unknown role 'bot'; allowed: system, user, assistant"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], r"turn 1 \(assistant\) has empty content"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
     "the conversation ends with a user turn; it must end with an assistant turn"),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be terse"}, {"role": "assistant", "content": "Hello"}],
     "turn 1 is a system turn; a system turn may only open the conversation"),
    ([{"role": "assistant", "content": "Hello"}], "the first turn after the system prompt is 'assistant'; it must be a user turn"),
    ([{"role": "user", "text": "Hi"}], r"turn 0 lacks role/content \(or from/value\); it has \['role', 'text'\]"),
])
def test_bad_conversations_are_named_by_file_and_row(tmp_path, tokenizer, turns, message):
    good = [{"messages": conversation(i)} for i in range(6)]
    source = write_jsonl(tmp_path / "c.jsonl", good[:2] + [{"messages": turns}] + good[2:])
    with pytest.raises(DataError, match=r"c.jsonl:3: " + message):
        prepare_data(chat_cfg(source), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the data is known good
    dropped = prepare_data(chat_cfg(source, invalid_rows="drop"), tokenizer, tmp_path / "out")
    assert dropped.stats["dropped_invalid"] == 1 and dropped.stats["conversations"] == 6


def test_long_conversations_follow_the_truncation_rule(tmp_path, tokenizer):
    long_answer = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(map(str, range(200)))}]
    long_prompt = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": conversation(i)} for i in range(6)] + [{"messages": long_answer}, {"messages": long_prompt}]
    result = prepare_data(chat_cfg(write_jsonl(tmp_path / "l.jsonl", rows), max_seq_length=96), tokenizer, tmp_path / "o")
    assert result.stats["truncated"] == 1 and result.stats["dropped_prompt_too_long"] == 1
    assert result.stats["token_length"]["max"] == 96


def test_assistant_turns_count_what_the_loss_sees_after_the_cut(tmp_path, tokenizer):
    """metrics/data.json's assistant_turns: turns with a token in the loss; turns the cut removed are counted apart."""
    from olora.data.templates import encode_conversation

    three = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "More."}, {"role": "assistant", "content": " ".join(map(str, range(60)))},
             {"role": "user", "content": "Again."}, {"role": "assistant", "content": "done"}]
    template = resolve_template("chat", tokenizer)
    segments = render_conversation(template, tuple((t["role"], t["content"]) for t in three), tokenizer)
    ids, labels, truncated, in_loss = encode_conversation(tokenizer, segments, 64)
    assert truncated and in_loss == 2  # the second answer is cut inside, the third starts past the budget
    assert runs(ids, labels)[0] == tokenizer("one" + template.stop[0] + "\n", add_special_tokens=False)["input_ids"]
    rows = [{"messages": conversation(i)} for i in range(6)] + [{"messages": three}]
    result = prepare_data(chat_cfg(write_jsonl(tmp_path / "t.jsonl", rows), max_seq_length=64), tokenizer, tmp_path / "o")
    assert (result.stats["truncated"], result.stats["assistant_turns"], result.stats["assistant_turns_removed"]) == (1, 6 * 2 + 2, 1)
    assert "Conversations: the whole conversation; a longer one is cut" in field_docs(DataConfig)["max_seq_length"]


def test_invalid_rows_drop_skips_row_faults_but_not_a_broken_file(tmp_path, tokenizer):
    """What data.invalid_rows's docstring promises: drop covers role and turn faults; a broken JSON line stops either way."""
    good = [{"conversations": as_sharegpt(conversation(i))} for i in range(6)]
    bad_role = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    bad_order = {"conversations": [{"from": "gpt", "value": "Hello"}]}
    source = write_jsonl(tmp_path / "s.jsonl", good + [bad_role, bad_order])
    with pytest.raises(DataError) as info:
        prepare_data(chat_cfg(source, "sharegpt"), tokenizer, tmp_path / "out")
    assert str(info.value).splitlines()[0] == (
        f"{source}:7: turn 1 has unknown role 'bot'; allowed: system, human, gpt (data.format=sharegpt; user and assistant "
        "are read too); fix the conversation, or set data.invalid_rows=drop to skip such rows")
    assert prepare_data(chat_cfg(source, "sharegpt", invalid_rows="drop"), tokenizer, tmp_path / "out").stats["dropped_invalid"] == 2
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(good[0]) + "\n" + '{"conversations": [}\n')
    with pytest.raises(DataError, match=r"b.jsonl, line 2, column 20: not valid JSON \(Expecting value\); fix or remove that line"):
        prepare_data(chat_cfg(str(broken), "sharegpt", invalid_rows="drop"), tokenizer, tmp_path / "out2")
    doc = field_docs(DataConfig)["invalid_rows"]
    assert "in conversations also unknown roles and misplaced, empty or missing turns" in doc
    assert "A file that cannot be parsed (a broken JSON line, not UTF-8) stops prepare either way." in doc


def test_chat_template_choices(tmp_path, tokenizer):
    from copy import deepcopy

    bare = deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="this tokenizer has none; set data.chat_template to a named template"):
        resolve_template("chat", bare)
    named = resolve_template("chat", bare, "chatml")
    assert named.chat_template == NAMED_CHAT_TEMPLATES["chatml"] and named.stop == ("<|im_end|>",)
    turns = tuple((t["role"], t["content"]) for t in conversation(2, system=False))
    segments = render_conversation(named, turns, bare)
    assert "".join(text for text, _ in segments).startswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n")
    assert [text for text, trainable in segments if trainable] == ["2 plus 2 is 4.<|im_end|>\n", "That is 8.<|im_end|>\n"]
    with pytest.raises(ConfigError, match="data.chat_template='vicuna' is not a named template"):
        DataConfig(chat_template="vicuna").validate()
    with pytest.raises(ConfigError, match="data.format=messages holds conversations.*set data.template=chat"):
        DataConfig(source="data/raw/c.jsonl", format="messages").validate()
    with pytest.raises(ConfigError, match="data.format=sharegpt applies to files and hub data sets"):
        DataConfig(format="sharegpt", template="chat").validate()
    with pytest.raises(ConfigError, match="data.format='turns' is not allowed"):
        DataConfig(format="turns").validate()
