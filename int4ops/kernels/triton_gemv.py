"""Decode-path W4A16 kernel (small M): one activation row per program, streaming the weights.

At M = 1..few the matmul is a pure weight stream: 0.5 byte of qweight per multiply-add, so
the kernel's job is to keep HBM busy and to spend as few instructions per 4-bit code as it
can (it is issue-bound, not HBM-bound: it took the same time on an H100 and on an H200 with
1.4x the bandwidth). Per K-tile a program

  * loads a [BLOCK_K // 8, BLOCK_N] int32 tile of qweight: each row is contiguous along N,
    so every thread issues 16-byte vector loads and a warp reads whole 512-byte lines;
  * turns each code into an exact fp32 ``1 + q * 2^-11`` or ``1 + q * 2^-7`` with one LOP3
    (plus a shift per two codes), FMAs it with x, and takes the 1s and the zero point out
    once per word and tile (``word_dot``: ~4 instructions per code in all, against ~5.8 for
    the previous ``q - z``-per-code loop);
  * keeps the partial sums in the tile's shape across the whole K loop and does the one
    cross-thread reduction at the very end.

The tile is TILES = BLOCK_K / TILE_K sub-tiles, TILE_K = min(BLOCK_K, group size), so each
sub-tile lies inside one group: its scale is applied once to its partial instead of once per
code. Two sub-tiles (BLOCK_K 256 at group 128) issue a short split's loads together; that is
what the tuned tables mostly run at M = 1 (notes/triton_kernels.md, item 21).

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
    N, K, K_WORDS,
    group_shift,  # log2(group size); 31 for one group per channel
    mask_lo, mask_hi, one_bits,  # 0xF000, 0xF0000, 0x3F800000: see word_dot for why not literals
    stride_xm, stride_om, stride_split,  # out_ptr is the output (1 split) or the fp32 workspace
    k_per_split,  # a multiple of BLOCK_K
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # codes along K per loaded tile: TILES sub-tiles of TILE_K
    TILE_K: tl.constexpr,  # divides group_size, so a sub-tile never straddles two groups
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks (every real layer)
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no N masks
    NUM_STAGES: tl.constexpr,  # > 1: tl.range stages the tile loads through shared memory (cp.async)
    PDL_WAIT: tl.constexpr,  # launched early (use_pdl): wait for the kernel before (it may write x)
    PDL_TRIGGER: tl.constexpr,  # let the split-K reduce launch now (see use_pdl)
    EXACT: tl.constexpr,  # fp32 x: q - z per code (word_dot's products need x of <= 12 bits)
):
    if PDL_WAIT:
        gdc_wait()
    if PDL_TRIGGER:
        gdc_launch_dependents()
    row = tl.program_id(0)  # fastest axis: rows sharing a weight tile run back to back (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # A tile is [TILES, R, BLOCK_N] words: TILES sub-tiles of R word rows, each inside one
    # group (one scale row). Several sub-tiles per tile put all of a short split's loads in
    # flight at once instead of one round trip to HBM per group.
    TILES: tl.constexpr = BLOCK_K // TILE_K
    R: tl.constexpr = TILE_K // 8

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = tl.arange(0, TILES)
    word_rows = offs_t[:, None] * R + tl.arange(0, R)[None, :]  # [TILES, R] within the tile
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)  # K_pad - K padded codes meet x == 0: skip them

    w_ptrs = qweight_ptr + (k_begin // 8 + word_rows)[:, :, None] * N + offs_n[None, None, :]
    k_word = k_begin + word_rows[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [TILES, R, 8]: k of each code
    acc = tl.zeros((TILES, R, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
        qw, scale, zero = _load_tile(w_ptrs, scales_ptr, zeros_ptr, k0, K, K_WORDS, group_shift, N,
                                     word_rows, offs_t * TILE_K, offs_n, n_mask, HAS_ZEROS, EVEN_K, EVEN_N)
        # x of the tile as 16-byte rows [TILES, R, 8] (one load, not 8 strided ones), split
        # into the 8 per-code columns x[..., j] that broadcast along N.
        if EVEN_K:
            xv = tl.load(x_ptr + row * stride_xm + k_word)
        else:
            xv = tl.load(x_ptr + row * stride_xm + k_word, mask=k_word < K, other=0.0)
        xs = _columns(xv.to(tl.float32), TILES, R)
        if EXACT:
            part = _word_dot_exact(qw, xs, zero)
        else:
            part = word_dot(qw, xs, zero, mask_lo, mask_hi, one_bits)
        acc += part * scale
        k_word += BLOCK_K
        w_ptrs += (BLOCK_K // 8) * N

    y = tl.sum(tl.sum(acc, axis=1), axis=0)
    out = out_ptr + pid_k * stride_split + row * stride_om + offs_n
    if EVEN_N:
        tl.store(out, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _columns(xv, TILES: tl.constexpr, R: tl.constexpr):
    """x [TILES, R, 8] -> its 8 columns x[..., j], each [TILES, R, 1]: three splits of the
    code index's bits within each thread's registers. (On the GPU the columns then reach the
    weight tile's row layout through one small shared-memory exchange per tile, cheaper than
    the 8 strided 2-byte loads per row it replaces.)"""
    e, o = tl.split(tl.reshape(xv, (TILES, R, 2, 2, 2)))  # bit 0 of j
    e0, e1 = tl.split(e)  # bit 1
    o0, o1 = tl.split(o)
    x0, x4 = tl.split(e0)  # bit 2
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return (x0[:, :, None], x1[:, :, None], x2[:, :, None], x3[:, :, None],
            x4[:, :, None], x5[:, :, None], x6[:, :, None], x7[:, :, None])


@triton.jit
def word_dot(qw, xs, zero, mask_lo, mask_hi, one_bits):
    """sum_j (q_j - z) * x_j for every word of qw [..., C] (x_j = xs[j]: [..., 1]; z
    broadcasts against qw), in fp32.

    The trick: a code ORed into the mantissa of 1.0f at bits 12-15 reads as exactly
    1 + q * 2^-11, at bits 16-19 as 1 + q * 2^-7: one LOP3 per code, no convert, no
    subtraction. Codes 3 and 4 sit there already; 1 and 2 get there with ``<< 8``, 5 and 6
    with ``>> 8``, 0 with ``<< 12``, 7 with ``>> 12`` (4 shifts per 8 codes). Times x (fp16
    or bf16: <= 11 significant bits) the products are exact in fp32 (<= 23 bits), so the FMA
    chain rounds only its sums. Per word and tile the 1s are taken back out, scaled like the
    codes (2^11 and 2^7), together with the zero point's z * sum x: ~3.4 instructions per code
    plus ~0.6 for that, where ``q - z`` per code (LOP3, FADD, FFMA) measured 5.8 all told.

    The masks and 1.0f's bits come in as kernel arguments: as literals, ptxas rebuilt them
    with a MOV before nearly every LOP3 (a LOP3 takes one immediate), ~50 extra instructions
    per 64 codes.
    """
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    up8 = qw << 8
    down8 = qw >> 8  # arithmetic shift: the sign bits land above bit 19, outside both masks
    a_lo = _one_plus(qw << 12, mask_lo, one_bits) * x0  # codes 0, 1, 3, 5 at bits 12-15
    a_lo += _one_plus(up8, mask_lo, one_bits) * x1
    a_lo += _one_plus(qw, mask_lo, one_bits) * x3
    a_lo += _one_plus(down8, mask_lo, one_bits) * x5
    a_hi = _one_plus(up8, mask_hi, one_bits) * x2  # codes 2, 4, 6, 7 at bits 16-19
    a_hi += _one_plus(qw, mask_hi, one_bits) * x4
    a_hi += _one_plus(down8, mask_hi, one_bits) * x6
    a_hi += _one_plus(qw >> 12, mask_hi, one_bits) * x7
    sum_lo = x0 + x1 + x3 + x5
    sum_hi = x2 + x4 + x6 + x7
    ones = 2048.0 * sum_lo + 128.0 * sum_hi  # what the 1s contributed, in the codes' units
    u = a_lo * 2048.0 - ones
    u = a_hi * 128.0 + u
    return u - zero * (sum_lo + sum_hi)


@triton.jit
def _one_plus(words, mask, one_bits):
    """The fp32 whose bits are ``(words & mask) | one_bits``: 1 + (the masked nibble) * ulp."""
    return ((words & mask) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot_exact(qw, xs, zero):
    """``word_dot`` for fp32 x (24-bit products would round): q - z per code, exactly, with
    one LOP3 and one FADD (codes_minus_zero's trick with the nibble left in place)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    part = _code_minus_zero(qw, 0, zero) * x0
    part += _code_minus_zero(qw, 1, zero) * x1
    part += _code_minus_zero(qw, 2, zero) * x2
    part += _code_minus_zero(qw, 3, zero) * x3
    part += _code_minus_zero(qw, 4, zero) * x4
    qw_hi = qw >> 12  # codes 5..7 as nibbles 2..4 (nibble p <= 4 keeps below bit 23)
    part += _code_minus_zero(qw_hi, 2, zero) * x5
    part += _code_minus_zero(qw_hi, 3, zero) * x6
    part += _code_minus_zero(qw_hi, 4, zero) * x7
    return part


@triton.jit
def _code_minus_zero(words, P: tl.constexpr, zero):
    """q - z in fp32 for nibble P (0..4) of words, zero points ``zero`` (broadcasting against
    them): nibble P ORed with the exponent of 2^(23 - 4P), whose mantissa ulp is 2^-4P, reads
    as exactly 2^(23 - 4P) + q; subtracting 2^(23 - 4P) + z leaves q - z."""
    magic = (150 - 4 * P) << 23  # the bits of 2^(23 - 4P)
    code = ((words & (0xF << (4 * P))) | magic).to(tl.float32, bitcast=True)
    return code - ((1 << (23 - 4 * P)) + zero)


@triton.jit
def _load_tile(w_ptrs, scales_ptr, zeros_ptr, k0, K, K_WORDS, group_shift, N, word_rows, sub_k, offs_n, n_mask,
               HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """The packed weights [TILES, R, BLOCK_N] of the tile at k0 (``word_rows`` [TILES, R]: its
    word rows, ``sub_k`` [TILES]: where its sub-tiles start), and the scale and zero point of
    each sub-tile's group as fp32 [TILES, 1, BLOCK_N]."""
    g = (k0 + sub_k) >> group_shift
    s_ptrs = scales_ptr + g[:, None] * N + offs_n[None, :]
    z_ptrs = zeros_ptr + g[:, None] * N + offs_n[None, :]
    if EVEN_K and EVEN_N:
        qw = tl.load(w_ptrs)
        sz_mask = None
    elif EVEN_K:
        qw = tl.load(w_ptrs, mask=n_mask[None, None, :], other=0)
        sz_mask = n_mask[None, :]
    else:  # sub-tiles past K: codes 0 (x is 0 there), scale 0, and no group index out of range
        qw = tl.load(w_ptrs, mask=((k0 // 8 + word_rows) < K_WORDS)[:, :, None] & n_mask[None, None, :], other=0)
        sz_mask = ((k0 + sub_k) < K)[:, None] & n_mask[None, :]
    scale, zero = scales_zeros_at(s_ptrs, z_ptrs, sz_mask, HAS_ZEROS, EVEN_K and EVEN_N)
    return qw, scale[:, None, :], zero[:, None, :]


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
    """Whether a call may launch its kernels with programmatic dependent launch (PDL).

    A call is 2-3 short kernels (x permute, GEMM or GEMV, split-K reduce) of a few us each,
    so the launch gaps between them count. With PDL (Hopper and later) a kernel calls
    ``gdc_launch_dependents`` as it starts, and the next kernel, launched with
    ``launch_pdl=True``, is scheduled at once instead of after it: its programs become
    resident and block in ``gdc_wait``, their first instruction, which returns once the
    previous grid has finished and its writes are visible. Every kernel launched this way
    waits before touching memory, so the order of the stream is unchanged. Only a kernel of
    the same call is let in early. The decode GEMV (and the permute before an early GEMM)
    is launched with PDL too, behind whatever kernel precedes the call; that kernel does not
    trigger (ours only trigger for the next kernel of their own call), so there PDL only
    shortens the launch: ~0.2-0.3 us.
    H100, CUDA graphs, 4096x4096: the early reduce took the GEMV + reduce at M=1 from 9.1 to
    8.1 us and the GEMM at M=16 from 11.1 to 9.8 us (bench/results/pdl_h100_2026-11-22.txt);
    the early GEMV then 6.8 -> 6.55 us (session 14, notes/triton_kernels.md item 18).
    ``INT4OPS_PDL=0`` turns it all off (A/B timing)."""
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


def group_shift(group_size: int) -> int:
    """log2 of a power-of-two group size (format.GROUP_SIZES): kernels index groups by shift."""
    if group_size <= 0 or group_size & (group_size - 1):
        raise ValueError(f"group size {group_size} is not a power of two")
    return group_size.bit_length() - 1


def tile_group_shift(group_size_eff: int, K: int) -> int:
    """The group shift of a kernel whose K-tiles lie inside one group: 31 for one group per
    channel (every k >> 31 is 0; its effective size K_pad need not be a power of two)."""
    return 31 if group_size_eff >= K else group_shift(group_size_eff)


def w4a16_gemv(x, qweight, scales, zeros, K, group_size_eff, out, *, block_n, block_k, split_k, num_warps=4, num_stages=1):
    """Launch the decode kernel. Arguments are checked and contiguous (see triton_w4a16)."""
    M, N = out.shape
    k_per_split, split_k = k_split(K, block_k, split_k)
    target = splitk_target(out, split_k)
    grid = (M, triton.cdiv(N, block_n), split_k)
    pdl = use_pdl(x.device)
    pdl_reduce = pdl and split_k > 1
    shift = tile_group_shift(group_size_eff, K)
    w4a16_gemv_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, target,
        N, K, qweight.shape[0], shift, 0xF000, 0xF0000, 0x3F800000,
        x.stride(0), N, M * N, k_per_split,
        HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k, TILE_K=min(block_k, 1 << shift),
        EVEN_K=K % block_k == 0, EVEN_N=N % block_n == 0, NUM_STAGES=num_stages,
        PDL_WAIT=pdl, PDL_TRIGGER=pdl_reduce, EXACT=x.dtype == torch.float32, num_warps=num_warps,
        **launched_early(pdl),
    )
    splitk_finish(target, out, pdl_reduce)
    return out
