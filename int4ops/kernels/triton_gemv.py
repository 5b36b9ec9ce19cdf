"""Decode-path W4A16 kernel (small M): one activation row per program, streaming the weights.

At M = 1..few the matmul is a pure weight stream: 0.5 byte of qweight per multiply-add, so
the kernel's job is to keep HBM busy and to spend as few instructions per 4-bit code as it
can. Per K-tile a program

  * loads a [BLOCK_K // 8, BLOCK_N] int32 tile of qweight: each row is contiguous along N,
    so every thread issues 16-byte vector loads and a warp reads whole 512-byte lines;
  * turns each of the 8 nibbles of a word into ``q - z`` in fp32 with no int->float
    conversion (see ``codes_minus_zero``) and multiplies by the matching x element;
  * keeps the partial sums 2-D ([BLOCK_K // 8, BLOCK_N]) across the whole K loop and does
    the one cross-thread reduction at the very end.

Because BLOCK_K divides the group size, a K-tile lies inside one group: the scale is applied
once per tile to the [BLOCK_K // 8, BLOCK_N] partial instead of once per code, and the zero
point folds into the constant subtracted while unpacking. Per code that leaves
shift, and|or, fsub, ffma.

When N / BLOCK_N programs cannot fill the GPU, K is split over a second grid axis: each
split writes fp32 partial sums to its own slice of a workspace and ``splitk_reduce_kernel``
adds the slices in a fixed order (deterministic, no atomics, no zero-fill, capturable).

This module also holds the two small pieces the GEMM kernel shares with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def codes_minus_zero(words, shift, bias, DTYPE: tl.constexpr):
    """Nibble ``(words >> shift) & 0xF`` minus its zero point, exactly, as DTYPE.

    No I2F instruction (a quarter-rate op on Hopper): OR the 4-bit code into the low
    mantissa bits of a power of two whose mantissa ulp is 1 (2^23 in fp32, 1024 in fp16,
    128 in bf16), reinterpret the bits, and subtract ``bias = that power of two + z``.
    Every value involved is a small integer, so the result is exact in any of the three.
    """
    nibble = (words >> shift) & 0xF
    if DTYPE == tl.float16:
        return (nibble | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - bias
    elif DTYPE == tl.bfloat16:
        return (nibble | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - bias
    else:
        return (nibble | 0x4B000000).to(tl.float32, bitcast=True) - bias


@triton.jit
def magic_bias(zero, DTYPE: tl.constexpr):
    """The ``bias`` of ``codes_minus_zero`` for fp32 zero points ``zero``."""
    if DTYPE == tl.float16:
        return (zero + 1024.0).to(tl.float16)
    elif DTYPE == tl.bfloat16:
        return (zero + 128.0).to(tl.bfloat16)
    else:
        return zero + 8388608.0


@triton.jit
def w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    N, K, K_WORDS, group_size,
    stride_xm, stride_om, stride_split,  # out_ptr is the output (1 split) or the fp32 workspace
    k_per_split,  # a multiple of BLOCK_K
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides group_size, so a K-tile never straddles two groups
):
    row = tl.program_id(0)  # fastest axis: the rows sharing a weight tile run back to back (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_word = tl.arange(0, BLOCK_K // 8)
    x_row = x_ptr + row * stride_xm

    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # K_pad - K padded codes meet x == 0: skip them
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words = k0 // 8 + offs_word
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
            zero = tl.full((BLOCK_N,), 8.0, dtype=tl.float32)
        bias = magic_bias(zero, tl.float32)[None, :]

        # Code j of word i is k = k0 + 8 i + j: take x with stride 8 (tiny, L1-resident) rather
        # than reshaping the weight tile, so the tile stays in the layout it was loaded in.
        part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            k = k0 + offs_word * 8 + j
            xj = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            part += codes_minus_zero(qw, 4 * j, bias, tl.float32) * xj[:, None]
        acc += part * scale[None, :]

    y = tl.sum(acc, axis=0)
    out = out_ptr + pid_k * stride_split + row * stride_om + offs_n
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def splitk_reduce_kernel(ws_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_s ws[s, i] over contiguous [SPLIT_K, M * N] fp32 partials, in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_target(out: torch.Tensor, split_k: int) -> torch.Tensor:
    """Where a kernel writes: ``out`` itself, or an fp32 [split_k, M, N] workspace."""
    if split_k == 1:
        return out
    return torch.empty((split_k, *out.shape), dtype=torch.float32, device=out.device)


def splitk_finish(target: torch.Tensor, out: torch.Tensor) -> None:
    if target is out:
        return
    block = 1024
    numel = out.numel()
    splitk_reduce_kernel[(triton.cdiv(numel, block),)](
        target, out, numel, SPLIT_K=target.shape[0], BLOCK=block, num_warps=4
    )


def k_split(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(k_per_split, split_k) with every split non-empty and aligned to BLOCK_K."""
    k_tiles = triton.cdiv(K, block_k)
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return tiles_per_split * block_k, triton.cdiv(k_tiles, tiles_per_split)


def w4a16_gemv(x, qweight, scales, zeros, K, group_size_eff, out, *, block_n, block_k, split_k, num_warps=4):
    """Launch the decode kernel. Arguments are checked and contiguous (see triton_w4a16)."""
    M, N = out.shape
    k_per_split, split_k = k_split(K, block_k, split_k)
    target = splitk_target(out, split_k)
    grid = (M, triton.cdiv(N, block_n), split_k)
    w4a16_gemv_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, target,
        N, K, qweight.shape[0], group_size_eff,
        x.stride(0), N, M * N, k_per_split,
        HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    splitk_finish(target, out)
    return out
