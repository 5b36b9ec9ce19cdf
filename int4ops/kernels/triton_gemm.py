"""Larger-M W4A16 paths: a fused tensor-core GEMM, and dequantize + vendor GEMM.

``w4a16_gemm`` (fused, M from 3 to ~128) computes the product transposed,

    out^T [N, M] = W [N, K] @ x^T [K, M]

so that the dequantized weights are the *left* operand of ``tl.dot``. On Hopper that operand
of a wgmma may live in registers: Triton loads the packed words into shared memory
(cp.async, pipelined), reads them straight into the MMA operand layout and unpacks them
there, so the 16-bit weights never touch shared memory. (With W on the right, as in a
plain ``x @ W^T`` tile, the unpacked tile has to be restaged through shared memory before
every MMA; that kernel reached 0.45-0.6x of cuBLAS at M = 32-64 on an H100, this one
0.85-1.5x.) The small M becomes the MMA's N (16..64, no padding to 64 rows).

Unpacking without shuffles. A K-tile of BLOCK_K = 128 is 16 packed words per output
feature; word i holds the codes of k = 8 i + j, j = 0..7 (format.py). The tile is done
as 8 dots of depth 16: dot j takes code j of all 16 words, i.e. k = 8 i + j for i = 0..15,
an elementwise function of the loaded word tile (this is what lets Triton unpack in the
MMA layout). The matching activations x[:, 8 i + j] are strided in memory, so a tiny
kernel first writes x permuted within each K-tile,

    xp[m, k0 + 16 j + i] = x[m, k0 + 8 i + j]        (permute_x_kernel; K padded to the tile)

and dot j reads the contiguous columns xp[:, k0 + 16 j : k0 + 16 j + 16].

Scales. With groups of >= 128 (or one per channel) a K-tile lies in one group: q - z is
exact in fp16/bf16, the 8 dots accumulate an unscaled fp32 tile, and the group scale
multiplies it once. Groups of 32/64 split a tile, so there (FOLD_SCALE) each word row
gets its own scale and zero point and the dequantized (q - z) * s, rounded to x's dtype
like any dequantize + GEMM, goes into the dots.

For few output tiles (small M, narrow N) K is split over a second grid axis, as in the
GEMV kernel (fp32 partials + a fixed-order reduce).

``w4a16_dequant_matmul``: for large M the product is compute-bound and no fused kernel
here is near cuBLAS, so the weight is expanded once into a transient dense buffer and
multiplied by torch.matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemv import codes_minus_zero, k_split, load_scale_zero, magic_bias, splitk_finish, splitk_target

GEMM_BLOCK_K = 128  # 16 words per feature: 8 dots of depth 16 (tl.dot's minimum depth)


@triton.jit
def permute_x_kernel(x_ptr, xp_ptr, K, stride_xm, stride_pm, BLOCK_K: tl.constexpr):
    """xp[m, k0 + (BLOCK_K // 8) j + i] = x[m, k0 + 8 i + j] for one row m and K-tile k0;
    columns past K become 0 (they meet the padded codes of the last group)."""
    m = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    i = tl.arange(0, BLOCK_K // 8)[:, None]
    j = tl.arange(0, 8)[None, :]
    k = k0 + 8 * i + j
    v = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0)
    tl.store(xp_ptr + m * stride_pm + k0 + (BLOCK_K // 8) * j + i, v)


@triton.jit
def w4a16_gemm_kernel(
    xp_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K, K_WORDS, group_size,
    stride_xm, stride_om, stride_split,  # out_ptr is the output (1 split) or the fp32 workspace
    k_per_split,  # a multiple of BLOCK_K
    HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # activation rows: the MMA's N
    BLOCK_N: tl.constexpr,  # output features: the MMA's M
    BLOCK_K: tl.constexpr,  # 128: 16 words, 8 dots of depth 16
    FOLD_SCALE: tl.constexpr,  # groups smaller than BLOCK_K: scale each word row (see module doc)
    DOT_DTYPE: tl.constexpr,  # x's dtype; fp32 for bf16 under the CPU interpreter (see launcher)
    NUM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        words = k0 // 8 + offs_i
        w_mask = n_mask[:, None] & (words < K_WORDS)[None, :]
        qw = tl.load(qweight_ptr + words[None, :] * N + offs_n[:, None], mask=w_mask, other=0)  # [BLOCK_N, 16]
        if FOLD_SCALE:
            g = (words * 8) // group_size
            s = tl.load(scales_ptr + g[None, :] * N + offs_n[:, None], mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(zeros_ptr + g[None, :] * N + offs_n[:, None], mask=w_mask, other=0).to(tl.float32)
            else:
                z = tl.zeros_like(s) + 8.0
            bias = magic_bias(z, tl.float32)
            for j in tl.static_range(8):
                w = (codes_minus_zero(qw, 4 * j, bias, tl.float32) * s).to(DOT_DTYPE)
                xj = tl.load(xp_ptr + offs_m[None, :] * stride_xm + (k0 + 16 * j + offs_i)[:, None],
                             mask=m_mask[None, :], other=0.0)
                acc = _dot(w, xj, acc, DOT_DTYPE)
        else:
            scale, zero = load_scale_zero(scales_ptr, zeros_ptr, k0 // group_size, N, offs_n, n_mask, HAS_ZEROS, False)
            bias = magic_bias(zero, DOT_DTYPE)[:, None]
            tile = tl.zeros_like(acc)
            for j in tl.static_range(8):
                w = codes_minus_zero(qw, 4 * j, bias, DOT_DTYPE)
                xj = tl.load(xp_ptr + offs_m[None, :] * stride_xm + (k0 + 16 * j + offs_i)[:, None],
                             mask=m_mask[None, :], other=0.0)
                tile = _dot(w, xj, tile, DOT_DTYPE)
            acc += tile * scale[:, None]

    out = out_ptr + pid_k * stride_split + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def _dot(w, x, acc, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")  # no TF32: fp32 wants fp32
    return tl.dot(w, x.to(DOT_DTYPE), acc)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def permute_x(x: torch.Tensor, K: int, block_k: int = GEMM_BLOCK_K) -> torch.Tensor:
    """x [M, K] -> xp [M, K rounded up to block_k], permuted as the GEMM kernel reads it."""
    M = x.shape[0]
    k_tiles = triton.cdiv(K, block_k)
    xp = torch.empty((M, k_tiles * block_k), dtype=x.dtype, device=x.device)
    permute_x_kernel[(M, k_tiles)](x, xp, K, x.stride(0), xp.stride(0), BLOCK_K=block_k, num_warps=1)
    return xp


def w4a16_gemm(
    x, qweight, scales, zeros, K, group_size_eff, out, *,
    block_m, block_n, block_k=GEMM_BLOCK_K, split_k=1, num_warps=4, num_stages=3,
):
    """Launch x-permute + the GEMM kernel (+ the split-K reduce). Arguments are checked and
    contiguous (see triton_w4a16)."""
    if block_k != GEMM_BLOCK_K:
        raise ValueError(f"the GEMM kernel's block_k is {GEMM_BLOCK_K} (8 dots of depth 16), got {block_k}")
    M, N = out.shape
    xp = permute_x(x, K, block_k)
    k_per_split, split_k = k_split(K, block_k, split_k)
    target = splitk_target(out, split_k)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split_k)
    # The CPU interpreter (triton 3.9) does bf16 arithmetic and tl.dot on the raw 16-bit
    # patterns, so there the tile is multiplied in fp32 instead; GPUs take the bf16 path.
    interpreted_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    dot_dtype = tl.float32 if interpreted_bf16 else _TL_DTYPES[x.dtype]
    # One scale per K-tile needs the tile inside a group: groups that are multiples of the
    # tile, or one group per channel (group_size_eff >= K).
    fold_scale = group_size_eff % block_k != 0 and group_size_eff < K
    w4a16_gemm_kernel[grid](
        xp, qweight, scales, zeros if zeros is not None else scales, target,
        M, N, K, qweight.shape[0], group_size_eff,
        xp.stride(0), N, M * N, k_per_split,
        HAS_ZEROS=zeros is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        FOLD_SCALE=fold_scale, DOT_DTYPE=dot_dtype, NUM_STAGES=num_stages,
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
