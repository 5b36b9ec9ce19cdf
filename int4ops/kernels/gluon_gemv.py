"""Decode W4A16 (M = 1) on the tensor cores: mma.sync with whole packed words per lane (Gluon, sm_90).

The plain-Triton GEMV (triton_gemv.py) spends ~4 instructions per 4-bit code on LOP3 + FFMA and is
issue-bound. Here the multiply-adds go to ``mma.sync.m16n8k16`` (weights as A, the activation row as
one column of B) and a code costs ~1.2 instructions of unpacking; the loop came to ~17.5 instructions
per packed word against ~32 (SASS on triton 3.6). Same grid and split-K scheme as the GEMV: 32
features per CTA, K split so that ~8 CTAs run per SM, partials summed by ``splitk_reduce_kernel``.

The one trick: an MMA sums over its 16 k-columns, so which K position feeds which column does not
matter as long as A and B agree. So no lane takes apart a word for another lane (as the 16-bit MMA
layout would need: byte t of every word to lane t) and the format is not repacked: each lane owns
whole words and brings the x of the same K positions, permuted in its registers.

    one warp, one step: 32 features x 4 REP word rows (of 8 codes each), lane = 4 g + t

                features ->  4g    4g+1  4g+2  4g+3
      word row j + REP t   [ w0  | w1  | w2  | w3  ]   one 16-byte load (j = 0..REP-1 in registers)
      x of that row         x0 .. x7                   one 16-byte load (lanes g = 0 only, M = 1)

    mma P (features 4g, 4g+1 are A rows g, g+8 of every lane's quad; the quad's 4 rows are its k):
      1st: A cols (2t, 2t+1) = codes (0, 4) of w0 / w1, cols (2t+8, 2t+9) = codes (1, 5);
           B = (x0, x4), (x1, x5)      [2 PRMT each way, shared by both features and mma Q]
      2nd: codes (2, 6) and (3, 7), B = (x2, x6), (x3, x7), accumulating onto the 1st
    mma Q: the same for w2 / w3. D row g / g + 8, column 0 (token 0) = the words' dot products with x
    over the quad's 32 K positions, in lane t = 0; B's other columns are 0, so are D's.

Unpacking a word into its 4 code pairs, exactly q - z (fp16):
    lop3  (w & 0x000F000F) | 0x64006400   -> (1024 + q0, 1024 + q4)    then add -(1024 + z) twice
    lop3  (w & 0x00F000F0) | 0x64006400   -> (1024 + 16 q1, 1024 + 16 q5): fma by 1/16, add -(64 + z)
    the same on w >> 8 for codes (2, 6) and (3, 7): 1 shift + 4 LOP3 + 4 HADD2/HFMA2 per word.
bf16 has no room for 16 q (bit 7 of a half is an exponent bit): shifts by 4, 8 and 12, the 128 magic,
then sub 128 + z (3 + 4 + 4 per word). Every value is a small integer: exact in either dtype.

Each warp's REP rows per lane lie inside one group (4 REP word rows = 32 REP codes <= group), so the
scale and zero point are loaded and packed once per warp and step, and the scale is applied to the
fp32 MMA results (one FFMA per word): W is never rounded to x's dtype, unlike dequantize + GEMM.

Requirements (``capable``, ``shape_ok``, ``pointers_ok``; triton_w4a16 runs the plain GEMV otherwise):
an sm_90 GPU, M = 1, fp16/bf16 x with K % 8 == 0 and rows that can be read as int32 pairs. Gluon
kernels do not run under TRITON_INTERPRET: the CPU suite compiles this one for sm_90 (tests/sm90_sass.py) and checks its
split rule; its results are checked against the reference on the GPU (tests/test_triton_kernels.py).
Measured: notes/triton_kernels.md, item 33.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .triton_gemv import launched_early, splitk_finish, splitk_target, use_pdl

BLOCK_N = 32  # features per CTA: 8 lane groups x 4 features (one 16-byte word load each)
WAVES = 8  # CTAs per SM the K split aims at (fastest on the five 8B/70B layers, item 33)
SPLIT_MAX = 16


def _unpack_f16(w: str, p: list[str], zc: str, zf: str, tmp: str) -> str:
    """PTX: the 4 code pairs of word ``w`` as fp16x2 q - z in registers p[0..3]: (0, 4), (1, 5),
    (2, 6), (3, 7). zc = -(1024 + z) twice, zf = -(64 + z) twice."""
    return f"""shr.u32 {tmp}, {w}, 8;
