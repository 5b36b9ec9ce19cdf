"""Larger-M W4A16 paths: a fused tensor-core GEMM, and dequantize + vendor GEMM.

``w4a16_gemm`` (fused): per K-tile a program loads x [BLOCK_M, BLOCK_K] and the packed
weights for [BLOCK_K, BLOCK_N], turns the codes into exact small integers ``q - z`` in the
activation dtype, and does

    acc += tl.dot(x_tile, (q - z)_tile) * scale[None, :]

BLOCK_K divides the group size, so the whole tile shares one scale row: the scale multiplies
the fp32 [BLOCK_M, BLOCK_N] tile product once instead of every weight element, and
``q - z`` (integers in -15..15) is exact in fp16/bf16, so the only rounding before the fp32
accumulator is the activation's own. Programs are ordered in groups of GROUP_M row-tiles so
the weight columns a group needs stay in L2; for few tiles (small M) K is split over a
second grid axis, as in the GEMV kernel.

``w4a16_dequant_matmul``: for large M the product is compute-bound and the fused kernel
(mma.sync on a register-dequantized operand) is far from cuBLAS, so the weight is expanded
once into a transient dense buffer and multiplied by torch.matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemv import codes_minus_zero, k_split, load_scale_zero, magic_bias, splitk_finish, splitk_target


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
    FOLD_SCALE: tl.constexpr,  # multiply the scale into the weight tile (True) or the tile product
    SPLIT_DOTS: tl.constexpr,  # unpacking scheme, see below
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
    # Unpacking, two ways (a config choice):
    #  - expanded rows: index the word tile by row k // 8 and shift each element by (k % 8) * 4.
    #    Each word is fetched 8 times (adjacent rows of one tile), but the tile is born in the
    #    plain [BLOCK_K, BLOCK_N] order one tl.dot takes.
    #  - SPLIT_DOTS: fetch the [BLOCK_K // 8, BLOCK_N] words once and do 8 dots of depth
    #    BLOCK_K // 8, dot j taking code j of every word and x's columns k0 + 8 i + j.
    #    Needs BLOCK_K // 8 >= 16 (tl.dot's minimum depth), so BLOCK_K >= 128.
    offs_k = tl.arange(0, BLOCK_K)
    shifts = ((offs_k % 8) * 4)[:, None]
    offs_word = tl.arange(0, BLOCK_K // 8)

    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # K_pad - K padded codes meet x == 0: skip them
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        g = k0 // group_size
        scale, zero = load_scale_zero(scales_ptr, zeros_ptr, g, N, offs_n, n_mask, HAS_ZEROS, False)
        if SPLIT_DOTS:
            words = k0 // 8 + offs_word
            qw = tl.load(qweight_ptr + words[:, None] * N + offs_n[None, :],
                         mask=(words[:, None] < K_WORDS) & n_mask[None, :], other=0)
            tile = tl.zeros_like(acc)
            for j in tl.static_range(8):
                k = words * 8 + j
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                            mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
                acc, tile = _accumulate(acc, tile, x, qw, 4 * j, zero, scale, FOLD_SCALE, DOT_DTYPE)
        else:
            k = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
            words = k // 8
            qw = tl.load(qweight_ptr + words[:, None] * N + offs_n[None, :],
                         mask=(words[:, None] < K_WORDS) & n_mask[None, :], other=0)
            tile = tl.zeros_like(acc)
            acc, tile = _accumulate(acc, tile, x, qw, shifts, zero, scale, FOLD_SCALE, DOT_DTYPE)
        if not FOLD_SCALE:
            acc += tile * scale[None, :]

    out = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _accumulate(acc, tile, x, qw, shifts, zero, scale, FOLD_SCALE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Add x @ dequant(qw) to acc (scale folded into the weights: the accumulator chains through
    the MMAs) or add x @ (q - z) to tile (exact q - z; the caller scales the tile product)."""
    if FOLD_SCALE:
        w = codes_minus_zero(qw, shifts, magic_bias(zero, tl.float32)[None, :], tl.float32)
        acc = _dot(x, (w * scale[None, :]).to(DOT_DTYPE), acc, DOT_DTYPE)
    else:
        w = codes_minus_zero(qw, shifts, magic_bias(zero, DOT_DTYPE)[None, :], DOT_DTYPE)
        tile = _dot(x, w, tile, DOT_DTYPE)
    return acc, tile


@triton.jit
def _dot(x, w, acc, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")  # no TF32: fp32 wants fp32
    return tl.dot(x, w, acc)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def w4a16_gemm(
    x, qweight, scales, zeros, K, group_size_eff, out, *,
    block_m, block_n, block_k, split_k=1, group_m=8, fold_scale=False, split_dots=False, num_warps=4, num_stages=3,
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
        FOLD_SCALE=fold_scale, SPLIT_DOTS=split_dots and block_k >= 128, DOT_DTYPE=dot_dtype,
        num_warps=num_warps, num_stages=num_stages,
    )
    splitk_finish(target, out)
    return out


@triton.jit
def w4a16_dequant_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, w_ptr,
    N, K, K_WORDS, group_size,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides group_size
):
    """w[n, k] = (q - z) * s in w's dtype: the dense [N, K] nn.Linear weight."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    qw = tl.load(qweight_ptr + words[:, None] * N + offs_n[None, :],
                 mask=(words[:, None] < K_WORDS) & n_mask[None, :], other=0)
    g = k0 // group_size
    scale, zero = load_scale_zero(scales_ptr, zeros_ptr, g, N, offs_n, n_mask, HAS_ZEROS, False)
    # [BLOCK_K // 8, 8, BLOCK_N]: code j of word i is k = k0 + 8 i + j, contiguous along j in w.
    j = tl.arange(0, 8)
    q = codes_minus_zero(qw[:, None, :], (j * 4)[None, :, None], magic_bias(zero, tl.float32)[None, None, :],
                         tl.float32)
    k = words[:, None, None] * 8 + j[None, :, None]
    ptrs = w_ptr + offs_n[None, None, :] * K + k
    mask = (k < K) & n_mask[None, None, :]
    tl.store(ptrs, (q * scale[None, None, :]).to(w_ptr.dtype.element_ty), mask=mask)


def w4a16_dequant_matmul(x, qweight, scales, zeros, K, group_size_eff, out, *, block_n=64, block_k=128, num_warps=4):
    """Large M: dequantize the whole weight to x.dtype (a transient [N, K] buffer) and let the
    vendor GEMM (cuBLAS) do the math. The extra pass reads 0.5 and writes 2 bytes per weight,
    which a compute-bound product (M in the hundreds and up) hides easily."""
    N = out.shape[1]
    w = torch.empty((N, K), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    w4a16_dequant_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, w,
        N, K, qweight.shape[0], group_size_eff,
        HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return torch.matmul(x, w.t(), out=out)
