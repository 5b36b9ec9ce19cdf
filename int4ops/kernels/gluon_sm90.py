"""Fused W4A16 GEMM for Hopper (sm_90), written in Gluon (``triton.experimental.gluon``).

Plain Triton could not overlap the int4 unpacking with the tensor cores on triton 3.6 (notes item 25),
so dequantize + cuBLAS was the large-M path, paying 2 bytes per weight of extra traffic. This kernel
never materialises W in 16 bits:

    out^T [BN features, BM tokens] = deq(W) [BN, BK] @ x^T [BK, BM]      (wgmma, fp32 accumulators)

    producer warp (worker partition, 24 registers)        consumers: 8 warps = 2 warpgroups (default)
    ------------------------------------------------      --------------------------------------------
    wait empty[s]                                          wait ready[s]
    TMA x tile   [BM, BK] (128B swizzle) -> x_smem[s]      words of w_smem[s] -> dequantize -> A registers
    TMA word tile [BK/8, BN] (no swizzle) -> w_smem[s]     wgmma(A regs, x_smem[s]^T), keep one in flight
    ready[s] completes when both landed                    arrive empty[s'] for the wgmma just retired

Why each piece is the way it is (measurements: notes/triton_kernels.md items 27-28):

* W is the wgmma A operand from REGISTERS: dequantized values written to shared memory inside the
  loop make ptxas serialise every wgmma (it cannot prove the generic stores do not alias an
  in-flight wgmma's operands).
* In the 16-bit A-operand layout a thread holds k pairs (2c, 2c+1) + 8j with c = lane % 4, i.e.
  byte c of packed word k // 8 (int4ops.format: 8 codes per word along k, lowest nibble first).
  So the kernel works on a [BN, BK/2] tensor of PAIRS laid out as the 32-bit A operand (k_width 1):
  one packed word per pair, and x needs no permutation.
* One inline-asm step per pair (fp16: 4 instructions for 2 weights):
      prmt  byte c -> bytes 0 and 2          lop3  keep bits 0-3 and 20-23, OR 0x6400 in both halves
      fma   (1024 + q_lo, 1024 + 16 q_hi) * (1, 1/16) - (1024 + z, 64 + z) = (q - z) exactly
      mul   by the group's scale (in x's dtype): W is rounded to x's dtype once, as dequantize + cuBLAS does.
  bf16 has no mantissa room for 16 q (bit 7 of the high half is its exponent's lowest bit), so its
  high half takes no magic: bits 16 q read as a bf16 are 16 q * 2^-133 for every q, because the
  subnormals (exponent field 0) and the first normal binade (field 1) have the same spacing. The
  same 4 instructions then do it exactly, with other constants:
      lop3  keep bits 0-3 and 20-23, OR 0x4300 in the low half only        -> (128 + q_lo, q_hi 2^-129)
      fma   * (1, 2^127) - (128 + z, z / 4) = (q_lo - z, (q_hi - z) / 4)    (bf16 keeps subnormals)
      mul   by (s, 4 s): the same rounding as (q - z) s, the 4 being a power of two (s < 2^126)
  (It was 5: prmt, x 0x1001 to move the high nibble to bits 16-19, lop3, sub, mul; 10-14% slower
  than fp16 at 24-32 tokens, where this loop is bound by its dequantization.)
* The word tile comes by TMA with no swizzle, which lands plain row-major; it is read through a
  reinterpreted plain shared layout (read through the NVMMA view it came back wrong on triton 3.6).
* Warp specialisation: a producer warp runs the TMA ring ahead on its own (ready/empty mbarriers),
  so the consumers only wait for data, dequantize and issue wgmmas. The two consumer warpgroups
  share one partition: as two partitions ptxas ran the second one's code at a lower register
  budget and serialised its wgmmas.
* A register-A wgmma reads its registers until the wait that retires it, and nothing tells ptxas
  so: with one wgmma in flight the next tile's A could land in the same registers (garbage). The
  K loop is unrolled by two with two A register sets, each handed to the wait that retires its
  wgmma as a dependency.
* Persistent: one CTA per SM walks its work units; the producer runs on into the next unit while
  the consumers store the last one.
* Split K (``plan``): up to M = 256 one token tile covers all rows, so there are only N / 128
  tiles; each is split along K into units that run on different SMs. Their fp32 partials meet in
  the kernel (``_store_split``): the tile's last CTA to finish sums them in split order, so no
  second launch, and the same result whichever CTA came last.
* Scales and zero points come by TMA in the same ring slot as the words: the K-tile's group row
  ([1, BN]; two rows at group 32), read back from shared memory. Loaded from global memory
  instead (a row vector a K-tile ahead), their latency bound the K loop at 8-64 tokens, where the
  wgmmas are short: 1.1-1.8x slower (notes item 30). That path remains for scale or zero-point
  rows TMA cannot address (row strides not a multiple of 16 bytes: N % 8 for 16-bit scales,
  N % 16 for the zero bytes).

Requirements (``capable``, ``shape_ok``, ``pointers_ok``; triton_w4a16 falls back to the plain-Triton
choice otherwise): an sm_90 GPU, fp16/bf16 x, K % 8 == 0 and N % 4 == 0 (TMA strides are 16-byte
multiples), 16-byte aligned x and qweight. Gluon kernels do not run under TRITON_INTERPRET: the CPU
suite checks the launch plan and that the kernel compiles for sm_90 without serialised wgmmas; its
results are checked against the reference on the GPU (tests/test_triton_kernels.py, marked gpu).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# Names that moved between triton 3.6 (the device image) and 3.9 (CI); the old names raise in 3.9.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_reinterpret = getattr(gl.shared_memory_descriptor, "reinterpret", None) or gl.shared_memory_descriptor._reinterpret
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


def _deq_asm(ty: str, k: int, magic: int) -> gl.constexpr:
    """One pair's dequantization (the docstring's 4 steps), fp16 and bf16 differing in constants.
    $2: the pair's packed word; $3: prmt selector; $4: the zero term; $5: the scale pair;
    k: the fma's multipliers; magic: what lop3 ORs in."""
    return gl.constexpr(f"""{{
.reg .b32 r, k;
mov.b32 k, 0x{k:08X};
prmt.b32 r, $2, 0, $3;
lop3.b32 r, r, 0x00F0000F, 0x{magic:08X}, 0xEA;
fma.rn.{ty} r, r, k, $4;
mul.rn.{ty} r, r, $5;
mov.b32 {{$0, $1}}, r;
}}""")


