"""Slow tier: the embedded SmolLM2-135M-Instruct through every stage for a few steps."""

from __future__ import annotations

import json

import pytest
import torch

from olora.stages import STAGES
from olora.layout import Layout
from olora.config import apply_overrides, load_config

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("embedded")
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    values = apply_overrides(
        values,
        {
            "runtime.num_threads": 2,
            "data.max_examples": 64,
            "train.max_steps": 3,
            "train.micro_batch_size": 2,
            "train.eval_steps": 3,
            "train.save_steps": 3,
            "train.max_eval_examples": 4,
            "evaluate.tasks": ["arc_easy", "piqa"],
            "evaluate.limit": 4,
        },
    )
    (root / "params.yaml").write_text(yaml.safe_dump(values))
    load_config(root / "params.yaml")
    return Layout(root)


def test_embedded_model_every_stage(layout):
    from peft import PeftModel

    from olora.modeling.models import load_base, load_tokenizer, resolve_model
    from olora.modeling.runtime import resolve_runtime

    STAGES["prepare"].run(layout)
    init = STAGES["init"].run(layout)
    assert init["layers"] == 30 * 7
    assert init["max_orthonormality_error"] < 1e-5
    assert init["max_output_diff"] < 1e-5 * init["max_abs_logit"] * 100  # fp32 rounding through 30 layers
    train = STAGES["train"].run(layout)
    assert train["steps"] == 3 and train["final_val_loss"] < 10
    STAGES["evaluate_base"].run(layout)
    tuned = STAGES["evaluate"].run(layout)
    assert set(tuned.tasks) == {"arc_easy", "piqa"}

    cfg = load_config(layout.params)
    ref, runtime = resolve_model(cfg.model), resolve_runtime(cfg.model)
    tokenizer = load_tokenizer(ref)
    model = PeftModel.from_pretrained(load_base(ref, runtime), str(layout.exported)).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # three small steps keep the instruct model's knowledge
    assert json.loads((layout.root / "metrics/train.json").read_text())["steps"] == 3
