"""The tensor-core W4A16 paths: a fused GEMM, and dequantize + vendor GEMM.

``w4a16_gemm`` (fused, M from 1 to ~128) computes the product transposed,

    out^T [N, M] = W [N, K] @ x^T [K, M]

so that the dequantized weights are the *left* operand of ``tl.dot``. On Hopper that operand
of a wgmma may live in registers: Triton loads the packed words into shared memory
(cp.async, pipelined), reads them straight into the MMA operand layout and unpacks them
there, so the 16-bit weights never touch shared memory. (With W on the right, as in a
plain ``x @ W^T`` tile, the unpacked tile has to be restaged through shared memory before
every MMA; that kernel reached 0.45-0.6x of cuBLAS at M = 32-64 on an H100, this one
0.9-2.0x.) The small M becomes the MMA's N (16..64, no padding to 64 rows); the tensor cores
take the multiply-adds and the unpacking (PTX, ``unpack_codes_ptx``) costs ~1.3 instructions
per code. At M = 1 (15 of 16 MMA columns idle, plus the x permute launch) the GEMV is faster on
every measured shape (its ``word_dot``: ~4 instructions per code, session 13).

Unpacking without shuffles. A K-tile of BLOCK_K = 128 is 16 packed words per output
feature; word i holds the codes of k = 8 i + j, j = 0..7 (format.py). The tile is done
as 8 dots of depth 16: dot j takes code j of all 16 words, i.e. k = 8 i + j for i = 0..15,
an elementwise function of the loaded word tile (this is what lets Triton unpack in the
MMA layout, and the PTX work on the two K-adjacent words each register pair holds). The
matching activations x[:, 8 i + j] are strided in memory, so a tiny kernel first writes x
permuted within each K-tile,

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

from .triton_gemv import (codes_minus_zero, gdc_launch_dependents, gdc_wait, k_split, launched_early, load_scale_zero,
                          magic_bias, scales_zeros_at, splitk_finish, splitk_target, tile_group_shift, use_pdl)

GEMM_BLOCK_K = 128  # 16 words per feature: 8 dots of depth 16 (tl.dot's minimum depth)


@triton.jit
def permute_x_kernel(x_ptr, xp_ptr, K, K_TILES, stride_xm, stride_pm, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                     PDL_WAIT: tl.constexpr, PDL_TRIGGER: tl.constexpr):
    """xp[m, k0 + (BLOCK_K // 8) j + i] = x[m, k0 + 8 i + j] for one row m and TILES K-tiles
    k0 (several per program: at one tile per program the launch of thousands of one-warp
    programs cost more than the copy); columns past K become 0 (they meet the padded codes
    of the last group)."""
    if PDL_WAIT:
        gdc_wait()
    if PDL_TRIGGER:
        gdc_launch_dependents()
    m = tl.program_id(0)
    t = tl.program_id(1) * TILES + tl.arange(0, TILES)[:, None, None]
    i = tl.arange(0, BLOCK_K // 8)[None, :, None]
    j = tl.arange(0, 8)[None, None, :]
    k = t * BLOCK_K + 8 * i + j
    v = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0)
    tl.store(xp_ptr + m * stride_pm + t * BLOCK_K + (BLOCK_K // 8) * j + i, v, mask=t < K_TILES)


@triton.jit
def w4a16_gemm_kernel(
    xp_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    M, N, K, K_WORDS,
    group_shift,  # log2(group size); 31 for one group per channel (every k0 >> 31 is 0)
    stride_xm, stride_om, stride_split,  # out_ptr is the output (1 split) or the fp32 workspace
    k_per_split,  # a multiple of BLOCK_K
    HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # activation rows: the MMA's N
    BLOCK_N: tl.constexpr,  # output features: the MMA's M
    BLOCK_K: tl.constexpr,  # 128: 16 words, 8 dots of depth 16
    FOLD_SCALE: tl.constexpr,  # groups smaller than BLOCK_K: scale each word row (see module doc)
    DOT_DTYPE: tl.constexpr,  # x's dtype; fp32 for bf16 under the CPU interpreter (see launcher)
    USE_ASM: tl.constexpr,  # unpack with PTX (unpack_codes_ptx): CUDA, fp16/bf16
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no word mask (every real layer)
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no feature mask
    NUM_STAGES: tl.constexpr,
    PDL_WAIT: tl.constexpr,  # launched early (use_pdl): wait for the permuted x
    PDL_TRIGGER: tl.constexpr,  # let the split-K reduce launch now
):
    if PDL_WAIT:
        gdc_wait()
    if PDL_TRIGGER:
        gdc_launch_dependents()
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
        w_ptrs = qweight_ptr + words[None, :] * N + offs_n[:, None]
        w_mask = n_mask[:, None] & (words < K_WORDS)[None, :]
        if EVEN_K and EVEN_N:
            qw = tl.load(w_ptrs)  # [BLOCK_N, 16]
        else:
            qw = tl.load(w_ptrs, mask=w_mask, other=0)
        if FOLD_SCALE:  # a scale and zero point per word row
            g = (words * 8) >> group_shift
            scale, zero = scales_zeros_at(scales_ptr + g[None, :] * N + offs_n[:, None],
                                          zeros_ptr + g[None, :] * N + offs_n[:, None], w_mask,
                                          HAS_ZEROS, EVEN_K and EVEN_N)
        else:  # one group for the whole tile: unscaled q - z, the scale multiplies the fp32 tile
            g = k0 >> group_shift
            scale, zero = scales_zeros_at(scales_ptr + g * N + offs_n, zeros_ptr + g * N + offs_n, n_mask,
                                          HAS_ZEROS, EVEN_N)
            zero, scale = zero[:, None], scale[:, None]
        if USE_ASM:
            ws = unpack_codes_ptx(qw, zero, scale, DOT_DTYPE, FOLD_SCALE)
        if FOLD_SCALE:
            tile = acc
        else:
            tile = tl.zeros_like(acc)
        for j in tl.static_range(8):
            if USE_ASM:
                w = ws[j]
            else:
                w = unpack_code(qw, j, zero, scale, DOT_DTYPE, FOLD_SCALE)
            # Rows of the permuted x are contiguous along k: Triton pipelines this [BLOCK_M, 16]
            # load with cp.async like the weights, and the transpose is only a shared-memory view.
            xj = tl.load(xp_ptr + offs_m[:, None] * stride_xm + (k0 + 16 * j + offs_i)[None, :],
                         mask=m_mask[:, None], other=0.0)
            tile = _dot(w, tl.trans(xj), tile, DOT_DTYPE)
        if FOLD_SCALE:
            acc = tile
        else:
            acc += tile * scale

    out = out_ptr + pid_k * stride_split + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def unpack_code(qw, j: tl.constexpr, zero, scale, DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """Code j of every word of ``qw``, minus its zero point (times its scale if SCALED), in
    DTYPE: the A operand of dot j. zero / scale are fp32, broadcast against qw."""
    if SCALED:
        return (codes_minus_zero(qw, 4 * j, magic_bias(zero, tl.float32), tl.float32) * scale).to(DTYPE)
    return codes_minus_zero(qw, 4 * j, magic_bias(zero, DTYPE), DTYPE)


@triton.jit
def unpack_codes_ptx(qw, zero, scale, DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """``unpack_code`` for j = 0..7 at once (a tuple of 8), in PTX; fp16 and bf16 only.

    Triton places this in the wgmma operand layout (kWidth 2), where a thread's 32-bit register
    holds two K-adjacent words' values. ``pack=2`` hands the PTX exactly such a pair of words
    and takes back, per code j, one register holding both 16-bit results, so the MMA operand
    is built in place: ~1.3 instructions per code in fp16 (see below), where LLVM's pairing
    of the Triton version costs ~3.3. Same values as ``unpack_code``: the same exact q - z
    and, when SCALED, the same one rounding of the product (for scales stored in DTYPE; others
    are rounded to DTYPE first).
    """
    nbias = -magic_bias(zero, DTYPE)  # -(2^m + z): exact in 16 bits
    if DTYPE == tl.float16:
        if SCALED:
            ws = tl.inline_asm_elementwise(_UNPACK_FP16_SCALED, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
                                             [qw, nbias, scale.to(tl.float16)], dtype=(tl.float16,) * 8,
                                             is_pure=True, pack=2)
        else:
            ws = tl.inline_asm_elementwise(_UNPACK_FP16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [qw, nbias],
                                           dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    elif SCALED:
        ws = tl.inline_asm_elementwise(_UNPACK_BF16_SCALED, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
                                         [qw, nbias, scale.to(tl.bfloat16)], dtype=(tl.bfloat16,) * 8,
                                         is_pure=True, pack=2)
    else:
        ws = tl.inline_asm_elementwise(_UNPACK_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [qw, nbias],
                                       dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    return ws


# PTX of unpack_codes_ptx. Operands: $0..$7 = code j of words (a, b) as a 16-bit pair, $8 = a,
# $9 = b, $10 = -(magic + z) for both, [$11 = scale for both]. First PRMT gathers the low
# halves of a and b (codes 0-3 of each) into one register, and the high halves (codes 4-7)
# into another: every nibble pair (a's code j, b's code j) then sits 16 bits apart, which is
# what one LOP3 with a 0x000F000F-style mask extracts as two 16-bit lanes. OR-ing in the bits
# of a power of two whose ulp is the nibble's weight makes each lane exactly magic + q (the
# I2F-free trick of codes_minus_zero); a 16x2 add of -(magic + z) leaves q - z exactly.
#
# fp16 (10 mantissa bits) even takes nibbles 0 and 1 of a half in place: under 1024 (ulp 1)
# nibble 0 reads as 1024 + q and nibble 1 (bits 4-7) as 1024 + 16 q, which one FMA by 1/16
# (exact) with -(64 + z) turns into q - z. So a half needs one shift (for nibbles 2, 3):
# 2 PRMT + 2 SHR + 8 LOP3 + 8 HADD2/HFMA2 (+ 1 HADD2 for the odd bias) for 16 codes. bf16
# has 7 mantissa bits, so only nibble 0 fits under 128; the others are shifted down first
# (6 SHR). bf16x2 arithmetic is written as fma.rn.bf16x2 (sm_80); the f16x2 ops need sm_53.
_PAIRS = """
prmt.b32 lo, $8, $9, 0x5410;
prmt.b32 hi, $8, $9, 0x7632;"""
_FP16_CODES = _PAIRS + """
shr.b32 lo8, lo, 8;
shr.b32 hi8, hi, 8;
mov.b32 sixteenth, 0x2C002C00;
mov.b32 odd, 0x63806380;
add.f16x2 odd, odd, $10;
lop3.b32 $0, lo, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, lo, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $2, lo8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $3, lo8, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $4, hi, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $5, hi, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 $6, hi8, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $7, hi8, 0x00F000F0, 0x64006400, 0xEA;
add.f16x2 $0, $0, $10;
fma.rn.f16x2 $1, $1, sixteenth, odd;
add.f16x2 $2, $2, $10;
fma.rn.f16x2 $3, $3, sixteenth, odd;
add.f16x2 $4, $4, $10;
fma.rn.f16x2 $5, $5, sixteenth, odd;
add.f16x2 $6, $6, $10;
fma.rn.f16x2 $7, $7, sixteenth, odd;"""
_FP16_DECL = "{\n.reg .b32 lo, hi, lo8, hi8, sixteenth, odd;"
_UNPACK_FP16 = tl.constexpr(_FP16_DECL + _FP16_CODES + "\n}")
_UNPACK_FP16_SCALED = tl.constexpr(
    _FP16_DECL + _FP16_CODES + "".join(f"\nmul.rn.f16x2 ${j}, ${j}, $11;" for j in range(8)) + "\n}")
_BF16_CODES = _PAIRS + "\nmov.b32 one, 0x3F803F80;" + "".join(
    f"\nshr.b32 t, {half}, {4 * (j % 4)};\nlop3.b32 ${j}, t, 0x000F000F, 0x43004300, 0xEA;"
    f"\nfma.rn.bf16x2 ${j}, ${j}, one, $10;"
    for j, half in enumerate(["lo"] * 4 + ["hi"] * 4))
_BF16_DECL = "{\n.reg .b32 lo, hi, t, one, negzero;"
_UNPACK_BF16 = tl.constexpr(_BF16_DECL + _BF16_CODES + "\n}")
_UNPACK_BF16_SCALED = tl.constexpr(
    _BF16_DECL + _BF16_CODES + "\nmov.b32 negzero, 0x80008000;"
    + "".join(f"\nfma.rn.bf16x2 ${j}, ${j}, $11, negzero;" for j in range(8)) + "\n}")


@triton.jit
def _dot(w, x, acc, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")  # no TF32: fp32 wants fp32
    return tl.dot(w, x.to(DOT_DTYPE), acc)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def permute_x(x: torch.Tensor, K: int, block_k: int = GEMM_BLOCK_K, pdl: bool = False) -> torch.Tensor:
    """x [M, K] -> xp [M, K rounded up to block_k], permuted as the GEMM kernel reads it;
    ``pdl``: launch it early too (it waits for the kernel before), and let the next kernel
    launch early (it must ``gdc_wait`` before reading xp)."""
    M = x.shape[0]
    k_tiles = triton.cdiv(K, block_k)
    xp = torch.empty((M, k_tiles * block_k), dtype=x.dtype, device=x.device)
    tiles = min(8, triton.next_power_of_2(k_tiles))
    permute_x_kernel[(M, triton.cdiv(k_tiles, tiles))](x, xp, K, k_tiles, x.stride(0), xp.stride(0),
                                                        BLOCK_K=block_k, TILES=tiles, PDL_WAIT=pdl, PDL_TRIGGER=pdl,
                                                        num_warps=4, **launched_early(pdl))
    return xp


def w4a16_gemm(
    x, qweight, scales, zeros, K, group_size_eff, out, *,
    block_m, block_n, block_k=GEMM_BLOCK_K, split_k=1, num_warps=4, num_stages=3, use_asm=None,
):
    """Launch x-permute + the GEMM kernel (+ the split-K reduce). Arguments are checked and
    contiguous (see triton_w4a16). ``use_asm=None`` unpacks with PTX wherever it can run
    (CUDA, fp16/bf16); False forces the plain Triton unpacking (for tests)."""
    if block_k != GEMM_BLOCK_K:
        raise ValueError(f"the GEMM kernel's block_k is {GEMM_BLOCK_K} (8 dots of depth 16), got {block_k}")
    M, N = out.shape
    k_per_split, split_k = k_split(K, block_k, split_k)
    # One early launch inside a call (use_pdl). Both (permute -> GEMM -> reduce) was slower
    # than either alone at M >= 4 (11.1 -> 14.4 us at 4096x4096 M=16, H100). Of the two, the
    # reduce gains more behind GEMMs of 16-row tiles with split K, the GEMM elsewhere (M=64:
    # 13.6 vs 14.3 us at 4096x4096; bench/results/pdl_h100_2026-11-22.txt). The permute
    # itself launches early only in front of an early GEMM: 0.2-0.6 us less at M = 64, but
    # 0.1-0.2 us more in front of the 16-row GEMMs (notes/triton_kernels.md, session 14).
    pdl = use_pdl(x.device)
    pdl_reduce = pdl and split_k > 1 and block_m <= 16
    pdl_gemm = pdl and not pdl_reduce
    xp = permute_x(x, K, block_k, pdl_gemm)
    target = splitk_target(out, split_k)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split_k)
    # The CPU interpreter (triton 3.9) does bf16 arithmetic and tl.dot on the raw 16-bit
    # patterns, so there the tile is multiplied in fp32 instead; GPUs take the bf16 path.
    interpreted_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    dot_dtype = tl.float32 if interpreted_bf16 else _TL_DTYPES[x.dtype]
    ptx_ok = x.is_cuda and torch.version.hip is None and x.dtype in (torch.float16, torch.bfloat16)
    if use_asm and not ptx_ok:
        raise ValueError(f"use_asm=True needs an NVIDIA GPU and fp16/bf16 x, got {x.dtype} on {x.device}")
    # One scale per K-tile needs the tile inside a group: groups that are multiples of the
    # tile, or one group per channel (group_size_eff >= K).
    per_channel = group_size_eff >= K
    fold_scale = group_size_eff % block_k != 0 and not per_channel
    w4a16_gemm_kernel[grid](
        xp, qweight, scales, zeros if zeros is not None else scales, target,
        M, N, K, qweight.shape[0], tile_group_shift(group_size_eff, K),
        xp.stride(0), N, M * N, k_per_split,
        HAS_ZEROS=zeros is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        FOLD_SCALE=fold_scale, DOT_DTYPE=dot_dtype, USE_ASM=ptx_ok if use_asm is None else use_asm,
        EVEN_K=K % block_k == 0, EVEN_N=N % block_n == 0, NUM_STAGES=num_stages,
        PDL_WAIT=pdl_gemm, PDL_TRIGGER=pdl_reduce,
        num_warps=num_warps, num_stages=num_stages, **launched_early(pdl_gemm),
    )
    splitk_finish(target, out, pdl_reduce)
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
