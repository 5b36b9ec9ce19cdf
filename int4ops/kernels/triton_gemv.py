"""Decode-path W4A16 kernel (small M): one activation row per program, streaming the weights.

At M = 1..few the matmul is a pure weight stream: 0.5 byte of qweight per multiply-add, so
the kernel's job is to keep HBM busy and to spend as few instructions per 4-bit code as it
can. Per K-tile a program

  * loads a [BLOCK_K // 8, BLOCK_N] int32 tile of qweight: each row is contiguous along N,
    so every thread issues 16-byte vector loads and a warp reads whole 512-byte lines;
  * turns each of the 8 codes of a word into ``q - z`` in fp32 with one LOP3 and one FADD
    (no shift for codes 0..4, no int->float convert: see the loop) and FMAs it with x;
  * keeps the partial sums 2-D ([BLOCK_K // 8, BLOCK_N]) across the whole K loop and does
    the one cross-thread reduction at the very end.

Because BLOCK_K divides the group size, a K-tile lies inside one group: the scale is applied
once per tile to the [BLOCK_K // 8, BLOCK_N] partial instead of once per code, and the zero
point folds into the constant subtracted while unpacking. Measured on an H200 this kernel is
issue-bound (~6 instructions per code all told, see notes/triton_kernels.md), not HBM-bound.

When N / BLOCK_N programs cannot fill the GPU, K is split over a second grid axis: each
split writes fp32 partial sums to its own slice of a workspace and ``splitk_reduce_kernel``
adds the slices in a fixed order (deterministic, no atomics, no zero-fill, capturable).

This module also holds the pieces the GEMM kernels share with it (unpacking, split-K).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # griddepcontrol (programmatic dependent launch, sm_90+); absent from old Triton releases
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None


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
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks (every real layer)
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no N masks
    NUM_STAGES: tl.constexpr,  # > 1: tl.range stages the tile loads through shared memory (cp.async)
    PDL_TRIGGER: tl.constexpr,  # let the split-K reduce launch now (see use_pdl)
):
    if PDL_TRIGGER:
        gdc_launch_dependents()
    row = tl.program_id(0)  # fastest axis: rows sharing a weight tile run back to back (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_word = tl.arange(0, BLOCK_K // 8)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # K_pad - K padded codes meet x == 0: skip them

    w_ptrs = qweight_ptr + (k_begin // 8 + offs_word)[:, None] * N + offs_n[None, :]
    x_ptrs = x_ptr + row * stride_xm + k_begin + offs_word * 8  # x[k] of code 0 of each word row
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        qw, scale, zero = _load_tile(w_ptrs, scales_ptr, zeros_ptr, k0, K_WORDS, group_size, N,
                                     offs_word, offs_n, n_mask, HAS_ZEROS, EVEN_K, EVEN_N)

        # q - z for code j, with one LOP3 per code: keep nibble p where it is (bits 4p..4p+3) and
        # OR in the exponent of 2^(23 - 4p), whose mantissa ulp is 2^-4p: the float is exactly
        # 2^(23 - 4p) + q. Subtracting 2^(23 - 4p) + z (per tile) leaves q - z exactly. p <= 4
        # keeps the nibble below bit 23, so codes 5..7 are read as nibbles 2..4 of (word >> 12).
        part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(5):  # codes 0..4
            xj = _load_x(x_ptrs + p, k0 + offs_word * 8 + p, K, EVEN_K)
            part += _code_minus_zero(qw, p, zero) * xj[:, None]
        qw_hi = qw >> 12
        for p in tl.static_range(2, 5):  # codes 5..7
            xj = _load_x(x_ptrs + p + 3, k0 + offs_word * 8 + p + 3, K, EVEN_K)
            part += _code_minus_zero(qw_hi, p, zero) * xj[:, None]
        acc += part * scale[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += (BLOCK_K // 8) * N

    y = tl.sum(acc, axis=0)
    out = out_ptr + pid_k * stride_split + row * stride_om + offs_n
    if EVEN_N:
        tl.store(out, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _load_x(ptrs, k, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _code_minus_zero(words, P: tl.constexpr, zero):
    """q - z in fp32 for nibble P (0..4) of words [R, C], zero points [C] (see the kernel)."""
    magic = (150 - 4 * P) << 23  # the bits of 2^(23 - 4P)
    code = ((words & (0xF << (4 * P))) | magic).to(tl.float32, bitcast=True)
    return code - ((1 << (23 - 4 * P)) + zero)[None, :]


@triton.jit
def _load_tile(w_ptrs, scales_ptr, zeros_ptr, k0, K_WORDS, group_size, N, offs_word, offs_n, n_mask,
               HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """The packed weights [BLOCK_K // 8, BLOCK_N] of the K-tile at k0, and its group's scale and
    zero point as fp32 [BLOCK_N]."""
    g = k0 // group_size
    if EVEN_K and EVEN_N:
        qw = tl.load(w_ptrs)
    elif EVEN_K:
        qw = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
    else:
        qw = tl.load(w_ptrs, mask=((k0 // 8 + offs_word) < K_WORDS)[:, None] & n_mask[None, :], other=0)
    scale, zero = load_scale_zero(scales_ptr, zeros_ptr, g, N, offs_n, n_mask, HAS_ZEROS, EVEN_N)
    return qw, scale, zero


@triton.jit
def load_scale_zero(scales_ptr, zeros_ptr, g, N, offs_n, n_mask, HAS_ZEROS: tl.constexpr, EVEN_N: tl.constexpr):
    """Scale and zero point of group ``g`` for columns ``offs_n``, as fp32 [BLOCK_N] (zero point 8
    when symmetric). EVEN_N drops the column mask (N a multiple of BLOCK_N)."""
    return scales_zeros_at(scales_ptr + g * N + offs_n, zeros_ptr + g * N + offs_n, n_mask, HAS_ZEROS, EVEN_N)


@triton.jit
def scales_zeros_at(s_ptrs, z_ptrs, mask, HAS_ZEROS: tl.constexpr, UNMASKED: tl.constexpr):
    """Scales and zero points (8 when symmetric) at the pointers s_ptrs / z_ptrs, as fp32."""
    if UNMASKED:
        scale = tl.load(s_ptrs).to(tl.float32)
    else:
        scale = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    if not HAS_ZEROS:
        zero = tl.zeros_like(scale) + 8.0
    elif UNMASKED:
        zero = tl.load(z_ptrs).to(tl.float32)
    else:
        zero = tl.load(z_ptrs, mask=mask, other=0).to(tl.float32)
    return scale, zero


@triton.jit
def splitk_reduce_kernel(ws_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                         PDL_WAIT: tl.constexpr):
    """out[i] = sum_s ws[s, i] over contiguous [SPLIT_K, M * N] fp32 partials, in split order."""
    if PDL_WAIT:  # launched early (use_pdl): wait until the partials are complete and visible
        gdc_wait()
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


def splitk_finish(target: torch.Tensor, out: torch.Tensor, pdl: bool = False) -> None:
    """The reduce launch (if K was split); ``pdl``: launch it early, the kernel before it
    having called ``gdc_launch_dependents``."""
    if target is out:
        return
    numel = out.numel()
    # Small outputs (decode) get small blocks so that the reads spread over many SMs.
    block = 256 if numel <= 2**16 else 1024
    splitk_reduce_kernel[(triton.cdiv(numel, block),)](
        target, out, numel, SPLIT_K=target.shape[0], BLOCK=block, PDL_WAIT=pdl, num_warps=4, **launched_early(pdl),
    )


@functools.lru_cache(maxsize=None)
def _pdl_capable(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.version.hip is None and gdc_wait is not None
            and torch.cuda.get_device_capability(device)[0] >= 9)


def use_pdl(device: torch.device) -> bool:
    """Whether a call may launch one of its kernels with programmatic dependent launch (PDL).

    A call is 2-3 short kernels (x permute, GEMM or GEMV, split-K reduce) of a few us each,
    so the launch gaps between them count. With PDL (Hopper and later) a kernel calls
    ``gdc_launch_dependents`` as it starts, and the next kernel, launched with
    ``launch_pdl=True``, is scheduled at once instead of after it: its programs become
    resident and block in ``gdc_wait``, their first instruction, which returns once the
    previous grid has finished and its writes are visible. Only a kernel of the same call
    is launched this way, and it waits before touching memory, so the order of the stream is
    unchanged. H100, CUDA graphs: 9.1 -> 8.1 us for the GEMV + reduce at 4096x4096 M=1,
    11.1 -> 9.8 us for the GEMM at M=16 (bench/results/pdl_h100_2026-11-22.txt).
    ``INT4OPS_PDL=0`` turns it off (A/B timing)."""
    return os.environ.get("INT4OPS_PDL", "1") != "0" and _pdl_capable(device)


def launched_early(pdl: bool) -> dict:
    """The launch option of a kernel launched with PDL. Passed only when set: Triton before 3.3
    has no such option and refuses unknown keywords (use_pdl is always False there)."""
    return {"launch_pdl": True} if pdl else {}


def k_split(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(k_per_split, split_k) with every split non-empty and aligned to BLOCK_K."""
    k_tiles = triton.cdiv(K, block_k)
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return tiles_per_split * block_k, triton.cdiv(k_tiles, tiles_per_split)


def w4a16_gemv(x, qweight, scales, zeros, K, group_size_eff, out, *, block_n, block_k, split_k, num_warps=4, num_stages=1):
    """Launch the decode kernel. Arguments are checked and contiguous (see triton_w4a16)."""
    M, N = out.shape
    k_per_split, split_k = k_split(K, block_k, split_k)
    target = splitk_target(out, split_k)
    grid = (M, triton.cdiv(N, block_n), split_k)
    pdl = split_k > 1 and use_pdl(x.device)  # the reduce launches early
    w4a16_gemv_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, target,
        N, K, qweight.shape[0], group_size_eff,
        x.stride(0), N, M * N, k_per_split,
        HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=K % block_k == 0, EVEN_N=N % block_n == 0, NUM_STAGES=num_stages, PDL_TRIGGER=pdl,
        num_warps=num_warps,
    )
    splitk_finish(target, out, pdl)
    return out
