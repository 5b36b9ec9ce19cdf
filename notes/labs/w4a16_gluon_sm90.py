"""LAB (session 17, not part of the package): a fused large-M W4A16 GEMM for sm_90 in Gluon.

Status: correct on an H100 (triton 3.6) against the reference for fp16/bf16, groups 32/64/128/-1,
sym/asym, odd M/N/K; at M = 1024 it beats the shipped dequantize + cuBLAS path on three of the four
Llama-3-8B shapes (0.79-0.88x of cuBLAS; 0.85x, the target, on two of them with the better stage
count), loses on 6144x4096 and at M = 4096. Numbers, method and what was tried on the way:
notes/triton_kernels.md item 27 and
bench/results/gluon_large_m_lab_h100_2026-11-22_session17.json. Gluon kernels do not run under
TRITON_INTERPRET, so shipping this needs a GPU-only test path and the dequantize path kept as the
CPU/other-GPU route.

    out^T [BN features, BM tokens] = deq(W) [BN, BK] @ x^T [BK, BM],  fp32 accumulate (wgmma)

Design, and why each piece is the way it is:

* W goes to the tensor cores from REGISTERS (wgmma A operand). Dequantizing into shared memory
  instead (st.shared of the A tile) makes ptxas serialise every wgmma (a WARPGROUP.DEPBAR after each
  HGMMA: it cannot prove the generic-proxy stores do not alias an in-flight wgmma's operands), which
  left that version at ~0.5x of cuBLAS.
* In the 16-bit A-operand layout a thread holds k pairs (2c, 2c+1) + 8h + 16s with c = lane % 4,
  i.e. byte c of the packed words k // 8 (one word = 8 codes along k, lowest nibble first). So the
  kernel works on a [BN, BK/2] PAIR tensor laid out as the 32-bit A operand (k_width 1): one packed
  word per pair, no x permute, and one asm turns the byte into two dequantized 16-bit values
  (shl, 2 x lop3 for the 1024+q / 128+q magic, sub + mul in f16x2 / bf16x2).
* The packed words come through shared memory: cp.async (STAGES deep) into a plain row-major
  tile, read back once per thread-word in the pair layout with the byte axis (lane % 4) sliced off
  (the four lanes of a quad read the same word). Gathering them from global memory in the pair
  layout was latency-bound (0.62-0.74x); TMA into a 128B-swizzled tile was correct but slower
  (0.59-0.69x); TMA into a swizzle-0 NVMMA tile read back wrong data on triton 3.6.
* x comes by TMA (mbarrier per stage) and is the wgmma B operand straight from shared memory.
* A register-A wgmma reads its registers until the wait that retires it, and nothing tells ptxas
  so: with one wgmma in flight (wait(1)) the next tile's A was written into the same registers
  (garbage/NaN). The loop is unrolled by two with two named A sets (a0, a1) and each is handed to
  the wait that retires its wgmma as a dependency, which keeps them in different registers.
* Scales and zero points: one per row per tile when BK divides the group (a row vector, prefetched
  a tile ahead), else one per pair.

Run on the device (H100/H200, triton 3.6):  PYTHONPATH=$PWD python notes/labs/w4a16_gluon_sm90.py
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

# Names that moved between triton 3.6 (device) and 3.9 (the local one; the old names raise there).
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cp_async = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

# $2: the word shifted so the pair's byte is in bits 0-7; $3: (magic + z) x 2; $4: s x 2.
# Low nibble -> bits 0-3, high nibble -> bits 16-19, OR the magic exponent: (M + q_lo, M + q_hi).
_DEQ_PAIR = """{
.reg .b32 u, r;
shl.b32 u, $2, 12;
lop3.b32 r, $2, u, 0x0000FFFF, 0xE4;
lop3.b32 r, r, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 r, r, $3;
mul.f16x2 r, r, $4;
mov.b32 {$0, $1}, r;
}"""
_DEQ_PAIR_BF16 = gl.constexpr(_DEQ_PAIR.replace("0x64006400", "0x43004300").replace(
    "sub.f16x2", "sub.rn.bf16x2").replace("mul.f16x2", "mul.rn.bf16x2"))
_DEQ_PAIR_F16 = gl.constexpr(_DEQ_PAIR)


@gluon.constexpr_function
def _split_pair_axis(ll, BN, BK):
    """The [BN, BK/2] pair layout as a [BN, BK/8, 4] layout (pair p = 4 * word + byte)."""
    def f(bases):
        return [[b[0], b[1] >> 2, b[1] & 3] for b in bases]
    return gl.DistributedLinearLayout(f(ll.reg_bases), f(ll.lane_bases), f(ll.warp_bases), f(ll.block_bases),
                                      [BN, BK // 8, 4])


@gluon.jit
def _load_x(x_desc, x_smem, bars, i, off_m, num_k, BK: gl.constexpr, STAGES: gl.constexpr):
    s = i % STAGES
    pred = i < num_k  # tiles past K still land (TMA fills zeros) so the two-tile loop stays even
    mbarrier.expect(bars.index(s), x_desc.block_type.nbytes, pred=pred)
    _tma_load(x_desc, [off_m, i * BK], bars.index(s), x_smem.index(s), pred=pred)


@gluon.jit
def _copy_words(w_ptr, w_smem, i, off_n, N, K_pad, BK: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                CP: gl.constexpr):
    r = i * (BK // 8) + gl.arange(0, BK // 8, layout=gl.SliceLayout(1, CP))
    n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, CP))
    mask = (r < K_pad // 8)[:, None] & (n < N)[None, :]
    _cp_async(w_smem.index(i % STAGES), w_ptr + r[:, None] * N + n[None, :], mask=mask)
    async_copy.commit_group()


@gluon.jit
def _scales_zeros(s_ptr, z_ptr, i, off_n, N, G, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr,
                  BK: gl.constexpr, BN: gl.constexpr, MAGIC: gl.constexpr, DTYPE: gl.constexpr,
                  PAIR: gl.constexpr):
    """(magic + z) and s of tile i, each as two 16-bit copies in an int32, for the pair asm."""
    n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, PAIR))
    nmask = n < N
    if GROUP % BK == 0:  # one group per tile: a row vector
        g = (i * BK) // GROUP
        sm = nmask & (g < G)
        s = gl.load(s_ptr + g * N + n, mask=sm, other=0.0).to(DTYPE)
        if HAS_ZEROS:
            z = gl.load(z_ptr + g * N + n, mask=sm, other=0).to(gl.int32)
        else:
            z = gl.full([BN], 8, gl.int32, gl.SliceLayout(1, PAIR))
    else:  # several groups per tile: one value per pair
        p = gl.arange(0, BK // 2, layout=gl.SliceLayout(0, PAIR))
        g = (i * BK + 2 * p) // GROUP
        off = g[None, :] * N + n[:, None]
        sm = nmask[:, None] & (g < G)[None, :]
        s = gl.load(s_ptr + off, mask=sm, other=0.0).to(DTYPE)
        if HAS_ZEROS:
            z = gl.load(z_ptr + off, mask=sm, other=0).to(gl.int32)
        else:
            z = gl.full([BN, BK // 2], 8, gl.int32, PAIR)
    sb = s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    zb = z + MAGIC
    ss = sb | (sb << 16)
    zz = zb | (zb << 16)
    if GROUP % BK == 0:
        ss = gl.expand_dims(ss, 1)
        zz = gl.expand_dims(zz, 1)
    return zz, ss


@gluon.jit
def _pair_words(w_smem, st, BN: gl.constexpr, BK: gl.constexpr, L3: gl.constexpr, PAIR: gl.constexpr):
    """[BN, BK/2] in the pair layout: word k // 8 shifted so byte (pair % 4) is at the bottom."""
    words = w_smem.index(st).permute((1, 0)).load(gl.SliceLayout(2, L3))
    c8 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))) * 8
    w3 = gl.expand_dims(words, 2) >> gl.expand_dims(gl.expand_dims(c8, 0), 1)
    return gl.convert_layout(gl.reshape(w3, [BN, BK // 2]), PAIR)


@gluon.jit
def _a_operand(x_desc, w_smem, bars, i, zz, ss, DEQ: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
               STAGES: gl.constexpr, L3: gl.constexpr, PAIR: gl.constexpr, DOT: gl.constexpr):
    """Wait for K-tile i's stage, dequantize its words into the wgmma A-operand registers."""
    st = i % STAGES
    mbarrier.wait(bars.index(st), (i // STAGES) & 1)
    lo, hi = gl.inline_asm_elementwise(DEQ, "=h,=h,r,r,r", [_pair_words(w_smem, st, BN, BK, L3, PAIR), zz, ss],
                                       dtype=(x_desc.dtype, x_desc.dtype), is_pure=True, pack=1)
    return gl.convert_layout(gl.reshape(gl.join(lo, hi), [BN, BK]), DOT)


@gluon.jit
def _refill(x_desc, w_ptr, x_smem, w_smem, bars, i, off_m, off_n, N, K_pad, num_k, BK: gl.constexpr,
            BN: gl.constexpr, STAGES: gl.constexpr, CP: gl.constexpr):
    """After a wgmma wait(1): refill the stage of the wgmma it retired with K-tile i."""
    async_copy.wait_group(STAGES - 3)  # the next tile's words landed (this thread's copies) ...
    _cta_barrier()  # ... and everyone's; the retired wgmma is retired in every warpgroup: its stage is free
    _load_x(x_desc, x_smem, bars, i, off_m, num_k, BK, STAGES)
    _copy_words(w_ptr, w_smem, i, off_n, N, K_pad, BK, BN, STAGES, CP)


@gluon.jit
def w4a16_gemm_sm90(x_desc, w_ptr, s_ptr, z_ptr, out_ptr, M, N, G, K_pad, stride_om, num_k,
                    GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr, BN: gl.constexpr, BM: gl.constexpr,
                    BK: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    DTYPE: gl.constexpr = x_desc.dtype
    MAGIC: gl.constexpr = 0x6400 if DTYPE == gl.float16 else 0x4300  # 1024 + q / 128 + q
    DEQ: gl.constexpr = _DEQ_PAIR_F16 if DTYPE == gl.float16 else _DEQ_PAIR_BF16

    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    off_m = (pid % num_m) * BM  # the CTAs sharing a weight tile run together
    off_n = (pid // num_m) * BN
    num_k2 = (num_k + 1) // 2 * 2

    x_smem = gl.allocate_shared_memory(DTYPE, [STAGES, BM, BK], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BK // 8, BN], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    CP: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    for i in gl.static_range(STAGES - 1):
        _load_x(x_desc, x_smem, bars, i, off_m, num_k2, BK, STAGES)
        _copy_words(w_ptr, w_smem, i, off_n, N, K_pad, BK, BN, STAGES, CP)
    async_copy.wait_group(STAGES - 2)
    _cta_barrier()

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BM, 16])
    DOT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    PAIR: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=1)
    L3: gl.constexpr = _split_pair_axis(gl.to_linear_layout(PAIR, [BN, BK // 2]), BN, BK)
    acc = gl.zeros([BN, BM], gl.float32, mma_layout)
    a1 = gl.zeros([BN, BK], DTYPE, DOT)

    zz, ss = _scales_zeros(s_ptr, z_ptr, 0, off_n, N, G, GROUP, HAS_ZEROS, BK, BN, MAGIC, DTYPE, PAIR)
    for i in range(0, num_k2, 2):
        # Two K-tiles per trip, A register sets a0 and a1: each set is a dependency of the wait that
        # retires its wgmma, so the next tile's A cannot land in registers a wgmma still reads.
        a0 = _a_operand(x_desc, w_smem, bars, i, zz, ss, DEQ, BN, BK, STAGES, L3, PAIR, DOT)
        zz, ss = _scales_zeros(s_ptr, z_ptr, i + 1, off_n, N, G, GROUP, HAS_ZEROS, BK, BN, MAGIC, DTYPE, PAIR)
        acc = warpgroup_mma(a0, x_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))  # retires wgmma i-1 (read a1)
        _refill(x_desc, w_ptr, x_smem, w_smem, bars, i + STAGES - 1, off_m, off_n, N, K_pad, num_k2, BK, BN,
                STAGES, CP)

        a1 = _a_operand(x_desc, w_smem, bars, i + 1, zz, ss, DEQ, BN, BK, STAGES, L3, PAIR, DOT)
        zz, ss = _scales_zeros(s_ptr, z_ptr, i + 2, off_n, N, G, GROUP, HAS_ZEROS, BK, BN, MAGIC, DTYPE, PAIR)
        acc = warpgroup_mma(a1, x_smem.index((i + 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))  # retires wgmma i (read a0)
        _refill(x_desc, w_ptr, x_smem, w_smem, bars, i + STAGES, off_m, off_n, N, K_pad, num_k2, BK, BN,
                STAGES, CP)

    acc, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))

    OL: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])
    o = gl.convert_layout(acc.to(DTYPE), OL)
    n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, OL))
    m = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, OL))
    gl.store(out_ptr + m[None, :] * stride_om + n[:, None], o, mask=(n < N)[:, None] & (m < M)[None, :])


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def w4a16_matmul_sm90(x, qweight, scales, zeros, group_size, BN=128, BM=256, BK=64, STAGES=4, num_warps=8):
    """x [M, K] (fp16/bf16, K % 8 == 0 for TMA) @ dequant(W).T in the int4ops packed format."""
    M, K = x.shape
    N = qweight.shape[1]
    K_pad = qweight.shape[0] * 8
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(
        x, [BM, BK], gl.NVMMASharedLayout.get_default_for([BM, BK], _GL_DTYPES[x.dtype]))
    group = K_pad if group_size == -1 else group_size
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), )
    w4a16_gemm_sm90[grid](x_desc, qweight, scales, zeros if zeros is not None else scales, out, M, N,
                          scales.shape[0], K_pad, out.stride(0), triton.cdiv(K_pad, BK), group, zeros is not None,
                          BN, BM, BK, STAGES, num_warps=num_warps)
    return out


if __name__ == "__main__":
    from int4ops.quantize import quantize_rtn
    from int4ops.reference import w4a16_matmul_reference

    torch.manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        for M, N, K, g, sym in [(1024, 4096, 4096, 128, False), (1000, 4100, 4096, 128, False),
                                (77, 1000, 4096, 32, False), (300, 2048, 1000, -1, True),
                                (513, 384, 2048, 64, True), (256, 256, 192, 64, False)]:
            w = quantize_rtn(torch.randn(N, K, device="cuda", dtype=dt), group_size=g, sym=sym)
            x = torch.randn(M, K, device="cuda", dtype=dt)
            ref = w4a16_matmul_reference(x, w).float()
            for stages in (3, 4):
                y = w4a16_matmul_sm90(x, w.qweight, w.scales, w.zeros, g, STAGES=stages).float()
                err = ((y - ref).norm() / ref.norm()).item()
                print(f"{str(dt):15s} M={M} N={N} K={K} group={g} sym={sym} stages={stages}: rel err {err:.2e}")
