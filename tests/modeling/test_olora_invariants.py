"""OLoRA invariants through the pipeline's PEFT glue: orthonormal B0, exact reconstruction, unchanged model, reload and export."""

from __future__ import annotations

import json

import pytest
import torch

from olora.layout import ADAPTER_WEIGHTS
from torch import nn

from olora.modeling import peft_glue as adapters
from olora.config import AdapterConfig

SHAPES = {"tall": (48, 16), "wide": (16, 48), "square": (32, 32)}  # (out, in)


class Toy(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tall = nn.Linear(16, 48)
        self.wide = nn.Linear(48, 16)
        self.square = nn.Linear(32, 32)

    def forward(self, x):  # x: (batch, 16)
        h = self.tall(x)  # 48
        h = self.wide(torch.tanh(h))  # 16
        h = torch.cat([h, h], dim=-1)  # 32
        return self.square(torch.tanh(h))


def _cfg(r: int, init: str = "olora") -> AdapterConfig:
    return AdapterConfig(init=init, r=r, alpha=2.0 * r + 3, target_modules=["tall", "wide", "square"])


def _peft_toy(cfg: AdapterConfig, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        Toy(seed),
        LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, init_lora_weights="olora"),
    )


@pytest.mark.parametrize("r", [1, 4, 16])
def test_orthonormal_b_and_exact_reconstruction(r):
    cfg = _cfg(r)
    original = {name: layer.weight.detach().clone() for name, layer in Toy().named_children()}
    model = _peft_toy(cfg)
    s = cfg.alpha / r
    for name, layer in adapters.lora_layers(model).items():
        short = name.rsplit(".", 1)[-1]
        b = layer.lora_B["default"].weight.detach().double()
        a = layer.lora_A["default"].weight.detach().double()
        w0 = original[short].double()
        assert b.shape == (w0.shape[0], r) and a.shape == (r, w0.shape[1])
        assert torch.allclose(b.T @ b, torch.eye(r, dtype=torch.float64), atol=1e-5), short
        residual = layer.get_base_layer().weight.detach().double()
        assert torch.allclose(residual + s * b @ a, w0, atol=1e-5), short
        # A0 is the top of R: B0 A0 is the projection of W onto span(B0)
        assert torch.allclose(b @ a, b @ (b.T @ w0), atol=1e-5), short
    errors = adapters.orthonormality_errors(model)
    assert max(errors.values()) < 1e-5


@pytest.mark.parametrize("r", [1, 8, 16])
def test_model_unchanged_at_init(r):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    expected = Toy()(x)
    model = _peft_toy(_cfg(r))
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("r", [2, 16])
def test_reload_for_training_matches_peft_init(tmp_path, r):
    """Our path (save A0,B0 -> untouched base + residual) equals PEFT's own olora init exactly."""
    cfg = _cfg(r)
    peft_model = adapters.initialise(Toy(), cfg)
    adapters.save_initial(peft_model, tmp_path / "init", "tiny")
    saved = json.loads((tmp_path / "init" / "adapter_config.json").read_text())
    # the same bytes in every clone and process: no absolute folder, no hash-seed-ordered set
    assert saved["base_model_name_or_path"] == "tiny" and saved["target_modules"] == sorted(saved["target_modules"])
    reloaded = adapters.load_for_training(Toy(), tmp_path / "init", "olora")
    ours, theirs = adapters.lora_layers(reloaded), adapters.lora_layers(peft_model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(ours[name], part)["default"].weight, getattr(theirs[name], part)["default"].weight)
        torch.testing.assert_close(
            ours[name].get_base_layer().weight, theirs[name].get_base_layer().weight, atol=1e-6, rtol=1e-6
        )
    trainable = [n for n, p in reloaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randn(3, 16)
    torch.testing.assert_close(reloaded(x), Toy()(x), atol=1e-5, rtol=1e-5)


def test_lora_init_leaves_base_untouched_and_b_zero(tmp_path):
    cfg = _cfg(4, init="lora")
    model = adapters.initialise(Toy(), cfg)
    for name, layer in adapters.lora_layers(model).items():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        short = name.rsplit(".", 1)[-1]
        torch.testing.assert_close(layer.get_base_layer().weight, getattr(Toy(), short).weight)


def test_export_round_trip_on_untouched_base(tmp_path, tiny_model_dir):
    """Train a few steps from OLoRA, export as plain LoRA, reload on a fresh untouched base: same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = AdapterConfig(r=4, alpha=8.0)
    init_dir, out_dir = tmp_path / "init", tmp_path / "exported"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(input_ids=x).logits
    adapters.save_initial(adapters.initialise(base, cfg), init_dir, "tiny")

    model = adapters.load_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir), init_dir, "olora")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base_logits, atol=1e-4, rtol=1e-4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
    assert (trained - base_logits).abs().max() > 1e-2  # training changed the model
    init_before = {p.name: p.read_bytes() for p in init_dir.iterdir()}
    adapters.export_plain_lora(model, out_dir, init_dir, "olora", "tiny")
    assert {p.name: p.read_bytes() for p in init_dir.iterdir()} == init_before  # the versioned init is untouched

    import json

    exported_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert exported_cfg["r"] == 2 * cfg.r and exported_cfg["lora_alpha"] == 2 * cfg.alpha
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, trained, atol=1e-4, rtol=1e-4)

    # the conversion from files alone (after sharded training) writes PEFT's export: same tensors, same config
    from safetensors.torch import load_file

    adapters.save_adapter(model, tmp_path / "trained", "tiny")
    adapters.convert_to_plain_lora(tmp_path / "trained", init_dir, tmp_path / "converted")
    ours, peft_export = load_file(str(tmp_path / "converted" / ADAPTER_WEIGHTS)), load_file(str(out_dir / ADAPTER_WEIGHTS))
    assert ours.keys() == peft_export.keys()
    for key, value in peft_export.items():
        assert torch.equal(ours[key], value), key
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text()) == exported_cfg
