"""GPU tier (opt-in: -m gpu): bf16 training on CUDA, the OLoRA init on CUDA weights, bitsandbytes bases.

These need a CUDA device; on a machine without one they are skipped (the tier is deselected by default).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from olora.modeling import peft_glue as adapters
from olora.stages import STAGES
from olora.layout import Layout
from olora.config import AdapterConfig

from overlay import write_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_bf16_training_of_the_pipeline_on_cuda(tmp_path, tiny_model_dir):
    write_params(tmp_path, tiny_model_dir, {"model.device": "auto", "model.dtype": "auto", "adapter.init": "olora",
                                             "tracking.enabled": False})
    layout = Layout(tmp_path)
    STAGES["prepare"].run(layout)
    init = STAGES["init"].run(layout)
    assert init["max_orthonormality_error"] < 1e-4
    metrics = STAGES["train"].run(layout)
    assert metrics["device"].startswith("cuda") and metrics["dtype"] in ("bfloat16", "float16")
    assert metrics["steps"] == 6 and math.isfinite(metrics["final_val_loss"]) and metrics["peak_memory_mb"] > 0
    assert (layout.exported / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_olora_init_on_cuda_matches_peft(dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    reference = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    theirs = get_peft_model(copy.deepcopy(reference), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                 init_lora_weights="olora")).eval()
    ours = adapters.initialise(copy.deepcopy(reference), AdapterConfig(r=8, alpha=16.0, target_modules=TARGETS)).eval()
    for layer in adapters.lora_layers(ours).values():  # computed where the weights live
        assert layer.lora_B["default"].weight.device.type == "cuda"
    x = torch.randint(0, 128, (2, 12), device="cuda")
    with torch.no_grad():
        expected = reference(input_ids=x).logits.float()
        got = ours(input_ids=x).logits.float()
        peft_out = theirs(input_ids=x).logits.float()
    # OLoRA ran (a LoRA init would also leave outputs unchanged): orthonormal B0 equal to PEFT's up to column signs
    assert max(adapters.orthonormality_errors(ours).values()) < 1e-4
    for name, layer in adapters.lora_layers(ours).items():
        b_ours = layer.lora_B["default"].weight.float()
        b_peft = dict(adapters.lora_layers(theirs))[name].lora_B["default"].weight.float()
        torch.testing.assert_close(b_ours.abs(), b_peft.abs(), atol=1e-2 if dtype != torch.float32 else 1e-4, rtol=0)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert float((got - expected).abs().max()) <= tol * max(1.0, float(expected.abs().max()))
    # at least as exact at step 0 as PEFT's own init
    assert float((got - expected).abs().max()) <= float((peft_out - expected).abs().max()) + tol


def test_bitsandbytes_4bit_base_uses_pefts_dequantise_init_requantise(tiny_model_dir: Path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load():
        return AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cuda"
        ).eval()

    theirs = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")).eval()
    ours = adapters.initialise(load(), AdapterConfig(r=4, alpha=8.0, target_modules=TARGETS)).eval()
    x = torch.randint(0, 1000, (2, 12), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, rtol=1e-3, atol=1e-3)
    errors = adapters.orthonormality_errors(ours)
    assert max(errors.values()) < 1e-2


def test_more_processes_than_gpus_is_refused_before_loading(tmp_path, tiny_model_dir):
    from olora.errors import ConfigError
    from olora.layout import Layout

    n = torch.cuda.device_count() + 1
    write_params(tmp_path, tiny_model_dir, {"train.processes": n, "tracking.enabled": False})
    layout = Layout(tmp_path)
    STAGES["prepare"].run(layout)
    STAGES["init"].run(layout)
    with pytest.raises(ConfigError, match=rf"train.processes={n} but only {n - 1} CUDA device"):
        STAGES["train"].run(layout)
