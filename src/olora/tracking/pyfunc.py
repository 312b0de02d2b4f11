"""The registered model: an MLflow pyfunc that answers prompts with base + exported (plain LoRA) adapter.

Its artifacts keep the adapter in standard PEFT layout (`adapter/`), so
`mlflow.artifacts.download_artifacts(...)` hands a folder that PEFT or a serving engine loads
directly; `base.json` names the base model the adapter needs; `template.json` is the prompt
template the adapter was fine-tuned with, in rendered form. Every prompt is wrapped in exactly that
template (`olora.data.templates.render_prompt`, the function prepare used), unless a request asks
for raw text with the `raw` parameter. Prompts of one request are generated in one left-padded
batch; generation stops at EOS or the template's stop text, and only the answer is returned.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc

# parameter -> (MLflow type, default): the model signature shows them in the UI and /invocations
PARAMS: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("long", 64),
    "min_new_tokens": ("long", 0),
    "do_sample": ("boolean", False),
    "temperature": ("double", 1.0),
    "top_p": ("double", 1.0),
    "raw": ("boolean", False),
}


def signature():
    """Inputs: a `prompt` string column; outputs: the answers; params: PARAMS with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "answer")]),
        params=ParamSchema([ParamSpec(name, kind, default) for name, (kind, default) in PARAMS.items()]),
    )


def generate(model, tokenizer, texts: list[str], max_new_tokens: int = 64, stop: tuple[str, ...] = (),
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0) -> list[str]:
    """Answers for already-rendered prompt texts: one left-padded `generate` call, the new tokens only."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the last real token
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "do_sample": do_sample,
                               "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    with torch.no_grad():
        out = model.generate(**batch, **options)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:]:
        text = tokenizer.decode(row, skip_special_tokens=True)
        for marker in stop:  # the stop text belongs to the next section, not to the answer
            text = text.split(marker)[0]
        answers.append(text.strip())
    return answers


class AdapterGenerator(mlflow.pyfunc.PythonModel):
    """predict(prompts) -> answers (greedy unless params say otherwise), in the training prompt template."""

    def load_context(self, context) -> None:
        from pathlib import Path

        from peft import PeftModel

        from olora.config import ModelConfig
        from olora.data.templates import PromptTemplate
        from olora.models import load_base, load_tokenizer, resolve_model
        from olora.runtime import resolve_runtime

        with open(context.artifacts["base"]) as handle:
            base = json.load(handle)
        with open(context.artifacts["template"]) as handle:
            self.template = PromptTemplate.from_dict(json.load(handle))
        name = base["path"] if base.get("path") and Path(base["path"]).is_dir() else base["name"]
        model_cfg = ModelConfig(name=name, revision=base["revision"])
        ref = resolve_model(model_cfg)
        runtime = resolve_runtime(model_cfg)
        self.tokenizer = load_tokenizer(ref)
        self.model = PeftModel.from_pretrained(load_base(ref, runtime), context.artifacts["adapter"]).eval()

    def _prompts(self, model_input: Any) -> list[str]:
        if hasattr(model_input, "columns"):  # pandas DataFrame; {"prompt": [...]} arrives as one row holding a list
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            out: list[str] = []
            for value in model_input[column].tolist():
                if hasattr(value, "tolist"):  # a numpy array cell
                    value = value.tolist()
                out.extend(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
            return out
        if isinstance(model_input, dict):
            value = model_input.get("prompt", model_input.get("prompts"))
            return [value] if isinstance(value, str) else list(value)
        if isinstance(model_input, str):
            return [model_input]
        return [str(v) for v in model_input]

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from olora.data.templates import render_prompt

        p = {name: default for name, (_, default) in PARAMS.items()} | (params or {})
        prompts = self._prompts(model_input)
        texts = prompts if p["raw"] else [render_prompt(self.template, q, "", self.tokenizer) for q in prompts]
        return generate(self.model, self.tokenizer, texts, int(p["max_new_tokens"]),
                        () if p["raw"] else self.template.stop, bool(p["do_sample"]), float(p["temperature"]),
                        float(p["top_p"]), int(p["min_new_tokens"]))