_DEQ_F16 = _deq_asm("f16x2", 0x2C003C00, 0x64006400)  # (1, 1/16); 1024 magic in both halves
_DEQ_BF16 = _deq_asm("bf16x2", 0x7F003F80, 0x00004300)  # (1, 2^127); 128 magic in the low half only

# bf16's zero term and scale pair from z ($2) and the scale's bits ($3).
_ZS_BF16 = gl.constexpr("""{
.reg .b32 t, k, c;
mad.lo.u32 t, $2, 0x10001, 0x43004300;
mov.b32 k, 0xBE80BF80;
mov.b32 c, 0x42000000;
fma.rn.bf16x2 $0, t, k, c;
mul.lo.u32 t, $3, 0x10001;
mov.b32 k, 0x40803F80;
mul.rn.bf16x2 $1, t, k;
}""")

BN, BM, BK = 128, 256, 64  # features x tokens x k per tile at large M (see plan for the others)
SMALL_M = 256  # up to here one token tile of the smallest wgmma width >= M, K split across CTAs
SPLIT_MAX = 16  # K splits per tile at most
UNIT_BYTES = 64 * 1024  # a work unit's fixed cost, in bytes streamed (small_m_split)
MAX_TICKETS = 1 << 16  # split tiles per launch
PRODUCER_REGS = 24
MAXNREG = 168  # 12 warps (8 + 1, rounded to warpgroups) x 168 fills the register file at launch


@gluon.constexpr_function
def _mma_layout(bm, warps):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, bm, 16])


