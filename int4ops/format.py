"""The int4ops packed INT4 weight format. This module is the one source of truth for it.

A linear layer computes ``y = x @ W.T`` with ``W`` of shape ``[N, K]`` (out_features,
in_features). We quantize ``W`` group-wise along K: each run of ``group_size``
consecutive input features of one output row shares a scale ``s`` and a zero point ``z``::

    W[n, k] ~= (q[n, k] - z[g, n]) * s[g, n]        g = k // group_size

    q in 0..15 (unsigned 4-bit code)
    z in 0..15 (asymmetric, stored) or 8 (symmetric, implied, no tensor)

Shapes (G groups, K padded up to a whole number of groups)::

    group_size in {32, 64, 128, 256}:  G = ceil(K / group_size)    K_pad = G * group_size
    group_size == -1 (per channel):    G = 1                       K_pad = ceil(K / 8) * 8

    qweight  int32          [K_pad // 8, N]   8 codes along K per word
    scales   fp16/bf16/fp32 [G, N]
    zeros    uint8          [G, N]            asymmetric only (None when symmetric)

One int32 word holds 8 consecutive K positions of one output column, lowest nibble
first (this is the GPTQ ``qweight`` layout, so GPTQ checkpoints map onto it directly)::

    qweight[i, n]  bit:  31  28 27  24 23  20 19  16 15  12 11   8 7    4 3    0
                        +------+------+------+------+------+------+------+------+
    holds q[n,k] for k: | 8i+7 | 8i+6 | 8i+5 | 8i+4 | 8i+3 | 8i+2 | 8i+1 | 8i+0 |
                        +------+------+------+------+------+------+------+------+

    code j of word i:  q[n, 8*i + j] = (qweight[i, n] >> (4 * j)) & 0xF

Why this layout: a row ``qweight[i, :]`` is contiguous over N, so a kernel that owns a
block of output columns reads 16-byte vectors of 4 words = 32 codes with fully coalesced
loads, and the 8 codes of a word share one group (8 divides every group size).

Padding: the codes of K positions ``K <= k < K_pad`` are set to the zero point, so they
dequantize to exactly 0; kernels still mask ``x`` beyond K (the activation has only K
columns). A layer whose K no group size divides (e.g. K = 172) is therefore stored and
run like any other; nothing is refused or skipped.

This is the stored, portable format: what ``save_quantized`` writes and every backend
accepts. A backend that wants another runtime layout repacks from it at load time and
keeps this one as the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORMAT_VERSION = 1


class Int4FormatError(ValueError):
    """A packed INT4 weight (or a request to build one) violates the format above."""


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise Int4FormatError(
            f"group_size must be one of {GROUP_SIZES} (-1 = one group per output channel), got {group_size!r}"
        )
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    check_group_size(group_size)
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def padded_in_features(in_features: int, group_size: int) -> int:
    """K_pad: K rounded up to whole groups (to a multiple of 8 for per-channel)."""
    if group_size == -1:
        return math.ceil(in_features / 8) * 8
    return num_groups(in_features, group_size) * group_size


def effective_group_size(in_features: int, group_size: int) -> int:
    """The K-extent of one group as kernels index it: ``g = k // effective_group_size``."""
    return padded_in_features(in_features, group_size) if group_size == -1 else group_size


def packed_nbytes(out_features: int, in_features: int, group_size: int, sym: bool, scale_bytes: int = 2) -> int:
    """Bytes of one weight in this format: qweight + scales + zeros, K padding included."""
    g, k_pad = num_groups(in_features, group_size), padded_in_features(in_features, group_size)
    return (k_pad // 8) * out_features * 4 + g * out_features * scale_bytes + (0 if sym else g * out_features)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack codes ``q`` (integer [N, K_pad], values 0..15, K_pad % 8 == 0) into int32 [K_pad // 8, N]."""
    if q.dim() != 2:
        raise Int4FormatError(f"pack_int4 expects a 2-D [N, K_pad] code tensor, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise Int4FormatError(f"pack_int4 expects integer codes, got {q.dtype}")
    n, k_pad = q.shape
    if k_pad % 8:
        raise Int4FormatError(f"pack_int4 needs K_pad divisible by 8, got {k_pad}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise Int4FormatError("pack_int4 codes must lie in 0..15")
    # Build each word in int32 without overflow: codes 0..6 contribute q * 16**j < 2**28; the top
    # code is taken as signed 4-bit (q - 16 when q >= 8) so q7 * 2**28 stays in int32 range and
    # the sum is exactly the two's-complement word whose bits are the 8 codes.
    q = q.reshape(n, k_pad // 8, 8)
    words = q[:, :, 7].to(torch.int32)
    words = torch.where(words >= 8, words - 16, words) * (1 << 28)
    for j in range(7):
        words += q[:, :, j].to(torch.int32) * (1 << (4 * j))
    return words.t().contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 [K_pad // 8, N] -> uint8 codes [N, K_pad]."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise Int4FormatError(
            f"qweight must be a 2-D int32 tensor [K_pad // 8, N], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    shifts = (torch.arange(8, device=qweight.device, dtype=torch.int32) * 4).view(1, 8, 1)
    codes = (qweight.unsqueeze(1) >> shifts) & 0xF  # [K_pad/8, 8, N]
    return codes.reshape(-1, qweight.shape[1]).t().to(torch.uint8).contiguous()


@dataclass
class Int4Weight:
    """One quantized weight matrix in the stored format (see the module docstring)."""

    qweight: torch.Tensor  # int32 [K_pad // 8, N]
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor | None  # uint8 [G, N] or None (symmetric)
    in_features: int  # K
    group_size: int  # 32, 64, 128, 256 or -1

    def __post_init__(self):
        validate(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def sym(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def validate(qweight, scales, zeros, in_features: int, group_size: int) -> None:
    """Raise Int4FormatError naming the first thing that does not match the format."""
    check_group_size(group_size)
    if not isinstance(in_features, int) or in_features <= 0:
        raise Int4FormatError(f"in_features must be a positive int, got {in_features!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        got = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight)
        raise Int4FormatError(f"qweight must be a 2-D int32 tensor [K_pad // 8, N], got {got}")
    k_pad, g = padded_in_features(in_features, group_size), num_groups(in_features, group_size)
    n = qweight.shape[1]
    if qweight.shape[0] != k_pad // 8:
        raise Int4FormatError(
            f"qweight has {qweight.shape[0]} rows, expected K_pad // 8 = {k_pad // 8} "
            f"for in_features={in_features}, group_size={group_size}"
        )
    if not isinstance(scales, torch.Tensor) or scales.dtype not in SCALE_DTYPES:
        raise Int4FormatError(f"scales must be fp16, bf16 or fp32, got {getattr(scales, 'dtype', type(scales))}")
    if tuple(scales.shape) != (g, n):
        raise Int4FormatError(f"scales must have shape [G, N] = {(g, n)}, got {tuple(scales.shape)}")
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8:
            raise Int4FormatError(f"zeros must be uint8, got {getattr(zeros, 'dtype', type(zeros))}")
        if tuple(zeros.shape) != (g, n):
            raise Int4FormatError(f"zeros must have shape [G, N] = {(g, n)}, got {tuple(zeros.shape)}")
    devices = {t.device for t in (qweight, scales, zeros) if t is not None}
    if len(devices) > 1:
        raise Int4FormatError(f"qweight, scales and zeros must be on one device, got {sorted(map(str, devices))}")
