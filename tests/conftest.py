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

from olora.overlay import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with an untied head: its greedy answers vary, so serving comparisons mean something."""
    return build_tiny_llama(tmp_path_factory.mktemp("models-untied") / "tiny-llama-untied", tie_word_embeddings=False)


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
