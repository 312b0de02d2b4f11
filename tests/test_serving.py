"""Serving without a server: templates render as in training, batched generation equals one-by-one."""

from __future__ import annotations

import json

import pytest
import torch

from olora.data.templates import ALPACA_NO_INPUT, PromptTemplate, Record, render, render_prompt, resolve_template
from olora.errors import ConfigError
from olora.tracking.pyfunc import PARAMS, generate, signature

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
    with pytest.raises(ConfigError, match="data.template=chat needs a tokenizer with a chat template"):
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