lop3.b32 {p[0]}, {w}, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 {p[1]}, {w}, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 {p[2]}, {tmp}, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 {p[3]}, {tmp}, 0x00F000F0, 0x64006400, 0xEA;
add.f16x2 {p[0]}, {p[0]}, {zc};
fma.rn.f16x2 {p[1]}, {p[1]}, k16, {zf};
add.f16x2 {p[2]}, {p[2]}, {zc};
fma.rn.f16x2 {p[3]}, {p[3]}, k16, {zf};
"""


def _unpack_bf16(w: str, p: list[str], zc: str, zf: str, tmp: str) -> str:
    """PTX: as _unpack_f16 in bf16; zc = 128 + z twice (zf unused)."""
    lines = []
    for pair, shift in zip(p, (0, 4, 8, 12)):
        src = w
        if shift:
            lines.append(f"shr.u32 {tmp}, {w}, {shift};")
            src = tmp
        lines.append(f"lop3.b32 {pair}, {src}, 0x000F000F, 0x43004300, 0xEA;")
        lines.append(f"sub.rn.bf16x2 {pair}, {pair}, {zc};")
    return "\n".join(lines) + "\n"


def _mma_asm(dtype: str) -> str:
    """The inline PTX of one pack: 4 words (features 4g..4g+3 at one word row) -> 4 fp32 dot
    products with x over the quad's 32 K positions. Operands: $0-$3 out, $4-$7 words, $8-$11 x as
    int32 pairs (x0x1, x2x3, x4x5, x6x7), $12-$15 zc, $16-$19 zf (fp16 only)."""
    unpack = _unpack_f16 if dtype == "f16" else _unpack_bf16
    body = [".reg .b32 b<4>, p<16>, tmp, k16;", ".reg .f32 d<8>, zero;", "mov.f32 zero, 0f00000000;",
            "mov.b32 k16, 0x2C002C00;",  # 1/16 twice
            # B fragments: (x0, x4), (x1, x5), (x2, x6), (x3, x7): the codes' order in the pairs
            "prmt.b32 b0, $8, $10, 0x5410;", "prmt.b32 b1, $8, $10, 0x7632;",
            "prmt.b32 b2, $9, $11, 0x5410;", "prmt.b32 b3, $9, $11, 0x7632;"]
    for word in range(4):
        zc, zf = f"${12 + word}", f"${16 + word}" if dtype == "f16" else ""
        body.append(unpack(f"${4 + word}", [f"p{4 * word + c}" for c in range(4)], zc, zf, "tmp"))
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32"
    # A registers: row g / g + 8 (the pair's first / second word) x k-cols (2t, 2t+1) / (2t+8, 2t+9).
    for d, (w0, w1) in (("d0, d1, d2, d3", (0, 1)), ("d4, d5, d6, d7", (2, 3))):
        a, b = 4 * w0, 4 * w1
        body.append(f"{mma} {{{d}}}, {{p{a}, p{b}, p{a + 1}, p{b + 1}}}, {{b0, b1}}, {{zero, zero, zero, zero}};")
        body.append(f"{mma} {{{d}}}, {{p{a + 2}, p{b + 2}, p{a + 3}, p{b + 3}}}, {{b2, b3}}, {{{d}}};")
    body.append("mov.f32 $0, d0;\nmov.f32 $1, d2;\nmov.f32 $2, d4;\nmov.f32 $3, d6;")  # token 0: D cols 0
    return "{\n" + "\n".join(body) + "\n}"


_MMA_F16 = gl.constexpr(_mma_asm("f16"))
_MMA_BF16 = gl.constexpr(_mma_asm("bf16"))


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def w4a16_gemv_mma_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K_ROWS, stride_x, stride_split,
                          rows_per_split, group_shift, HAS_ZEROS: gl.constexpr, IS_F16: gl.constexpr,
                          REP: gl.constexpr, WK: gl.constexpr, EVEN_N: gl.constexpr, EVEN_K: gl.constexpr,
                          PDL_WAIT: gl.constexpr, PDL_TRIGGER: gl.constexpr):
    """x_ptr: x as int32 pairs (row stride ``stride_x``), of which only token 0 is read (M = 1; the
    B columns of tokens 1-7 would be the lanes g = 1-7, whose sums this kernel does not store);
    K_ROWS = K / 8 word rows; group_shift: log2 of the group in word rows (30: one group). A step is
    [8, 4, WK, 4 REP] words: feature 4 r + i, word row w * 4 REP + c, c = j + REP t (warp w, lane t,
    register j)."""
    C: gl.constexpr = 4 * REP
    KW: gl.constexpr = WK * C  # word rows per step
    L: gl.constexpr = gl.BlockedLayout([1, 4, 1, REP], [8, 1, 1, 4], [1, 1, WK, 1], [1, 3, 2, 0])
    if PDL_WAIT:  # launched early (use_pdl): the kernel before may still be writing x
        _gdc_wait()
    if PDL_TRIGGER:
        _gdc_launch_dependents()
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    r = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))
    i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))
    w = gl.arange(0, WK, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))
    c = gl.arange(0, C, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
    r4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(r, 1), 2), 3)
    i4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 2), 3)
    w4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(w, 0), 1), 3)
    c4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(c, 0), 1), 2)
    n = pid_n * 32 + 4 * r4 + i4  # [8, 4, 1, 1]
    # B column g is token g: only lanes g < M (= 1) bring x, the other columns stay 0. (As a run-time
    # comparison with M this measured 7-8% faster in fp16 than ``r4 == 0``, the same SASS counts:
    # ptxas schedules the loop differently; notes item 33.)
    g = r4 % 8
    token = g < M
    row_begin = pid_k * rows_per_split
    row_end = gl.minimum(row_begin + rows_per_split, K_ROWS)
    acc = gl.zeros([8, 4, WK, C], gl.float32, L)
    for row0 in range(row_begin, row_end, KW):
        wrow = row0 + w4 * C  # [1, 1, WK, 1]: each warp's first row, whose group its REP rows share
        rows = wrow + c4
        grp = wrow >> group_shift
        if EVEN_N and EVEN_K:
            words = gl.load(qweight_ptr + rows * N + n)
            s = gl.load(scales_ptr + grp * N + n).to(gl.float32)
            if HAS_ZEROS:
                z = gl.load(zeros_ptr + grp * N + n).to(gl.int32)
        else:  # past N: no words; past K: words 0 and x 0 (a masked row adds nothing)
            wmask = (n < N) & (rows < row_end)
            smask = (n < N) & (wrow < row_end)
            words = gl.load(qweight_ptr + rows * N + n, mask=wmask, other=0)
            s = gl.load(scales_ptr + grp * N + n, mask=smask, other=0.0).to(gl.float32)
            if HAS_ZEROS:
                z = gl.load(zeros_ptr + grp * N + n, mask=smask, other=0).to(gl.int32)
        if not HAS_ZEROS:
            z = gl.full([8, 4, WK, 1], 8, gl.int32, L)
        xv = gl.load(x_ptr + g * stride_x + rows * 4 + i4, mask=token & (rows < row_end) & (i4 >= 0), other=0)
        # The zero terms as 16-bit pairs, once per warp and step (int32 wrap-around keeps the bits).
        if IS_F16:
            zc = (0xE400 + z) | ((0xE400 + z) << 16)  # -(1024 + z) twice
            zf = (0xD400 + 16 * z) | ((0xD400 + 16 * z) << 16)  # -(64 + z) twice
            d = gl.inline_asm_elementwise(_MMA_F16, "=f,=f,=f,=f" + ",r" * 16, [words, xv, zc, zf],
                                          dtype=gl.float32, is_pure=True, pack=4)
        else:
            zc = (0x4300 + z) | ((0x4300 + z) << 16)  # 128 + z twice
            d = gl.inline_asm_elementwise(_MMA_BF16, "=f,=f,=f,=f" + ",r" * 12, [words, xv, zc],
                                          dtype=gl.float32, is_pure=True, pack=4)
        acc += d * s
    # Token 0's sums sit in lanes t = 0; the other lanes hold D's zero columns, so summing over the
    # K axis (lanes t, registers j, warps w) adds only zeros to them.
    y = gl.sum(gl.sum(acc, axis=3), axis=2)
    n2 = pid_n * 32 + 4 * gl.expand_dims(r, 1) + gl.expand_dims(i, 0)
    out = out_ptr + pid_k * stride_split + n2
    if EVEN_N:
        gl.store(out, y.to(out_ptr.dtype.element_ty))
    else:
        gl.store(out, y.to(out_ptr.dtype.element_ty), mask=n2 < N)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def capable(device: torch.device) -> bool:
    """An sm_90 GPU (where it was measured; mma.sync itself exists from sm_80)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


