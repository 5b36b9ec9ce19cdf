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


# Rows of W dequantized at a time: a few fp32 temporaries of [rows, K_pad] stay near 64 MiB
# instead of several full-size copies of the layer.
CHUNK_ELEMS = 4 << 20


def _dequantized_row_chunks(w: Int4Weight):
    """Yield (n0, n1, W[n0:n1] in fp32) over the output rows."""
    rows = max(1, CHUNK_ELEMS // w.qweight.shape[0] // 8)
    for n0 in range(0, w.out_features, rows):
        n1 = min(n0 + rows, w.out_features)
        part = Int4Weight(
            w.qweight[:, n0:n1], w.scales[:, n0:n1], None if w.zeros is None else w.zeros[:, n0:n1],
            w.in_features, w.group_size,
        )
        yield n0, n1, dequantize(part)


def w4a16_matmul_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``x @ dequantize(w).T`` for x of shape [..., K], accumulated in fp32, returned in x.dtype."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={w.in_features}")
    xf = x.to(torch.float32)
    y = torch.empty((*x.shape[:-1], w.out_features), dtype=torch.float32, device=x.device)
    for n0, n1, wc in _dequantized_row_chunks(w):
        y[..., n0:n1] = xf @ wc.t()
    return y.to(x.dtype)


def w4a16_grad_input_reference(grad: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``grad [..., N] @ dequantize(w) -> [..., K]``: the gradient of the matmul w.r.t. x."""
    gf = grad.to(torch.float32)
    gx = torch.zeros((*grad.shape[:-1], w.in_features), dtype=torch.float32, device=grad.device)
    for n0, n1, wc in _dequantized_row_chunks(w):
        gx += gf[..., n0:n1] @ wc
    return gx.to(grad.dtype)
