"""Shared fixtures: hermetic environment, thread limits, and tiny real models built in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Hermetic and quiet before anything imports the libraries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OLORA_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OLORA_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A random-initialised 2-layer Llama with the embedded SmolLM2 tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from olora.assets import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("SmolLM2-135M-Instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, seconds: float = 90.0) -> None:
    """Poll `url` until it answers (a server the test started), or fail the test."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds:.0f} s")
