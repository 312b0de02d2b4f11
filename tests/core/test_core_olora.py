"""The pure OLoRA mathematics (`olora.core.olora`): factor invariants and argument errors, no PEFT involved."""

from __future__ import annotations

import pytest
import torch

from olora.core.olora import olora_factors


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("r", [1, 5, 32])
def test_factors_are_the_leading_qr_factors(shape, r):
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64).float()
    a0, b0, w = olora_factors(weight, r)
    assert a0.shape == (r, shape[1]) and b0.shape == (shape[0], r) and w.shape == shape
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(b0.double().T @ b0.double(), eye, atol=1e-5)  # orthonormal columns
    assert torch.allclose(a0.double(), b0.double().T @ weight.double(), atol=1e-4)  # A0 = B0ᵀ W
    q, rr = torch.linalg.qr(weight.double(), mode="complete" if shape[0] <= shape[1] else "reduced")
    assert torch.allclose(b0.double(), q[:, :r], atol=1e-4)  # B0 = Q[:, :r] of the full QR
    assert torch.allclose(a0.double(), rr[:r, :], atol=1e-4)  # A0 = R[:r, :]
    # the residual plus s·B0·A0 gives W back, for any scale
    s = 2.0
    residual = w.double() - s * b0.double() @ a0.double()
    assert torch.allclose(residual + s * b0.double() @ a0.double(), weight.double(), atol=1e-5)


def test_fan_in_fan_out_weights_use_the_out_by_in_map():
    torch.manual_seed(1)
    stored = torch.randn(24, 16)  # (in, out) as GPT-2's Conv1D stores it
    a0, b0, w = olora_factors(stored, 4, fan_in_fan_out=True)
    assert b0.shape == (16, 4) and a0.shape == (4, 24) and torch.equal(w, stored.T)


def test_bad_ranks_raise_value_error_naming_the_layer():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"rank r=5 exceeds min\(out, in\)=4 of q_proj"):
        olora_factors(w, 5, name="q_proj")
    w[:, 1] = 2 * w[:, 0]
    with pytest.raises(ValueError, match=r"rank-deficient \(column 1"):
        olora_factors(w, 2)


def test_the_math_module_imports_no_peft_and_no_config():
    import ast
    from pathlib import Path

    import olora.core.olora as module

    imported = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {"__future__", "torch"}, imported


def test_pipeline_init_turns_a_bad_rank_into_a_config_error():
    from torch import nn

    from olora.config import AdapterConfig
    from olora.errors import ConfigError
    from olora.modeling.peft_glue import initialise

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 8, bias=False)

    toy = Toy()
    with torch.no_grad():
        toy.q_proj.weight[:, 1] = 2 * toy.q_proj.weight[:, 0]
    with pytest.raises(ConfigError, match=r"adapter.r=2, adapter.init=olora: .*rank-deficient"):
        initialise(toy, AdapterConfig(r=2, target_modules=["q_proj"]))
