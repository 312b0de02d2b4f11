"""Locating and loading base models and tokenizers: embedded, local folders and hub ids.

Loading is safe by default: weights are read from safetensors files only (pickle-based `.bin`/`.pt`
checkpoints can run arbitrary code when loaded), and code shipped with a model (`trust_remote_code`)
runs only when `model.trust_remote_code: true` is set in params.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from olora.modeling import assets
from olora.config import ModelConfig
from olora.errors import ConfigError, OloraError
from olora.layout import MODEL_INPUTS
from olora.modeling.runtime import Runtime


@dataclass(frozen=True)
class ModelRef:
    """Where a base model's files are, and the name/revision that identify it in records."""

    name: str
    revision: str
    path: str  # a local folder, or the hub id itself
    local: bool
    trust_remote_code: bool = False  # model.trust_remote_code; passed to every transformers loader here
    gguf_file: str | None = None  # an embedded model not converted yet (pre-flight only): its config is read from this file


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _convert_hint(folder: Path) -> str:
    return (
        f"convert it once, with code and files you trust: load it with "
        f"AutoModelForCausalLM.from_pretrained('{folder}', use_safetensors=False), call "
        f"save_pretrained(NEW_FOLDER) (it writes model.safetensors), save the tokenizer there too "
        f"(AutoTokenizer.from_pretrained('{folder}').save_pretrained(NEW_FOLDER)) and set model.name to NEW_FOLDER"
    )


def check_safetensors(folder: Path, name: str | None = None) -> None:
    """Refuse a local model folder whose weights are not in safetensors files (pickle can run code on load)."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
    label = f"model.name={name!r} ({folder})" if name else str(folder)
    if pickles:
        raise ConfigError(
            f"{label} holds only pickle-based weights ({', '.join(pickles[:5])}), which this pipeline does not "
            f"load because unpickling can run arbitrary code; {_convert_hint(folder)}"
        )
    raise ConfigError(f"{label} has no *.safetensors weight file; point model.name at a transformers folder with model.safetensors")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(model: ModelConfig, root: Path | None = None, convert: bool = True) -> ModelRef:
    """Find the base model's files; embedded models are converted into the cache on first use
    (`convert=False`, for pre-flight checks that read no weights: not converted, their config read from the GGUF file).

    With `root` (a pipeline stage), a local folder is read relative to the project and must lie
    under `models/base/`, the folder every model stage depends on in dvc.yaml: a base model that
    DVC does not see would let `dvc status` report "up to date" after the model changed.
    """
    name = model.name
    if name.startswith(assets.EMBEDDED_PREFIX):
        short = name[len(assets.EMBEDDED_PREFIX):]
        path = assets.embedded_model_dir(short, convert=convert)
        gguf = path.name if path.is_file() else None
        return ModelRef(
            name=name, revision=assets.embedded_revision(short), path=str(path.parent if gguf else path), local=True,
            trust_remote_code=model.trust_remote_code, gguf_file=gguf,
        )
    as_path = Path(name).expanduser()
    if root is not None and not as_path.is_absolute():
        as_path = Path(root) / as_path
    if as_path.is_dir():
        if not (as_path / "config.json").is_file():
            raise ConfigError(f"model.name={name!r} is a folder without config.json; point it at a transformers model folder")
        if root is not None:
            inputs = (Path(root) / MODEL_INPUTS).resolve()
            if not as_path.resolve().is_relative_to(inputs):
                raise ConfigError(
                    f"model.name={name!r} is a local folder outside {MODEL_INPUTS}/, the folder DVC tracks as the "
                    f"model stages' input; copy it to {MODEL_INPUTS}/{as_path.name} and set "
                    f"model.name={MODEL_INPUTS}/{as_path.name}, so that a change to the model reruns the pipeline"
                )
        check_safetensors(as_path, name)
        return ModelRef(
            name=name, revision="local", path=str(as_path.resolve()), local=True,
            trust_remote_code=model.trust_remote_code,
        )
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(
            f"model.name={name!r} looks like a local path but no such folder exists; "
            "use an existing folder, a hub id such as TinyLlama/TinyLlama-1.1B-Chat-v1.0, "
            "or the default embedded:SmolLM2-135M-Instruct"
        )
    if hub_offline():
        raise ConfigError(
            f"model.name={name!r} is a hub id but HF_HUB_OFFLINE is set; use a local folder or the "
            "embedded default embedded:SmolLM2-135M-Instruct"
        )
    return ModelRef(name=name, revision=model.revision, path=name, local=False, trust_remote_code=model.trust_remote_code)


def _hub_error(ref: ModelRef, exc: Exception) -> OloraError:
    if "cannot be loaded with `safetensors`" in str(exc) or "no file named model.safetensors" in str(exc):
        return ConfigError(
            f"{ref.name!r} (revision {ref.revision!r}) has no safetensors weights; this pipeline does not load "
            "pickle-based weights (.bin), because unpickling can run arbitrary code. Use a revision that has "
            "model.safetensors, or download it and convert it into a local folder under models/base/ "
            "(from_pretrained(..., use_safetensors=False) then save_pretrained, with code you trust)."
        )
    if ref.local:
        return ConfigError(
            f"could not load the local model folder {ref.path} (model.name={ref.name!r}): {exc}. It needs "
            "config.json, the tokenizer files and model.safetensors, as save_pretrained writes them."
        )
    return OloraError(
        f"could not load {ref.name!r} (revision {ref.revision!r}) from the Hugging Face hub: {exc}. "
        "If this machine is offline, use a local model folder or the embedded default "
        "embedded:SmolLM2-135M-Instruct (model.name)."
    )


def load_model_config(ref: ModelRef):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            ref.path, revision=None if ref.local else ref.revision, trust_remote_code=ref.trust_remote_code,
            **({"gguf_file": ref.gguf_file} if ref.gguf_file else {}),
        )
    except OSError as exc:
        raise _hub_error(ref, exc) from exc
    except (ValueError, KeyError) as exc:  # a model_type this transformers version does not know
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.name={ref.name!r}: its config.json has a model type this transformers version does not know "
            f"({first}); use a decoder-only model that transformers supports"
        ) from exc


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref.path, revision=None if ref.local else ref.revision, trust_remote_code=ref.trust_remote_code
        )
    except OSError as exc:
        raise _hub_error(ref, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(ref: ModelRef, runtime: Runtime):
    """Load the untouched base model on the resolved device and dtype, in eval mode (safetensors only)."""
    from transformers import AutoModelForCausalLM

    if ref.local:
        check_safetensors(Path(ref.path), ref.name)
    quantised = runtime.quantization == "4bit"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref.path,
            revision=None if ref.local else ref.revision,
            dtype=runtime.dtype,
            use_safetensors=True,
            trust_remote_code=ref.trust_remote_code,
            **(dict(quantization_config=quantisation_config(runtime), device_map={"": runtime.device}) if quantised else {}),
        )
    except OSError as exc:
        raise _hub_error(ref, exc) from exc
    return (model if quantised else model.to(runtime.device)).eval()


def quantisation_config(runtime: Runtime):
    """QLoRA's 4-bit base (Dettmers et al. 2023): NF4 with double quantisation, computing in the run's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=runtime.dtype)


