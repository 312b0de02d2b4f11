"""The tiny overlay, shared by tests and benchmarks: a seconds-long CPU configuration of the real pipeline.

`build_tiny_llama` makes a random 2-layer Llama with the embedded SmolLM2 tokenizer; `write_params`
turns the shipped params.yaml into the tiny configuration inside a project folder, with the model
copied under models/base/ (the tracked model input, as a user's local model would be).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


from olora.config import edit_params
from olora.layout import DVC_YAML, EVALS, LOCKFILE, MODEL_INPUTS, PARAMS

REPO = Path(__file__).resolve().parents[2]


def build_tiny_llama(path: Path, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """A random-initialised 2-layer Llama (hidden 64) with the embedded SmolLM2 tokenizer, saved as a model folder.

    With tied embeddings a random model's greedy text repeats the prompt's last token; untied, it varies.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from olora.modeling.assets import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("SmolLM2-135M-Instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_overrides(model_name: str) -> dict[str, Any]:
    return {
        "model.name": model_name,
        "data.max_examples": 96,
        "data.max_seq_length": 128,
        "data.validation_fraction": 0.1,
        "adapter.r": 4,
        "adapter.alpha": 8.0,
        "train.max_steps": 6,
        "train.micro_batch_size": 4,
        "train.warmup_steps": 1,
        "train.eval_steps": 3,
        "train.save_steps": 2,
        "train.max_eval_examples": 8,
        "train.learning_rate": 1e-3,
        "evaluate.limit": 2,
        "evaluate.batch_size": 8,
        "runtime.num_threads": 2,
    }


def install_model(folder: Path, model_dir: Path) -> str:
    """Copy a model folder under FOLDER/models/base/ (once) and return the model.name that points at it."""
    target = Path(folder) / MODEL_INPUTS / Path(model_dir).name
    if not target.exists():
        shutil.copytree(model_dir, target)
    return f"{MODEL_INPUTS}/{Path(model_dir).name}"


def write_params(folder: Path, model_dir: Path | str, extra: dict | None = None) -> Path:
    """params.yaml for `folder`: the shipped file with the tiny overlay (and `extra`) applied.

    A local `model_dir` is copied under FOLDER/models/base/; an `embedded:` name is used as is.
    """
    folder = Path(folder)
    name = str(model_dir) if str(model_dir).startswith("embedded:") else install_model(folder, Path(model_dir))
    path = folder / PARAMS
    edit_params(REPO / PARAMS, {**tiny_overrides(name), **(extra or {})}, path)  # the overlay itself must be valid
    return path


def copy_project(folder: Path) -> None:
    """The files a user's clone has that the pipeline needs: dvc.yaml, .dvcignore, the lock, the code, input folders
    (evals/ with its tasks)."""
    folder = Path(folder)
    for name in (DVC_YAML, ".dvcignore", LOCKFILE, ".gitignore"):
        shutil.copy(REPO / name, folder / name)
    shutil.copytree(REPO / "src" / "olora", folder / "src" / "olora", ignore=shutil.ignore_patterns("__pycache__"))
    for inputs in ("data/raw", MODEL_INPUTS):
        (folder / inputs).mkdir(parents=True, exist_ok=True)
        readme = REPO / inputs / "README.md"
        if readme.is_file():
            shutil.copy(readme, folder / inputs / "README.md")
    shutil.copytree(REPO / EVALS, folder / EVALS, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)  # the team's tasks


def team_checkout(folder: Path, remote: Path, model_dir: Path | str, extra: dict | None = None,
                  env: dict[str, str] | None = None) -> Path:
    """A deploying checkout as a team has one: the tiny-overlay project with prefect.yaml and flows/, committed
    with git and DVC initialised, its `main` pushed to the bare git repository `remote` (created here)."""
    import subprocess

    folder, remote = Path(folder), Path(remote)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    folder.mkdir(parents=True, exist_ok=True)
    copy_project(folder)
    write_params(folder, model_dir, extra)
    shutil.copy(REPO / "prefect.yaml", folder / "prefect.yaml")
    shutil.copytree(REPO / "flows", folder / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "team@example.com"],
                 ["git", "config", "user.name", "team"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "init"], ["git", "remote", "add", "origin", str(remote)],
                 ["git", "push", "-q", "origin", "main"]):
        subprocess.run(args, cwd=folder, check=True, env=env, capture_output=True)
    return folder