@gluon.constexpr_function
def _split_pair_axis(ll, bn, bk):
    """The [BN, BK/2] pair layout as a [BN, BK/8, 4] layout (pair p = 4 * word + byte)."""
    def f(bases):
        return [[b[0], b[1] >> 2, b[1] & 3] for b in bases]
    return gl.DistributedLinearLayout(f(ll.reg_bases), f(ll.lane_bases), f(ll.warp_bases), f(ll.block_bases),
                                      [bn, bk // 8, 4])


@gluon.jit
def _tile_offsets(t, M, N, n_tile0, BN: gl.constexpr, BM: gl.constexpr, TOKENS_FAST: gl.constexpr):
    """Tile t's first token and feature. Consecutive tiles share the smaller operand's slice."""
    if TOKENS_FAST:
        num_m = gl.cdiv(M, BM)
        return (t % num_m) * BM, (n_tile0 + t // num_m) * BN
    else:
        num_n = gl.cdiv(N, BN)
        return (t // num_n) * BM, (n_tile0 + t % num_n) * BN


@gluon.jit
def _unit(u, split, k_per_split, num_k):
    """Work unit u: K-tiles [k0, k1) of tile t (split sp of it); a tile's splits are consecutive
    units, so the CTAs sharing a tile run in the same wave."""
    t = u // split
    sp = u % split
    k0 = sp * k_per_split
    k1 = gl.minimum(k0 + k_per_split, num_k)
    return t, sp, k0, k1


@gluon.constexpr_function
def _stage_bytes(x_desc, w_desc, s_desc, z_desc, scales_tma, has_zeros):
    """Bytes TMA brings into one ring slot (the ready barrier's expected count)."""
    n = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    if scales_tma:
        n += s_desc.block_type.nbytes + (z_desc.block_type.nbytes if has_zeros else 0)
    return n


@gluon.jit
def _producer(x_desc, w_desc, s_desc, z_desc, x_smem, w_smem, s_smem, z_smem, ready, empty, M, N, num_tiles, n_tile0,
              num_k, split, k_per_split, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, SCALES_TMA: gl.constexpr,
              BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, TOKENS_FAST: gl.constexpr):
    nbytes: gl.constexpr = _stage_bytes(x_desc, w_desc, s_desc, z_desc, SCALES_TMA, HAS_ZEROS)
    c = 0  # ring position, continued across units
    for u in range(gl.program_id(0), num_tiles * split, gl.num_programs(0)):
        t, sp, k0, k1 = _unit(u, split, k_per_split, num_k)
        off_m, off_n = _tile_offsets(t, M, N, n_tile0, BN, BM, TOKENS_FAST)
        for i in range(k0, k1):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(ready.index(s), nbytes)
            # Past K (and N, M) TMA fills zeros, so an even number of K-tiles costs nothing extra.
            _tma_load(x_desc, [off_m, i * BK], ready.index(s), x_smem.index(s))
            _tma_load(w_desc, [i * (BK // 8), off_n], ready.index(s), w_smem.index(s))
            if SCALES_TMA:  # the K-tile's rows of scales (and zero points) ride in the same stage
                _tma_load(s_desc, [(i * BK) // GROUP, off_n], ready.index(s), s_smem.index(s))
                if HAS_ZEROS:
                    _tma_load(z_desc, [(i * BK) // GROUP, off_n], ready.index(s), z_smem.index(s))
            c += 1


@gluon.jit
def _pack_scales_zeros(s, z, DTYPE: gl.constexpr):
    """A scale and zero point as the pair asm's operands (2 x 16 bits in an int32 each): the zero
    term, and the scale in x's dtype (fp16: twice; bf16: s and 4 s, for the high half's 1/4)."""
    sb = s.to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    if DTYPE == gl.float16:
        zz = (0xE400 + z) | ((0xD400 + 16 * z) << 16)  # -(1024 + z), -(64 + z) in fp16
        ss = sb | (sb << 16)
    else:  # -(128 + z), -z / 4 = (128 + z) * (-1, -1/4) + (0, 32), exact; (s, 4 s)
        zz, ss = gl.inline_asm_elementwise(_ZS_BF16, "=r,=r,r,r", [z, sb], dtype=(gl.int32, gl.int32), is_pure=True,
                                           pack=1)
    return zz, ss


@gluon.jit
def _scales_zeros(s_ptr, z_ptr, i, off_n, N, G, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, BK: gl.constexpr,
                  BN: gl.constexpr, DTYPE: gl.constexpr, PAIR: gl.constexpr):
    """K-tile i's zero terms and scales from global memory (where TMA cannot fetch them: row
    strides not a multiple of 16 bytes): a row vector when one group covers the tile, else one
    value per pair."""
    n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, PAIR))
    nmask = n < N
    if GROUP % BK == 0:  # one group per tile: a row vector
        g = (i * BK) // GROUP
        sm = nmask & (g < G)
        s = gl.load(s_ptr + g * N + n, mask=sm, other=0.0)
        if HAS_ZEROS:
            z = gl.load(z_ptr + g * N + n, mask=sm, other=0).to(gl.int32)
        else:
            z = gl.full([BN], 8, gl.int32, gl.SliceLayout(1, PAIR))
        zz, ss = _pack_scales_zeros(s, z, DTYPE)
        return gl.expand_dims(zz, 1), gl.expand_dims(ss, 1)
    else:  # several groups per tile: one value per pair
        p = gl.arange(0, BK // 2, layout=gl.SliceLayout(0, PAIR))
        g = (i * BK + 2 * p) // GROUP
        off = g[None, :] * N + n[:, None]
        sm = nmask[:, None] & (g < G)[None, :]
        s = gl.load(s_ptr + off, mask=sm, other=0.0)
        if HAS_ZEROS:
            z = gl.load(z_ptr + off, mask=sm, other=0).to(gl.int32)
        else:
            z = gl.full([BN, BK // 2], 8, gl.int32, PAIR)
        return _pack_scales_zeros(s, z, DTYPE)


@gluon.jit
def _slot_row(s_rows, z_rows, r: gl.constexpr, HAS_ZEROS: gl.constexpr, BN: gl.constexpr, DTYPE: gl.constexpr,
              ROWS: gl.constexpr):
    """Row r of a ring slot's scales (and zero points), packed for the pair asm, as a column."""
    s = s_rows.slice(r * BN, BN).load(ROWS)
    if HAS_ZEROS:
        z = z_rows.slice(r * BN, BN).load(ROWS).to(gl.int32)
    else:
        z = gl.full([BN], 8, gl.int32, ROWS)
    zz, ss = _pack_scales_zeros(s, z, DTYPE)
    return gl.expand_dims(zz, 1), gl.expand_dims(ss, 1)


@gluon.jit
def _scales_zeros_smem(s_smem, z_smem, st, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, BK: gl.constexpr,
                       BN: gl.constexpr, DTYPE: gl.constexpr, PAIR: gl.constexpr):
    """Ring slot st's zero terms and scales, which TMA brought with the words: SROWS = BK // GROUP
    rows (group 32) or one. Shared-memory reads, where the global loads' latency (one round trip
    per K-tile) bound the K loop at 8-64 tokens (notes item 29)."""
    ROWS: gl.constexpr = gl.SliceLayout(1, PAIR)
    SROWS: gl.constexpr = s_smem.shape[1]
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # the rows back to back, as TMA wrote them
    s_rows = _reinterpret(s_smem.index(st), s_smem.dtype, [SROWS * BN], plain)
    z_rows = _reinterpret(z_smem.index(st), z_smem.dtype, [SROWS * BN], plain) if HAS_ZEROS else s_rows
    zz, ss = _slot_row(s_rows, z_rows, 0, HAS_ZEROS, BN, DTYPE, ROWS)
    if SROWS > 1:  # group 32: pairs p < 16 take row 0, the others row 1
        zz1, ss1 = _slot_row(s_rows, z_rows, 1, HAS_ZEROS, BN, DTYPE, ROWS)
        second = gl.expand_dims(gl.arange(0, BK // 2, layout=gl.SliceLayout(0, PAIR)) >= GROUP // 2, 0)
        zz = gl.where(second, zz1, zz)
        ss = gl.where(second, ss1, ss)
    return zz, ss


@gluon.jit
def _a_operand(x_desc, w_smem, s_smem, z_smem, ready, c, sel, zz, ss, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr,
               SCALES_TMA: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, L3: gl.constexpr,
               PAIR: gl.constexpr, DOT: gl.constexpr):
    """Wait for ring slot c, dequantize its words straight into the wgmma A-operand registers
    (with the slot's own scales under SCALES_TMA, else with zz, ss loaded by the caller)."""
    st = c % STAGES
    mbarrier.wait(ready.index(st), (c // STAGES) & 1)
    if SCALES_TMA:
        zz, ss = _scales_zeros_smem(s_smem, z_smem, st, GROUP, HAS_ZEROS, BK, BN, x_desc.dtype, PAIR)
    plain = _reinterpret(w_smem.index(st), gl.int32, [BK // 8, BN], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    # Each thread reads the words of its pairs once; the 4 lanes of a quad read the same word.
    words = plain.permute((1, 0)).load(gl.SliceLayout(2, L3))
    w3 = gl.expand_dims(words, 2) + gl.zeros([BN, BK // 8, 4], gl.int32, L3)
    w = gl.convert_layout(gl.reshape(w3, [BN, BK // 2]), PAIR)
    if x_desc.dtype == gl.float16:
        lo, hi = gl.inline_asm_elementwise(_DEQ_F16, "=h,=h,r,r,r,r", [w, sel, zz, ss],
                                           dtype=(x_desc.dtype, x_desc.dtype), is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise(_DEQ_BF16, "=h,=h,r,r,r,r", [w, sel, zz, ss],
                                           dtype=(x_desc.dtype, x_desc.dtype), is_pure=True, pack=1)
    return gl.convert_layout(gl.reshape(gl.join(lo, hi), [BN, BK]), DOT)


@gluon.jit
def _store_out(acc, out_ptr, off_m, off_n, M, N, stride_om, BN: gl.constexpr, BM: gl.constexpr, OUT: gl.constexpr):
    o = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), OUT)
    n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))
    m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT))
    gl.store(out_ptr + m[None, :] * stride_om + n[:, None], o, mask=(n < N)[:, None] & (m < M)[None, :])


@gluon.jit
def _store_split(acc, ws_ptr, cnt_ptr, out_ptr, t, sp, split, off_m, off_n, M, N, stride_om, BN: gl.constexpr,
                 BM: gl.constexpr, MMA: gl.constexpr, OUT: gl.constexpr):
    """Split-K epilogue without a second launch: each split stores its fp32 partial in the
    accumulator's own layout (no shuffle) and takes a ticket; the tile's last arrival sums the
    partials in split order (so the result does not depend on who came last), stores the tile
    and resets the ticket for the next call. CUTLASS's semaphore pattern: a CTA barrier orders
    every thread's stores before thread 0's release (the atomic), and the atomic's result
    reaches the other threads through a barrier after thread 0's acquire."""
    r = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    k = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    offs = r[:, None] * BM + k[None, :]
    tile_ws = ws_ptr + t * split * (BN * BM)
    gl.store(tile_ws + sp * (BN * BM) + offs, acc)
    _barrier()
    ticket = gl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu")
    if ticket == split - 1:
        tot = gl.zeros([BN, BM], gl.float32, MMA)
        for s in range(split):  # .cg: from L2, where the other CTAs' partials are, not this SM's L1
            tot += gl.load(tile_ws + s * (BN * BM) + offs, cache_modifier=".cg")
        gl.store(cnt_ptr + t, 0)
        _store_out(tot, out_ptr, off_m, off_n, M, N, stride_om, BN, BM, OUT)


@gluon.jit
def _consumer(x_desc, w_desc, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, x_smem, w_smem, s_smem, z_smem, ready, empty, M,
              N, G, stride_om, num_tiles, n_tile0, num_k, split, k_per_split, GROUP: gl.constexpr,
              HAS_ZEROS: gl.constexpr, SCALES_TMA: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr, BK: gl.constexpr,
              STAGES: gl.constexpr, TOKENS_FAST: gl.constexpr, SPLIT_K: gl.constexpr):
    DTYPE: gl.constexpr = x_desc.dtype
    MMA: gl.constexpr = _mma_layout(BM, gl.num_warps())
    DOT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    PAIR: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
    L3: gl.constexpr = _split_pair_axis(gl.to_linear_layout(PAIR, [BN, BK // 2]), BN, BK)
    OUT: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, gl.num_warps()], [0, 1])  # features fastest

    # prmt selector of a pair: its byte c = lane % 4 -> bytes 0 and 2, zeros elsewhere.
    c4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))) * 0x101 + 0x4040
    sel3 = gl.expand_dims(gl.expand_dims(c4, 0), 1) + gl.zeros([BN, BK // 8, 4], gl.int32, L3)
    sel = gl.convert_layout(gl.reshape(sel3, [BN, BK // 2]), PAIR)

    c = 0  # ring position, continued across units (the producer counts the same way)
    for u in range(gl.program_id(0), num_tiles * split, gl.num_programs(0)):
        t, sp, k0, k1 = _unit(u, split, k_per_split, num_k)
        off_m, off_n = _tile_offsets(t, M, N, n_tile0, BN, BM, TOKENS_FAST)
        acc = gl.zeros([BN, BM], gl.float32, MMA)
        a1 = gl.zeros([BN, BK], DTYPE, DOT)
        zz, ss = 0, 0  # under SCALES_TMA _a_operand reads them from its ring slot
        if not SCALES_TMA:  # from global memory, a K-tile ahead
            zz, ss = _scales_zeros(s_ptr, z_ptr, k0, off_n, N, G, GROUP, HAS_ZEROS, BK, BN, DTYPE, PAIR)
        for i in range(k0, k1, 2):
            # Two K-tiles per trip, A register sets a0 and a1: each is a dependency of the wait that
            # retires its wgmma, so the next tile's A cannot land in registers a wgmma still reads.
            j = c + i - k0  # ring position of K-tile i
            a0 = _a_operand(x_desc, w_smem, s_smem, z_smem, ready, j, sel, zz, ss, GROUP, HAS_ZEROS, SCALES_TMA, BN,
                            BK, STAGES, L3, PAIR, DOT)
            if not SCALES_TMA:
                zz, ss = _scales_zeros(s_ptr, z_ptr, i + 1, off_n, N, G, GROUP, HAS_ZEROS, BK, BN, DTYPE, PAIR)
            acc = warpgroup_mma(a0, x_smem.index(j % STAGES).permute((1, 0)), acc, is_async=True)
            acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))  # retires K-tile i - 1
            mbarrier.arrive(empty.index((j + STAGES - 1) % STAGES), pred=i > k0)

            a1 = _a_operand(x_desc, w_smem, s_smem, z_smem, ready, j + 1, sel, zz, ss, GROUP, HAS_ZEROS, SCALES_TMA,
                            BN, BK, STAGES, L3, PAIR, DOT)
            if not SCALES_TMA:
                zz, ss = _scales_zeros(s_ptr, z_ptr, i + 2, off_n, N, G, GROUP, HAS_ZEROS, BK, BN, DTYPE, PAIR)
            acc = warpgroup_mma(a1, x_smem.index((j + 1) % STAGES).permute((1, 0)), acc, is_async=True)
            acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))  # retires K-tile i
            mbarrier.arrive(empty.index(j % STAGES))
        acc, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1))
        c += k1 - k0
        mbarrier.arrive(empty.index((c - 1) % STAGES))

        if SPLIT_K:
            _store_split(acc, ws_ptr, cnt_ptr, out_ptr, t, sp, split, off_m, off_n, M, N, stride_om, BN, BM, MMA, OUT)
        else:
            _store_out(acc, out_ptr, off_m, off_n, M, N, stride_om, BN, BM, OUT)


@gluon.jit
def w4a16_gemm_sm90_kernel(x_desc, w_desc, s_desc, z_desc, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, G, stride_om,
                           num_tiles, n_tile0, num_k, split, k_per_split, GROUP: gl.constexpr,
                           HAS_ZEROS: gl.constexpr, SCALES_TMA: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr,
                           BK: gl.constexpr, STAGES: gl.constexpr, TOKENS_FAST: gl.constexpr, SPLIT_K: gl.constexpr,
                           PRODUCER_REGS: gl.constexpr):
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BK // 8, BN], w_desc.layout)
    if SCALES_TMA:
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    else:  # s_desc and z_desc stand in for nothing (the launcher passes w_desc): a small unused slot
        s_smem = gl.allocate_shared_memory(s_desc.dtype, [1, 1, BN], s_desc.layout)
    if SCALES_TMA and HAS_ZEROS:
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
    else:
        z_smem = gl.allocate_shared_memory(z_desc.dtype, [1, 1, BN], z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize([
        (_consumer, (x_desc, w_desc, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, x_smem, w_smem, s_smem, z_smem, ready,
                     empty, M, N, G, stride_om, num_tiles, n_tile0, num_k, split, k_per_split, GROUP, HAS_ZEROS,
                     SCALES_TMA, BN, BM, BK, STAGES, TOKENS_FAST, SPLIT_K)),
        (_producer, (x_desc, w_desc, s_desc, z_desc, x_smem, w_smem, s_smem, z_smem, ready, empty, M, N, num_tiles,
                     n_tile0, num_k, split, k_per_split, GROUP, HAS_ZEROS, SCALES_TMA, BN, BM, BK, STAGES,
                     TOKENS_FAST)),
    ], [1], [PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def capable(device: torch.device) -> bool:
    """An sm_90 GPU (wgmma and TMA as this kernel uses them exist on sm_90 only)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


# What shape_ok and pointers_ok ask for, in words (triton_w4a16's refusal messages).
NEEDS_SHAPE = "fp16/bf16 x, K % 8 == 0 and N % 4 == 0"
NEEDS_POINTERS = "TMA needs x and qweight 16-byte aligned with 16-byte row strides"


def shape_ok(M: int, N: int, K: int, dtype: torch.dtype) -> bool:
    """Shapes and dtypes the kernel takes: TMA needs 16-byte row strides (K % 8 for x, N % 4 for
    the words), wgmma 16-bit operands."""
    return dtype in _GL_DTYPES and K % 8 == 0 and N % 4 == 0 and M > 0 and N > 0


def pointers_ok(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """TMA base addresses must be 16-byte aligned (a sliced tensor may not be)."""
    return _tma_ok(x) and _tma_ok(qweight)


class Launch(NamedTuple):
    """One kernel launch: token tile, its feature tiles [n_tile0, n_tile0 + n_tiles), and K split
    into ``split`` runs of ``k_per_split`` K-tiles (even: the K loop does two a trip)."""
    bm: int
    n_tile0: int
    n_tiles: int
    split: int = 1
    k_per_split: int = 0


def _k_split(num_k: int, split: int) -> tuple[int, int]:
    """(split, K-tiles per split) with an even number of K-tiles per split and none empty."""
    kps = 2 * triton.cdiv(num_k, 2 * max(1, split))
    return triton.cdiv(num_k, kps), kps


def small_m_split(M: int, N: int, num_k: int, sms: int, bm: int) -> int:
    """Splits of K for ``bm``-token tiles (one tile of tokens up to M = 256): the fewest bytes per
    CTA. A CTA walks ceil(units / SMs) units; each streams its K-tiles (words and x), writes an
    fp32 partial when split that the tile's last CTA reads back (at 64 tokens as much as 16
    K-tiles of words), and pays a fixed cost (ring fill, epilogue, ticket: ~2.4 us in a
    least-squares fit) counted as ``UNIT_BYTES``. Forced splits 1-16 at M = 1-256 on five layers
    (H100, bench/results/gluon_sm90_tma_scales_lab_h100_2026-11-23.json): with any fixed cost from
    32 to 192 KB the rule picks the fastest split, or one within 2% of it, on all 30; without it,
    6144x4096 at M = 1 and 16 split 8 ways instead of 2 (20-32% slower) and the 28672-feature
    layers 4 ways instead of 1 (5-25%)."""
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, BN)
    k_tile_bytes = BK // 8 * BN * 4 + bm * BK * 2
    partial_bytes = 2 * BN * bm * 4  # stored once, read back once
    best, best_cost = 1, float("inf")
    for split in range(1, min(SPLIT_MAX, num_k // 2) + 1):
        split, kps = _k_split(num_k, split)
        cost = triton.cdiv(tiles * split, sms) * (kps * k_tile_bytes + partial_bytes * (split > 1) + UNIT_BYTES)
        if cost < best_cost:
            best, best_cost = split, cost
    return best


@functools.lru_cache(maxsize=4096)
def plan(M: int, N: int, num_k: int, sms: int, split: int | None = None,
         block_m: int | None = None) -> tuple[Launch, ...]:
    """The launches of one call (cached: the split search costs ~0.3 ms a call on triton 3.9,
    whose ``triton.cdiv`` is a slow constexpr function on the host).

    M <= SMALL_M: one token tile, the smallest wgmma width >= M (8 to 256), K split so that the
    feature tiles x splits keep the SMs busy (``small_m_split``); the partial sums meet in the
    kernel. ``split``/``block_m`` force those (tests, tuning).
    Larger M: one persistent launch of 256-token tiles, except where its last wave would run under
    half full: those feature tiles then run as a second launch of 128-token tiles (twice the CTAs,
    half the work each). Splitting those tiles' K in two instead measured slower (notes item 29)."""
    num_n = triton.cdiv(N, BN)
    if M <= SMALL_M or split is not None or (block_m or BM) < BM:
        bm = block_m or min(BM, max(8, triton.next_power_of_2(M)))
        s, kps = _k_split(num_k, split if split is not None else small_m_split(M, N, num_k, sms, bm))
        return (Launch(bm, 0, num_n, s, kps),)
    num_m = triton.cdiv(M, BM)
    waves, rest = divmod(num_m * num_n, sms)
    n_split = waves * sms // num_m
    if _tokens_fast(M, N) and waves and 0 < 2 * rest <= sms and 0 < n_split < num_n:
        return Launch(BM, 0, n_split), Launch(128, n_split, num_n - n_split)
    return (Launch(BM, 0, num_n),)


def _tokens_fast(M: int, N: int) -> bool:
    """Walk token tiles first (CTAs in step share a weight tile) unless x is the larger operand."""
    return 4 * M <= N


def _stages(bm: int) -> int:
    """Ring depth: 4 at 256 tokens (5 measured no faster), 8 at 128; at 8-64 tokens 6: the fastest
    of 4-20 (within 0.1%) on 19 of 20 points (notes item 30), 0-3% ahead of 8, 0-17% ahead of 4."""
    if bm <= 64:
        return 6
    return max(2, min(8, (160 * 1024) // (bm * BK * 2 + BK // 8 * BN * 4)))


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can read: unit inner stride, 16-byte aligned base and row stride."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _rows_desc(t: torch.Tensor, group_size: int) -> TensorDescriptor:
    """TMA descriptor of the scale (or zero-point) rows one K-tile needs: BK // group rows for
    groups smaller than the tile (32), else one; plain row-major in shared memory (no swizzle)."""
    rows = max(1, BK // group_size)
    return TensorDescriptor.from_tensor(t, [rows, BN], gl.NVMMASharedLayout(0, 8 * t.element_size(), 2))


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device) -> torch.Tensor | None:
    """The split-K tickets of a device: zeroed once, reset by the kernel itself after each tile.
    None while a CUDA graph is being captured and they do not exist yet (a zero fill would be
    captured rather than run; the call then runs without a split). Calls on two streams of one
    device at once would share them: int4ops launches on the caller's stream, one call at a time."""
    t = _TICKETS.get(device)
    if t is None and not torch.cuda.is_current_stream_capturing():
        t = _TICKETS[device] = torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)
    return t


def w4a16_gemm_sm90(x, qweight, scales, zeros, in_features, group_size, out, block_m=None, split_k=None,
                    stages=None, scales_tma=None):
    """``out = x @ dequant(W).T`` (x [M, K] fp16/bf16 contiguous, checked by the caller with
    ``capable``/``shape_ok``/``pointers_ok``); ``group_size`` is the effective one (K_pad for -1).
    ``block_m``, ``split_k``: see ``plan``; ``stages``: the TMA ring's depth (None: chosen from the
    shape); ``scales_tma``: False loads scales and zero points with plain loads (None: TMA where
    their row strides and addresses allow it)."""
    M, N = x.shape[0], qweight.shape[1]
    k_tiles = triton.cdiv(qweight.shape[0] * 8, BK)
    num_k = k_tiles + (k_tiles & 1)  # the K loop does two tiles a trip; TMA zero-fills the extra one
    sms = _sm_count(x.device)
    w_desc = TensorDescriptor.from_tensor(qweight, [BK // 8, BN], gl.NVMMASharedLayout(0, 32, 2))
    zeros_arg = zeros if zeros is not None else scales
    if scales.shape[0] == 1:  # one group spans K (per-channel): any multiple of BK past K says so
        group_size = 1 << 30
    s_desc = z_desc = w_desc  # placeholders, unused without SCALES_TMA
    scales_tma = scales_tma is not False and _tma_ok(scales) and (zeros is None or _tma_ok(zeros))
    if scales_tma:
        s_desc = _rows_desc(scales, group_size)
        z_desc = _rows_desc(zeros, group_size) if zeros is not None else s_desc
    for launch in plan(M, N, num_k, sms, split_k, block_m):
        bm, tiles = launch.bm, triton.cdiv(M, launch.bm) * launch.n_tiles
        # Unsplit launches never touch the workspace or the tickets: out stands in for both pointers.
        split, kps, ws, tickets = launch.split, launch.k_per_split or num_k, out, out
        if split > 1:
            tickets = _tickets(x.device)
            if tickets is None or tiles > MAX_TICKETS:
                split, kps, tickets = 1, num_k, out
            else:
                ws = torch.empty(tiles * split * BN * bm, dtype=torch.float32, device=x.device)
        x_layout = gl.NVMMASharedLayout.get_default_for([bm, BK], _GL_DTYPES[x.dtype])
        x_desc = TensorDescriptor.from_tensor(x, [bm, BK], x_layout)
        w4a16_gemm_sm90_kernel[(min(sms, tiles * split), )](
            x_desc, w_desc, s_desc, z_desc, scales, zeros_arg, out, ws, tickets, M, N, scales.shape[0],
            out.stride(0), tiles, launch.n_tile0, num_k, split, kps, group_size, zeros is not None, scales_tma, BN, bm,
            BK, stages or _stages(bm), _tokens_fast(M, N), split > 1, PRODUCER_REGS, num_warps=8, maxnreg=MAXNREG)
    return out