def linear_layers(ref: ModelRef) -> dict[str, tuple[int, int]]:
    """Qualified name -> (out_features, in_features) of every linear layer, built on the meta device.

    Cheap (no weights are read), so parameter errors that depend on layer shapes surface before
    any expensive work.
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = load_model_config(ref)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)
    except ValueError as exc:
        raise ConfigError(
            f"model.name={ref.name!r}: model_type {config.model_type!r} is not a causal language model; "
            "use a decoder-only model (e.g. Llama, Mistral, Gemma, SmolLM2)"
        ) from exc
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
            out[name] = (module.nf, module.weight.shape[0])
    return out


def check_targets(layers: dict[str, tuple[int, int]], target_modules: list[str], r: int) -> dict[str, tuple[int, int]]:
    """Select the layers that `target_modules` names (by suffix, as PEFT does) and check r fits them."""
    chosen = {
        name: shape
        for name, shape in layers.items()
        if any(name == t or name.endswith("." + t) for t in target_modules)
    }
    if not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ConfigError(
            f"adapter.target_modules={target_modules!r} match no linear layer of the model; "
            f"its linear layers are named: {', '.join(suffixes)}"
        )
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in chosen)]
    if missing:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
        raise ConfigError(
            f"adapter.target_modules entries {missing!r} match no linear layer; existing names: {', '.join(suffixes)}"
        )
    smallest = min(min(shape) for shape in chosen.values())
    if r > smallest:
        worst = min(chosen, key=lambda n: min(chosen[n]))
        raise ConfigError(
            f"adapter.r={r} is larger than the smaller dimension of target layer {worst} "
            f"{chosen[worst]}; choose r <= {smallest}"
        )
    return chosen