# What shape_ok and pointers_ok ask for, in words (triton_w4a16's refusal messages).
NEEDS_SHAPE = "M = 1, fp16/bf16 x and K % 8 == 0"
NEEDS_POINTERS = "it reads x as int32 pairs: x needs unit stride and an even storage offset"


def shape_ok(M: int, N: int, K: int, dtype: torch.dtype) -> bool:
    """One token, 16-bit x, K a whole number of 8-code words (x is read as int32 pairs by word row)."""
    return M == 1 and dtype in (torch.float16, torch.bfloat16) and K % 8 == 0 and N > 0


def pointers_ok(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """x's row can be viewed as int32 pairs (unit stride, even offset); any qweight will do."""
    return x.stride(1) == 1 and x.storage_offset() % 2 == 0


def split_rule(N: int, K: int, sms: int, warps_k: int = 4, rows_per_lane: int = 2) -> int:
    """K splits so that ~WAVES CTAs of 32 features run per SM (4096x4096: 8, 6144x4096: 6,
    28672x4096: 1), at most SPLIT_MAX and one step of rows each."""
    programs = triton.cdiv(N, BLOCK_N)
    steps = triton.cdiv(K // 8, 4 * warps_k * rows_per_lane)
    return max(1, min(SPLIT_MAX, steps, round(WAVES * sms / programs)))


def w4a16_gemv_mma(x, qweight, scales, zeros, in_features, group_size, out, *, warps_k=4, rows_per_lane=2,
                   split_k=None):
    """``out [1, N] = x [1, K] @ dequant(W).T`` (checked by the caller with ``capable``/``shape_ok``/
    ``pointers_ok``); ``group_size`` is the effective one (K_pad for -1). ``warps_k``: warps per CTA,
    each on its own rows; ``rows_per_lane``: word rows per lane per step (REP, capped so that a warp's
    rows stay in one group); ``split_k``: None for ``split_rule``."""
    N, K = out.shape[1], in_features
    k_rows = K // 8
    per_channel = group_size >= K
    rep = rows_per_lane if per_channel else max(1, min(rows_per_lane, group_size // 32))
    kw = 4 * rep * warps_k
    steps = triton.cdiv(k_rows, kw)
    if split_k is None:
        split_k = split_rule(N, K, torch.cuda.get_device_properties(x.device).multi_processor_count, warps_k, rep)
    per = triton.cdiv(steps, max(1, min(split_k, steps)))
    split_k = triton.cdiv(steps, per)
    target = splitk_target(out, split_k)
    pdl = use_pdl(x.device)
    x32 = x.view(torch.int32)
    w4a16_gemv_mma_kernel[(triton.cdiv(N, BLOCK_N), split_k)](
        x32, qweight, scales, zeros if zeros is not None else scales, target, 1, N, k_rows, x32.stride(0), N, per * kw,
        30 if per_channel else (group_size // 8).bit_length() - 1,
        HAS_ZEROS=zeros is not None, IS_F16=x.dtype == torch.float16, REP=rep, WK=warps_k,
        EVEN_N=N % BLOCK_N == 0, EVEN_K=k_rows % kw == 0, PDL_WAIT=pdl, PDL_TRIGGER=pdl and split_k > 1,
        num_warps=warps_k, **launched_early(pdl))
    splitk_finish(target, out, pdl and split_k > 1)
    return out
