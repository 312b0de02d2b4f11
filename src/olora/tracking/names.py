"""Names derived from the config: the MLflow run name and the registered model name (no torch, no MLflow)."""

from __future__ import annotations

from olora.config import Config


def short_name(name: str) -> str:
    """`embedded:SmolLM2-135M-Instruct`, `org/Model` or `/path/to/Model` -> the model's own name."""
    return name.split(":")[-1].rstrip("/").split("/")[-1]


def run_name(cfg: Config) -> str:
    return f"{cfg.adapter.init}-r{cfg.adapter.r}-{short_name(cfg.model.name)}"


def model_name(cfg: Config) -> str:
    """The registered model: `register.model_name`, else `olora-<base model>`."""
    return cfg.register.model_name or f"olora-{short_name(cfg.model.name)}"
