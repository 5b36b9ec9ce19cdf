"""Prefill-path W4A16 kernel (larger M): tiled GEMM on tensor cores with the weights
dequantized in registers on their way into ``tl.dot``.

Per K-tile a program loads x [BLOCK_M, BLOCK_K] and the packed weights for [BLOCK_K, BLOCK_N],
turns the codes into exact small integers ``q - z`` in the activation dtype, and does

    acc += tl.dot(x_tile, (q - z)_tile) * scale[None, :]

BLOCK_K divides the group size, so the whole tile shares one scale row: the scale multiplies
the fp32 [BLOCK_M, BLOCK_N] tile product once instead of every weight element, and
``q - z`` (integers in -15..15) is exact in fp16/bf16, so the only rounding before the fp32
accumulator is the activation's own.

Unpacking: the weight pointer tile is indexed by row ``k // 8`` and each element shifted by
``(k % 8) * 4``. Each int32 word is therefore read 8 times, but the 8 reads are adjacent rows
of one tile, served from L1/shared memory after the first; this keeps the tile in a plain
[BLOCK_K, BLOCK_N] layout that ``tl.dot`` takes as is, with no reshape/join shuffles.

Programs are ordered in groups of GROUP_M row-tiles so the weight columns a group needs stay
in L2 while its row-tiles go by. For small M (few tiles) K is split over a second grid axis,
as in the GEMV kernel, with fp32 partials reduced by ``splitk_reduce_kernel``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemv import codes_minus_zero, k_split, magic_bias, splitk_finish, splitk_target


@triton.jit
def w4a16_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K, K_WORDS, group_size,
    stride_xm, stride_om, stride_split,  # out_ptr is the output (1 split) or the fp32 workspace
    k_per_split,  # a multiple of BLOCK_K
    HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides group_size, so a K-tile never straddles two groups
    GROUP_M: tl.constexpr,
    PACKED: tl.constexpr,  # how the [BLOCK_K, BLOCK_N] weight tile is unpacked, see below
    DOT_DTYPE: tl.constexpr,  # x's dtype; fp32 for bf16 under the CPU interpreter (see launcher)
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: walk GROUP_M row-tiles down one column of tiles before moving right.
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r = tl.arange(0, BLOCK_K)
    if PACKED:
        # Load the tile's BLOCK_K // 8 words once and expand them in registers into an [8, BLOCK_K // 8,
        # BLOCK_N] block (code j of word i at [j, i]) reshaped to [BLOCK_K, BLOCK_N]: row r holds
        # k = 8 (r % (BLOCK_K // 8)) + r // (BLOCK_K // 8). The dot product does not care about
        # the order of k, so x's columns are gathered in that same order.
        tile_k = (r % (BLOCK_K // 8)) * 8 + r // (BLOCK_K // 8)
        word_rows = tl.arange(0, BLOCK_K // 8)
        shifts = (tl.arange(0, 8) * 4)[:, None, None]
    else:
        # Index the word tile by row k // 8 and shift each element by (k % 8) * 4: every word is
        # read 8 times, but the repeats are adjacent rows of one tile (L1 / shared memory), and
        # the tile is born in the plain [BLOCK_K, BLOCK_N] order that tl.dot takes as is.
        tile_k = r
        word_rows = r // 8
        shifts = ((r % 8) * 4)[:, None]

    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # K_pad - K padded codes meet x == 0: skip them
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + tile_k
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :],
            mask=m_mask[:, None] & (k[None, :] < K),
            other=0.0,
        )
        words = k0 // 8 + word_rows
        qw = tl.load(
            qweight_ptr + words[:, None] * N + offs_n[None, :],
            mask=(words[:, None] < K_WORDS) & n_mask[None, :],
            other=0,
        )
        g = k0 // group_size
        scale = tl.load(scales_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        else:
            zero = tl.zeros_like(scale) + 8.0
        bias = magic_bias(zero, DOT_DTYPE)
        if PACKED:
            w = codes_minus_zero(qw[None, :, :], shifts, bias[None, None, :], DOT_DTYPE)
            w = tl.reshape(w, (BLOCK_K, BLOCK_N))
        else:
            w = codes_minus_zero(qw, shifts, bias[None, :], DOT_DTYPE)
        if DOT_DTYPE == tl.float32:
            tile = tl.dot(x.to(tl.float32), w, input_precision="ieee")  # no TF32: fp32 wants fp32
        else:
            tile = tl.dot(x, w)
        acc += tile * scale[None, :]

    out = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def w4a16_gemm(
    x, qweight, scales, zeros, K, group_size_eff, out, *,
    block_m, block_n, block_k, split_k=1, group_m=8, packed=False, num_warps=4, num_stages=3,
):
    """Launch the GEMM kernel. Arguments are checked and contiguous (see triton_w4a16)."""
    M, N = out.shape
    k_per_split, split_k = k_split(K, block_k, split_k)
    target = splitk_target(out, split_k)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split_k)
    # The CPU interpreter (triton 3.9) does bf16 arithmetic and tl.dot on the raw 16-bit
    # patterns, so there the tile is multiplied in fp32 instead; GPUs take the bf16 path.
    interpreted_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    dot_dtype = tl.float32 if interpreted_bf16 else _TL_DTYPES[x.dtype]
    w4a16_gemm_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, target,
        M, N, K, qweight.shape[0], group_size_eff,
        x.stride(0), N, M * N, k_per_split,
        HAS_ZEROS=zeros is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        PACKED=packed, DOT_DTYPE=dot_dtype,
        num_warps=num_warps, num_stages=num_stages,
    )
    splitk_finish(target, out)
    return out
