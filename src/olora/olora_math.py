"""Exact OLoRA initialisation in O(m·n·r) instead of a full QR of every weight.

OLoRA needs only B0 = Q[:, :r] and A0 = R[:r, :] of W = QR (W is out × in). In Householder QR (what
LAPACK, cuSOLVER and torch use) the first r reflectors depend only on the first r columns of W, so
Q[:, :r] is the thin Q of W[:, :r] (an m × r problem, O(m·r²)), and R[:r, :] = Q[:, :r]ᵀ·W (one
product, 2·m·n·r flops). The residual base W − s·B0·A0 is one more rank-r product. Total about
4·m·n·r flops, against O(m·n·min(m, n)) for the full QR that PEFT's `init_lora_weights="olora"` runs.

Computed in float32 on the device the weight lives on, layer by layer (peak extra memory: one
layer's float32 copy), and written back in the layer's dtype, as PEFT does.
"""

from __future__ import annotations

import torch

from olora.errors import ConfigError


def olora_factors(weight: torch.Tensor, r: int, fan_in_fan_out: bool = False, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (A0, B0, W) in float32 for a weight stored as (out, in), or (in, out) when fan_in_fan_out.

    B0 (out × r) has orthonormal columns; A0 (r × in) = B0ᵀ·W; W is the float32 (out × in) weight.
    """
    w = weight.detach().to(torch.float32)
    if fan_in_fan_out:  # GPT-2 Conv1D stores (in, out): OLoRA is defined on the (out, in) map
        w = w.T
    m, n = w.shape
    if r > min(m, n):
        raise ConfigError(f"adapter.r={r} exceeds min(out, in)={min(m, n)} of {name} {tuple(w.shape)}; choose r <= {min(m, n)}")
    q, r_top = torch.linalg.qr(w[:, :r])  # reduced QR: q is m × r
    diag = r_top.diagonal().abs()
    tol = torch.finfo(torch.float32).eps * max(m, n) * float(w[:, :r].abs().max().clamp_min(1e-30))
    if bool((diag <= tol).any()):
        k = int((diag <= tol).nonzero()[0])
        raise ConfigError(
            f"{name}: the first {r} columns of the weight are rank-deficient (column {k} depends on the ones "
            f"before it), so the OLoRA basis is not unique; lower adapter.r or use adapter.init=lora"
        )
    a0 = q.T @ w
    return a0, q, w


def olora_init_(model, adapter: str = "default") -> None:
    """Overwrite a PEFT LoRA model's adapters with the OLoRA init and make each base the residual.

    bitsandbytes-quantised layers use PEFT's own routine (dequantise, decompose, requantise).
    `olora.adapters.orthonormality_errors` checks the result.
    """
    from olora.adapters import lora_layers

    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if adapter not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            for module in (layer.lora_A[adapter], layer.lora_B[adapter]):
                if module.weight.is_meta:  # built with low_cpu_mem_usage: allocate, the init fills it
                    module.to_empty(device=base.weight.device)
            if type(base.weight).__module__.startswith("bitsandbytes"):
                layer.olora_init(adapter)
                continue
            r, s = layer.r[adapter], layer.scaling[adapter]
            fan = bool(getattr(layer, "fan_in_fan_out", False))
            a0, b0, w = olora_factors(base.weight, r, fan, name)
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            lora_a.data = a0.to(lora_a.dtype).contiguous()
            lora_b.data = b0.to(lora_b.dtype).contiguous()
            # W - s*B0*A0 in place: for a float32 weight `w` is a view of it (no m×n temporaries,
            # which cost more than the flops here); otherwise `w` is this layer's float32 copy
            w.addmm_(b0, a0, alpha=-s)
            if w.data_ptr() != base.weight.data_ptr():
                base.weight.data.copy_(w.T if fan else w)
            del a0, b0, w
