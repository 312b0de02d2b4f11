"""The registered model: an MLflow pyfunc that answers prompts with base + exported (plain LoRA) adapter.

Its artifacts keep the adapter in standard PEFT layout (`adapter/`), so
`mlflow.artifacts.download_artifacts(...)` hands a folder that PEFT or a serving engine loads
directly; `base.json` names the base model the adapter needs; `template.json` is the prompt
template the adapter was fine-tuned with, in rendered form. Every prompt is wrapped in exactly that
template (`olora.data.templates.render_prompt`, the function prepare used), unless a request asks
for raw text with the `raw` parameter. Prompts of one request are generated in one left-padded
batch; generation stops at EOS or the template's stop text, and only the answer is returned.

Requests are checked before any generation: a bad parameter, too many prompts, or a prompt that
leaves no room for `max_new_tokens` in the model's context raises MLflow's INVALID_PARAMETER_VALUE,
which MLflow's scoring server answers with HTTP 400 and the reason. Loading verifies every artifact
file against the sha256 recorded at registration (`artifact_sha256` in the model's metadata) and
refuses a model whose files changed since.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from olora.errors import OloraError

log = logging.getLogger("olora")

# parameter -> (MLflow type, default): the model signature shows them in the UI and /invocations
PARAMS: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("long", 64),
    "min_new_tokens": ("long", 0),
    "do_sample": ("boolean", False),
    "temperature": ("double", 1.0),
    "top_p": ("double", 1.0),
    "raw": ("boolean", False),
}
MAX_NEW_TOKENS = 1024  # the most new tokens one request may ask for
MAX_PROMPTS = 64  # the most prompts one request may carry (they are generated in one batch)
CHECKSUMS_KEY = "artifact_sha256"  # metadata key (and model version tag) holding {relative path: sha256}


class TamperedModelError(OloraError):
    """A registered model's files differ from the checksums recorded when it was registered."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_checksums(paths: list[Path]) -> dict[str, str]:
    """{name: sha256} for artifact files and every file inside artifact folders, named as pyfunc stores them
    under the model's `artifacts/` folder (`base.json`, `adapter/adapter_model.safetensors`, ...)."""
    out: dict[str, str] = {}
    for path in map(Path, paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            out[f.relative_to(path.parent).as_posix()] = file_sha256(f)
    return dict(sorted(out.items()))


def verify_artifacts(artifacts_dir: Path, recorded: dict[str, str]) -> None:
    """Raise TamperedModelError naming the first file under `artifacts_dir` that differs from `recorded`."""
    hint = ("the registered model's files were changed after registration; delete this version and "
            "re-register it (`dvc repro -f register`)")
    actual = artifact_checksums(sorted(Path(artifacts_dir).iterdir()))
    for name, sha in recorded.items():
        if name not in actual:
            raise TamperedModelError(f"missing file {name}: {hint}")
        if actual[name] != sha:
            raise TamperedModelError(f"checksum mismatch for {name}: {hint}")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise TamperedModelError(f"unexpected file {extra[0]}: {hint}")


def _bad(message: str):
    """MLflow's INVALID_PARAMETER_VALUE: the scoring server answers it with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def check_params(p: dict[str, Any]) -> None:
    """Refuse values generation cannot honour, with the allowed range named."""
    if not 1 <= int(p["max_new_tokens"]) <= MAX_NEW_TOKENS:
        raise _bad(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {p['max_new_tokens']}")
    if not 0 <= int(p["min_new_tokens"]) <= int(p["max_new_tokens"]):
        raise _bad(f"min_new_tokens must be between 0 and max_new_tokens ({p['max_new_tokens']}), got {p['min_new_tokens']}")
    if p["do_sample"] and not float(p["temperature"]) > 0:
        raise _bad(f"temperature must be > 0 when do_sample is true, got {p['temperature']}")
    if p["do_sample"] and not 0 < float(p["top_p"]) <= 1:
        raise _bad(f"top_p must be in (0, 1] when do_sample is true, got {p['top_p']}")


def context_length(model, tokenizer) -> int | None:
    """The most tokens (prompt + answer) the model takes: its config's max_position_embeddings, else the tokenizer's."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**7 else None  # transformers uses a huge sentinel for "unknown"


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
        from mlflow.models import Model
        from olora.config import ModelConfig
        from olora.data.templates import PromptTemplate
        from olora.modeling.merge import merged
        from olora.modeling.models import load_base, load_tokenizer, resolve_model
        from olora.modeling.runtime import resolve_runtime

        artifacts_dir = Path(context.artifacts["base"]).parent  # pyfunc keeps every artifact under <model>/artifacts/
        recorded = (Model.load(str(artifacts_dir.parent)).metadata or {}).get(CHECKSUMS_KEY)
        if recorded:
            verify_artifacts(artifacts_dir, recorded)
        else:
            log.warning("this model was registered without %s; its files cannot be verified", CHECKSUMS_KEY)
        with open(context.artifacts["base"]) as handle:
            base = json.load(handle)
        with open(context.artifacts["template"]) as handle:
            self.template = PromptTemplate.from_dict(json.load(handle))
        name = base["path"] if base.get("path") and Path(base["path"]).is_dir() else base["name"]
        model_cfg = ModelConfig(name=name, revision=base["revision"])
        ref = resolve_model(model_cfg)
        runtime = resolve_runtime(model_cfg)
        self.tokenizer = load_tokenizer(ref)
        # Serving never trains: the adapter is merged into the base once (W + s*B*A, PEFT's merge_and_unload), so
        # each decoding step runs the base's layers only (bench/bench_serve.py measures merged vs unmerged).
        self.model = merged(load_base(ref, runtime), context.artifacts["adapter"])

    def _prompts(self, model_input: Any) -> list[str]:
        if hasattr(model_input, "columns"):  # pandas DataFrame; {"prompt": [...]} arrives as one row holding a list
            if "prompt" not in model_input.columns:
                raise _bad(f"the input needs a 'prompt' column; got {list(model_input.columns)}")
            out: list[str] = []
            for value in model_input["prompt"].tolist():
                if hasattr(value, "tolist"):  # a numpy array cell
                    value = value.tolist()
                out.extend(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])
            return out
        if isinstance(model_input, dict):
            value = model_input.get("prompt", model_input.get("prompts"))
            if value is None:
                raise _bad(f"the input needs a 'prompt' field; got {sorted(model_input)}")
            return [value] if isinstance(value, str) else [str(v) for v in value]
        if isinstance(model_input, str):
            return [model_input]
        return [str(v) for v in model_input]

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from olora.data.templates import render_prompt

        p = {name: default for name, (_, default) in PARAMS.items()} | (params or {})
        check_params(p)
        prompts = self._prompts(model_input)
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise _bad(f"a request must hold between 1 and {MAX_PROMPTS} prompts, got {len(prompts)}")
        texts = prompts if p["raw"] else [render_prompt(self.template, q, "", self.tokenizer) for q in prompts]
        limit = context_length(self.model, self.tokenizer)
        if limit is not None:
            room = limit - int(p["max_new_tokens"])
            for i, ids in enumerate(self.tokenizer(texts)["input_ids"]):
                if len(ids) > room:
                    raise _bad(f"prompt {i} is {len(ids)} tokens (in the template); the model's context is {limit} "
                               f"tokens, so with max_new_tokens={p['max_new_tokens']} a prompt may hold at most {room}")
        return generate(self.model, self.tokenizer, texts, int(p["max_new_tokens"]),
                        () if p["raw"] else self.template.stop, bool(p["do_sample"]), float(p["temperature"]),
                        float(p["top_p"]), int(p["min_new_tokens"]))
