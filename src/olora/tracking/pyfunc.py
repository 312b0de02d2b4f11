"""The registered model: an MLflow pyfunc that generates text with base + exported (plain LoRA) adapter.

Its artifacts keep the adapter in standard PEFT layout (`adapter/`), so
`mlflow.artifacts.download_artifacts(...)` hands a folder that PEFT or a serving engine loads
directly, and `base.json` records the base model reference the adapter needs.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc


class AdapterGenerator(mlflow.pyfunc.PythonModel):
    """predict(prompts) -> generated continuations (greedy unless params say otherwise)."""

    def load_context(self, context) -> None:
        from peft import PeftModel

        from olora.config import ModelConfig
        from olora.models import load_base, load_tokenizer, resolve_model
        from olora.runtime import resolve_runtime

        with open(context.artifacts["base"]) as handle:
            base = json.load(handle)
        model_cfg = ModelConfig(name=base["name"], revision=base["revision"])
        ref = resolve_model(model_cfg)
        runtime = resolve_runtime(model_cfg)
        self.tokenizer = load_tokenizer(ref)
        self.model = PeftModel.from_pretrained(load_base(ref, runtime), context.artifacts["adapter"]).eval()
        self.device = runtime.device

    def _prompts(self, model_input: Any) -> list[str]:
        if hasattr(model_input, "columns"):  # pandas DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            return [str(v) for v in model_input[column].tolist()]
        if isinstance(model_input, dict):
            value = model_input.get("prompt", model_input.get("prompts"))
            return [value] if isinstance(value, str) else list(value)
        if isinstance(model_input, str):
            return [model_input]
        return [str(v) for v in model_input]

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens", 64))
        use_chat = bool(params.get("chat_template", True)) and getattr(self.tokenizer, "chat_template", None)
        outputs = []
        for prompt in self._prompts(model_input):
            text = (
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                if use_chat
                else prompt
            )
            ids = self.tokenizer(text, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out = self.model.generate(
                    **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            outputs.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return outputs
