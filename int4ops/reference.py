"""The reference W4A16 matmul in plain PyTorch: the oracle every kernel is tested against,
and the execution path wherever no kernel applies (CPU, no Triton).

It dequantizes to fp32 exactly as the format docstring states and multiplies in fp32, so it
is slow but obviously correct.
"""

from __future__ import annotations

import torch

from .format import Int4Weight, effective_group_size, unpack_int4


def dequantize(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the dense [N, K] weight ``(q - z) * s`` in ``dtype`` (computed in fp32)."""
    gs = effective_group_size(w.in_features, w.group_size)
    n, groups = w.out_features, w.scales.shape[0]
    q = unpack_int4(w.qweight).to(torch.float32).view(n, groups, gs)  # [N, G, gs]
    z = 8.0 if w.zeros is None else w.zeros.t().to(torch.float32).unsqueeze(-1)
    s = w.scales.t().to(torch.float32).unsqueeze(-1)
    return ((q - z) * s).view(n, groups * gs)[:, : w.in_features].to(dtype)


def w4a16_matmul_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``x @ dequantize(w).T`` for x of shape [..., K], accumulated in fp32, returned in x.dtype."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={w.in_features}")
    y = x.to(torch.float32) @ dequantize(w).t()
    return y.to(x.dtype)
