"""OLoRA's mathematics: the exact factors B0 = Q[:, :r], A0 = R[:r, :] of W = QR in O(m·n·r).

Pure tensor code: no PEFT, no configuration; bad arguments raise ValueError.

OLoRA needs only B0 = Q[:, :r] and A0 = R[:r, :] of W = QR (W is out × in). In Householder QR (what
LAPACK, cuSOLVER and torch use) the first r reflectors depend only on the first r columns of W, so
Q[:, :r] is the thin Q of W[:, :r] (an m × r problem, O(m·r²)), and R[:r, :] = Q[:, :r]ᵀ·W (one
product, 2·m·n·r flops). The residual base W − s·B0·A0 is one more rank-r product. Total about
4·m·n·r flops, against O(m·n·min(m, n)) for the full QR that PEFT's `init_lora_weights="olora"` runs.

Computed in float32 on the device the weight lives on (peak extra memory: one float32 copy of the
weight; none when it is already float32). `olora.modeling.peft_glue.olora_init_` applies it to PEFT layers.
"""

from __future__ import annotations

import torch


def olora_factors(weight: torch.Tensor, r: int, fan_in_fan_out: bool = False, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (A0, B0, W) in float32 for a weight stored as (out, in), or (in, out) when fan_in_fan_out.

    B0 (out × r) has orthonormal columns; A0 (r × in) = B0ᵀ·W; W is the float32 (out × in) weight.
    """
    w = weight.detach().to(torch.float32)
    if fan_in_fan_out:  # GPT-2 Conv1D stores (in, out): OLoRA is defined on the (out, in) map
        w = w.T
    m, n = w.shape
    if r > min(m, n):
        raise ValueError(f"rank r={r} exceeds min(out, in)={min(m, n)} of {name} {tuple(w.shape)}; choose r <= {min(m, n)}")
    q, r_top = torch.linalg.qr(w[:, :r])  # reduced QR: q is m × r
    diag = r_top.diagonal().abs()
    tol = torch.finfo(torch.float32).eps * max(m, n) * float(w[:, :r].abs().max().clamp_min(1e-30))
    if bool((diag <= tol).any()):
        k = int((diag <= tol).nonzero()[0])
        raise ValueError(
            f"{name}: the first {r} columns of the weight are rank-deficient (column {k} depends on the ones "
            f"before it), so the OLoRA basis is not unique; use a lower rank or the plain LoRA init"
        )
    a0 = q.T @ w
    return a0, q, w

