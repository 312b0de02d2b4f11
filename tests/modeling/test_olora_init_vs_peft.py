"""Our O(m·n·r) OLoRA init equals PEFT's full-QR `init_lora_weights="olora"`, layer by layer and model-wide."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from olora.modeling import peft_glue as adapters
from olora.config import AdapterConfig
from olora.core.olora import olora_factors
from olora.modeling.peft_glue import olora_init_


def _peft(model, r, targets, init, fan_in_fan_out=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, init_lora_weights=init, fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(model, cfg)


class One(nn.Module):
    def __init__(self, out_f, in_f, dtype):
        super().__init__()
        self.lin = nn.Linear(in_f, out_f, bias=False, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def _close(ours, theirs, rtol, what):
    ours, theirs = ours.double(), theirs.double()
    scale = theirs.abs().max().clamp_min(1e-12)
    assert float((ours - theirs).abs().max() / scale) <= rtol, what


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_equals_peft_for_every_rank(shape, dtype):
    out_f, in_f = shape
    torch.manual_seed(0)
    reference = One(out_f, in_f, dtype)
    w = reference.lin.weight.float()
    # PEFT rounds its adapters to a bf16/fp16 base's dtype (they are cast there and back); ours stay
    # float32. Compare at PEFT's precision: one unit of that dtype's rounding.
    ulp = 1e-6 if dtype == torch.float32 else 2 * float(torch.finfo(dtype).eps)
    for r in sorted({1, 2, 7, min(shape) // 2, min(shape)}):
        theirs = _peft(copy.deepcopy(reference), r, ["lin"], "olora")
        ours = _peft(copy.deepcopy(reference), r, ["lin"], True)
        olora_init_(ours)
        lt, lo = theirs.base_model.model.lin, ours.base_model.model.lin
        b_ours, a_ours = lo.lora_B["default"].weight.detach(), lo.lora_A["default"].weight.detach()
        _close(b_ours.to(dtype), lt.lora_B["default"].weight, ulp, f"B r={r}")
        _close(a_ours.to(dtype), lt.lora_A["default"].weight, max(ulp, 1e-5), f"A r={r}")
        assert lo.base_layer.weight.dtype == dtype
        _close(lo.base_layer.weight, lt.base_layer.weight, max(ulp, 1e-5), f"base r={r}")
        # and ours is at least as exact at step 0: W' + s*B0*A0 reproduces W
        s = lo.scaling["default"]
        err_ours = (lo.base_layer.weight.float() + s * b_ours @ a_ours - w).abs().max()
        err_peft = (lt.base_layer.weight.float() + s * lt.lora_B["default"].weight @ lt.lora_A["default"].weight - w).abs().max()
        assert err_ours <= err_peft * 1.01 + 1e-5 * w.abs().max(), f"r={r}: ours {err_ours} vs peft {err_peft}"


def test_gpt2_conv1d_uses_the_out_by_in_map():
    """Conv1D stores (in, out). OLoRA is defined on the (out, in) map; the model stays unchanged at init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)).eval()
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    peft_model = _peft(model, 4, ["c_attn", "c_fc"], True, fan_in_fan_out=True)
    olora_init_(peft_model)
    for layer in (peft_model.base_model.model.transformer.h[0].attn.c_attn,):
        b = layer.lora_B["default"].weight
        assert b.shape == (96, 4)  # out × r of the (out=96, in=32) map
        torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=64))


@pytest.mark.parametrize(
    "build, targets",
    [
        (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (_neox, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        (_opt, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ],
    ids=["llama", "gpt-neox", "opt"],
)
def test_whole_models_match_peft(build, targets):
    torch.manual_seed(0)
    reference = build().eval()
    x = torch.randint(0, 128, (2, 12))
    theirs = _peft(copy.deepcopy(reference), 8, targets, "olora").eval()
    # the pipeline's path: adapters built on the meta device, materialised and filled by olora_init_
    ours = adapters.initialise(copy.deepcopy(reference), AdapterConfig(r=8, alpha=17.0, target_modules=targets)).eval()
    assert not any(p.is_meta for p in ours.parameters())
    with torch.no_grad():
        expected = reference(input_ids=x).logits
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)
    ours_state = {k: v for k, v in ours.state_dict().items()}
    for key, value in theirs.state_dict().items():
        _close(ours_state[key], value, 1e-5, key)
