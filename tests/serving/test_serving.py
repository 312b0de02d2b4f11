"""Serving without a server: templates render as in training, batched generation equals one-by-one,
bad requests are refused with MLflow's INVALID_PARAMETER_VALUE, changed artifact files are named."""

from __future__ import annotations

import json

import pytest
import torch

from olora.data.templates import ALPACA_NO_INPUT, PromptTemplate, Record, render, render_prompt, resolve_template
from olora.errors import ConfigError
from olora.serving.pyfunc import (MAX_NEW_TOKENS, MAX_PROMPTS, PARAMS, AdapterGenerator, TamperedModelError,
                                   artifact_checksums, generate, signature, verify_artifacts)

pytestmark = pytest.mark.fault

PROMPTS = ["What is the capital of France?", "Name a fruit that is yellow.", "Hi", "Count to three, slowly please.",
           "Why is the sky blue?", "2+2=", "Translate 'cat' into French.", "Name a colour."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def test_serving_renders_exactly_what_prepare_trained_on(tiny):
    _, tokenizer = tiny
    for kind in ("alpaca", "chat"):
        template = resolve_template(kind, tokenizer)
        prompt, _ = render(Record("Name a colour", "", "blue", "t"), kind, tokenizer)  # prepare's path
        assert render_prompt(template, "Name a colour", "", tokenizer) == prompt  # serving's path
        restored = PromptTemplate.from_dict(json.loads(json.dumps(template.to_dict())))
        assert restored == template and render_prompt(restored, "Name a colour", "", tokenizer) == prompt
    assert render_prompt(resolve_template("alpaca"), "Name a colour") == ALPACA_NO_INPUT.format(instruction="Name a colour")


def test_recorded_template_survives_a_changed_tokenizer_template(tiny):
    _, tokenizer = tiny
    recorded = resolve_template("chat", tokenizer)
    before = render_prompt(recorded, "Hello", "", tokenizer)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        assert render_prompt(recorded, "Hello", "", tokenizer) == before
    finally:
        tokenizer.chat_template = original


def test_chat_template_needs_a_tokenizer_with_one():
    with pytest.raises(ConfigError, match="data.template=chat needs a chat template: this tokenizer has none"):
        resolve_template("chat", None)
    with pytest.raises(ConfigError, match="prompt template kind 'xml'"):
        PromptTemplate.from_dict({"kind": "xml"})


def test_batched_generation_equals_one_by_one(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    template = resolve_template("alpaca")
    texts = [render_prompt(template, p) for p in PROMPTS]
    batched = generate(model, tokenizer, texts, max_new_tokens=12, stop=template.stop)
    single = [generate(model, tokenizer, [t], max_new_tokens=12, stop=template.stop)[0] for t in texts]
    assert batched == single and len(batched) == 8
    assert tokenizer.padding_side == "right" or tokenizer.padding_side == "left"  # restored, whatever it was


def test_answers_stop_at_the_template_stop_text(tiny):
    model, tokenizer = tiny
    answers = generate(model, tokenizer, [render_prompt(resolve_template("alpaca"), "Hi")], max_new_tokens=40,
                       stop=("\n### ",))
    assert "\n### " not in answers[0]


def test_signature_documents_inputs_and_parameters():
    sig = signature()
    assert sig.inputs.input_names() == ["prompt"]
    assert {p.name: p.default for p in sig.params.params} == {name: default for name, (_, default) in PARAMS.items()}


@pytest.fixture(scope="module")
def generator(tiny):
    """The registered pyfunc's predict() on the tiny model (context 512 tokens), without load_context."""
    g = AdapterGenerator()
    g.model, g.tokenizer = tiny
    g.template = resolve_template("alpaca")
    return g


LONG = "word " * 470  # ~500 tokens in the template: over the 512-token context less 64 new tokens


@pytest.mark.parametrize("model_input, params, reason", [
    ({"prompt": ["Hi"]}, {"max_new_tokens": 0}, f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got 0"),
    ({"prompt": ["Hi"]}, {"max_new_tokens": MAX_NEW_TOKENS + 1}, f"between 1 and {MAX_NEW_TOKENS}, got {MAX_NEW_TOKENS + 1}"),
    ({"prompt": ["Hi"]}, {"max_new_tokens": 4, "min_new_tokens": 5}, r"min_new_tokens must be between 0 and max_new_tokens \(4\)"),
    ({"prompt": ["Hi"]}, {"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
    ({"prompt": ["Hi"]}, {"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"prompt": []}, {}, f"between 1 and {MAX_PROMPTS} prompts, got 0"),
    ({"prompt": ["Hi"] * (MAX_PROMPTS + 1)}, {}, f"between 1 and {MAX_PROMPTS} prompts, got {MAX_PROMPTS + 1}"),
    ({"question": ["Hi"]}, {}, "needs a 'prompt' field"),
    ({"prompt": ["Hi", LONG]}, {}, r"prompt 1 is \d+ tokens \(in the template\); the model's context is 512 tokens, "
                                   r"so with max_new_tokens=64 a prompt may hold at most 448"),
])
def test_bad_requests_are_refused_with_invalid_parameter_value(generator, model_input, params, reason):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=reason) as caught:
        generator.predict(None, model_input, params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"  # MLflow's scoring server answers it with 400


def test_a_dataframe_needs_the_prompt_column_and_a_long_prompt_fits_with_fewer_new_tokens(generator):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"needs a 'prompt' column; got \['question'\]"):
        generator.predict(None, pd.DataFrame({"question": ["Hi"]}))
    # the limit is the context minus the tokens asked for: the same prompt fits with max_new_tokens=2
    assert len(generator.predict(None, {"prompt": [LONG]}, {"max_new_tokens": 2})) == 1


def test_changed_artifact_files_are_named(tmp_path):
    adapter = tmp_path / "artifacts" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "artifacts" / "base.json").write_text("{}")
    recorded = artifact_checksums([adapter, tmp_path / "artifacts" / "base.json"])
    assert sorted(recorded) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "base.json"]
    verify_artifacts(tmp_path / "artifacts", recorded)  # unchanged: passes

    (adapter / "adapter_model.safetensors").write_bytes(b"weightS")
    with pytest.raises(TamperedModelError, match=r"^checksum mismatch for adapter/adapter_model.safetensors: the "
                                                 r"registered model's files were changed after registration; "):
        verify_artifacts(tmp_path / "artifacts", recorded)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "adapter_model.bin").write_bytes(b"other weights")
    with pytest.raises(TamperedModelError, match="unexpected file adapter/adapter_model.bin"):
        verify_artifacts(tmp_path / "artifacts", recorded)
    (adapter / "adapter_model.bin").unlink()
    (tmp_path / "artifacts" / "base.json").unlink()
    with pytest.raises(TamperedModelError, match="missing file base.json"):
        verify_artifacts(tmp_path / "artifacts", recorded)
