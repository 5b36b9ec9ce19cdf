"""Round-to-nearest (RTN) quantization of a dense weight into the packed format.

Runs on the weight's own device (a GPU when the model is there) and works through the output
rows in chunks, packing each chunk as it goes, so quantizing a layer needs the layer itself
plus a workspace no larger than the layer (and at most ``chunk_bytes``, default 64 MiB),
rather than several fp32 copies of it.
"""

from __future__ import annotations

import torch

from .format import (
    SCALE_DTYPES,
    Int4FormatError,
    Int4Weight,
    check_group_size,
    effective_group_size,
    num_groups,
    pack_int4,
    padded_in_features,
)

DEFAULT_CHUNK_BYTES = 64 << 20


@torch.no_grad()  # codes have no gradient; a graph here would also keep the fp weight alive
def quantize_rtn(
    weight: torch.Tensor,
    group_size: int = 128,
    sym: bool = False,
    scale_dtype: torch.dtype | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Int4Weight:
    """Quantize ``weight`` [N, K] group-wise along K with round-to-nearest.

    Asymmetric (``sym=False``): per group, ``s = (max - min) / 15`` and ``z = round(-min / s)``,
    so the group's range maps onto 0..15 (the range always includes 0, so zero stays exact).
    Symmetric (``sym=True``): ``s = absmax / 7`` and ``z = 8``, codes ``clamp(round(w / s), -8, 7) + 8``.
    ``scale_dtype`` defaults to the weight's dtype (fp32 for other dtypes).
    """
    check_group_size(group_size)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise Int4FormatError(f"quantize_rtn expects a 2-D weight [out_features, in_features], got {shape}")
    if not weight.dtype.is_floating_point:
        raise Int4FormatError(f"quantize_rtn expects a floating-point weight, got {weight.dtype}")
    if weight.device.type == "meta":
        raise Int4FormatError("quantize_rtn got a weight on the meta device: it has no values to quantize")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
    if scale_dtype not in SCALE_DTYPES:
        raise Int4FormatError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise Int4FormatError(f"cannot quantize an empty weight of shape {(n, k)}")

    k_pad, g = padded_in_features(k, group_size), num_groups(k, group_size)
    gs = effective_group_size(k, group_size)
    dev = weight.device
    qweight = torch.empty((k_pad // 8, n), dtype=torch.int32, device=dev)
    scales = torch.empty((g, n), dtype=scale_dtype, device=dev)
    zeros = None if sym else torch.empty((g, n), dtype=torch.uint8, device=dev)

    # ~20 bytes of temporaries per weight element (fp32 copies, codes, words): size the chunk
    # so the workspace stays below both the layer's own bytes and chunk_bytes.
    budget = min(chunk_bytes, weight.numel() * weight.element_size())
    rows = max(1, budget // (20 * k_pad))
    for r0 in range(0, n, rows):
        w = weight[r0 : r0 + rows].to(torch.float32)
        if not torch.isfinite(w).all():  # checked per chunk: a whole-layer check costs a layer
            raise Int4FormatError(f"weight contains NaN or Inf (in rows {r0}..{r0 + len(w) - 1}); refusing to quantize it")
        # Pad the last group with NaN so it does not take part in min/max, then view as groups.
        if k_pad != k:
            w = torch.nn.functional.pad(w, (0, k_pad - k), value=float("nan"))
        w = w.view(w.shape[0], g, gs)
        if sym:
            s = _round_scales(w.abs().nan_to_num(0.0).amax(dim=-1) / 7.0, scale_dtype)
            z = torch.full_like(s, 8.0)
            q = torch.clamp(torch.round(w / s.unsqueeze(-1)), -8, 7) + 8
        else:
            lo = torch.clamp(w.nan_to_num(float("inf")).amin(dim=-1), max=0.0)
            hi = torch.clamp(w.nan_to_num(float("-inf")).amax(dim=-1), min=0.0)
            s = _round_scales((hi - lo) / 15.0, scale_dtype)
            z = torch.clamp(torch.round(-lo / s), 0, 15)
            q = torch.clamp(torch.round(w / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, 15)
        del w
        # Padded positions (NaN) take the zero point so they dequantize to exactly 0.
        q = torch.where(torch.isnan(q), z.unsqueeze(-1), q)
        qweight[:, r0 : r0 + rows] = pack_int4(q.view(q.shape[0], k_pad).to(torch.uint8))
        scales[:, r0 : r0 + rows] = s.t().to(scale_dtype)
        if zeros is not None:
            zeros[:, r0 : r0 + rows] = z.t().to(torch.uint8)
        del q, s, z

    return Int4Weight(
        qweight=qweight,
        scales=scales,
        zeros=zeros,
        in_features=k,
        group_size=group_size,
    )


def _round_scales(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype *before* computing codes, so codes are optimal
    for the scale the kernels will actually use; an all-zero group gets scale 1 (codes = z)."""
    s = s.to(scale_dtype).to(torch.float32)
    return torch.where(s > 0, s, torch.ones_like(s))
