"""Model references and shape-dependent parameter checks, before any weights are loaded."""

from __future__ import annotations

import pytest
import torch

from olora.config import ModelConfig
from olora.errors import ConfigError
from olora.modeling.models import check_targets, linear_layers, resolve_model
from olora.modeling.runtime import resolve_runtime


def test_local_folder_and_meta_layer_listing(tiny_model_dir):
    ref = resolve_model(ModelConfig(name=str(tiny_model_dir)))
    assert ref.local and ref.revision == "local"
    layers = linear_layers(ref)
    assert layers["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert layers["model.layers.1.mlp.down_proj"] == (64, 128)
    assert layers["model.layers.0.self_attn.k_proj"] == (32, 64)
    chosen = check_targets(layers, ["q_proj", "k_proj"], r=32)
    assert len(chosen) == 4


def test_target_and_rank_errors_list_what_exists(tiny_model_dir):
    layers = linear_layers(resolve_model(ModelConfig(name=str(tiny_model_dir))))
    with pytest.raises(ConfigError, match=r"match no linear layer.*named: .*down_proj, gate_proj, .*q_proj"):
        check_targets(layers, ["query_key_value"], r=4)
    with pytest.raises(ConfigError, match=r"entries \['qkv'\] match no linear layer"):
        check_targets(layers, ["q_proj", "qkv"], r=4)
    with pytest.raises(ConfigError, match=r"adapter.r=33 is larger than the smaller dimension of target layer .*k_proj \(32, 64\); choose r <= 32"):
        check_targets(layers, ["q_proj", "k_proj"], r=33)


def test_bad_model_names(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such folder exists"):
        resolve_model(ModelConfig(name=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_model(ModelConfig(name=str(tmp_path / "empty")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set; use a local folder or the embedded default"):
        resolve_model(ModelConfig(name="TinyLlama/TinyLlama-1.1B-Chat-v1.0"))
    with pytest.raises(Exception, match="unknown embedded model 'Nope'; available: embedded:SmolLM2-135M-Instruct"):
        resolve_model(ModelConfig(name="embedded:Nope"))


def test_runtime_resolution_on_cpu():
    runtime = resolve_runtime(ModelConfig(device="cpu"))
    assert runtime.device.type == "cpu" and runtime.dtype == torch.float32
    assert resolve_runtime(ModelConfig(device="cpu", dtype="bfloat16")).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_runtime(ModelConfig()).device.type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            resolve_runtime(ModelConfig(device="cuda"))
