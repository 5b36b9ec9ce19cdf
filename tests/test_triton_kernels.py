"""The Triton W4A16 kernels (int4ops/kernels/triton_*.py) against the fp32 reference.

On a CPU-only machine the kernels run under the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so shapes here are small; ``gpu``-marked tests use real layer sizes.
Every test draws fresh random data; the seed is in each failure message.
"""

import json
import math
import os
import random

import pytest
import torch

from conftest import TOL, poisoned, rel_err
from int4ops import dequantize, quantize_rtn, w4a16_matmul_reference
from int4ops.format import Int4FormatError
from int4ops.kernels import triton_w4a16 as tw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not tw.available(DEVICE), reason=f"Triton cannot run on {DEVICE}")

KERNELS = ("gemv", "gemm", "dequant")


def make_problem(M, N, K, group_size, sym, dtype, scale_dtype=None, device=DEVICE, seed=None):
    seed = random.randrange(2**31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    w = quantize_rtn(torch.randn(N, K, generator=g), group_size, sym, scale_dtype=scale_dtype or dtype)
    w.qweight, w.scales = w.qweight.to(device), w.scales.to(device)
    w.zeros = None if w.zeros is None else w.zeros.to(device)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    return x, w, w4a16_matmul_reference(x.float(), w), seed


def args(x, w):
    return x, w.qweight, w.scales, w.zeros, w.in_features, w.group_size


def check_w_rounding_path(out, x, w, ref, dtype, what):
    """Paths that round W to x.dtype before a GEMM (``dequant``, the GEMM's folded scales at
    groups 32/64; a single N=1 output measured 2.2e-3 there). With many outputs the usual
    relative check applies (measured worst 4.2e-3 bf16 / 3.7e-4 fp16 at N >= 33). With few, a
    lone output whose terms cancel can miss it on a correct kernel, so each element is held
    to the rounding bound instead: |out - ref| <= 2 ulp * (|x| @ |W|.T), ulp = 2^-7 (bf16,
    which the interpreter rounds by truncation) or 2^-10 (fp16)."""
    if out.shape[1] >= 33:
        return check(out, ref, dtype, what)
    assert out.dtype == dtype and out.shape == ref.shape, what
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    bound = 2 * ulp * (x.float().abs() @ dequantize(w).abs().t())
    excess = ((out.float() - ref).abs() / bound).nan_to_num(math.inf).max().item()
    assert excess <= 1, f"{what}: an element is {excess:.2f}x its rounding bound"


def rounds_w(kernel, group_size, K):
    """Whether ``kernel`` rounds W to x.dtype before multiplying: dequant always, the GEMM at
    groups 32/64 (the scale folded into W)."""
    return kernel == "dequant" or (kernel == "gemm" and group_size in (32, 64) and group_size < K)


def check(out, ref, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, what
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: rel_err {err:.2e} > {TOL[dtype]:.0e}"


# Cases: each axis cycles with its own period, so 20 cases cover every value of every axis
# and most pairs (a full product would take the interpreter an hour).
MS, NS, KS = (1, 2, 3, 16, 33), (1, 33, 96), (64, 100, 172, 256)
GROUPS, DTYPES = (32, 64, 128, -1, 256), (torch.float16, torch.bfloat16)
SCALE_DTYPES = (None, torch.float32, None, torch.bfloat16, torch.float16)
CASES = [
    (MS[i % 5], NS[i % 3], KS[i % 4], GROUPS[(i // 2) % 5], i % 7 < 3, DTYPES[(i // 3) % 2], SCALE_DTYPES[i % 5])
    for i in range(20)
]


def case_id(c):
    M, N, K, gs, sym, dtype, sdt = c
    sd = "" if sdt is None else "-s" + str(sdt).split(".")[1]
    return f"M{M}-N{N}-K{K}-g{gs}-{'sym' if sym else 'asym'}-{str(dtype).split('.')[1]}{sd}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_matches_reference(kernel, case):
    M, N, K, gs, sym, dtype, sdt = case
    x, w, ref, seed = make_problem(M, N, K, gs, sym, dtype, sdt)
    out = tw.run_kernel(kernel, *args(x, w), out=poisoned((M, N), dtype, DEVICE))
    if rounds_w(kernel, gs, K):
        check_w_rounding_path(out, x, w, ref, dtype, f"{kernel} {case_id(case)} seed={seed}")
    else:
        check(out, ref, dtype, f"{kernel} {case_id(case)} seed={seed}")


# Configs the heuristics rarely pick on small shapes: several K-tiles per group, tiles wider
# than N, heavy split-K (more splits than K-tiles is clamped), M not a multiple of BLOCK_M.
SPLIT_CASES = [
    ("gemv", (1, 96, 256, 128, False), dict(block_k=32, block_n=32, split_k=3)),
    ("gemv", (2, 33, 172, -1, True), dict(block_k=16, block_n=128, split_k=100)),
    ("gemv", (3, 96, 256, 256, False), dict(block_k=256, block_n=16, split_k=1)),
    # tiles spanning several groups (one scale row per sub-tile), the last one past K
    ("gemv", (1, 96, 256, 32, False), dict(block_k=128, block_n=32, split_k=1)),
    ("gemv", (2, 33, 300, 64, True), dict(block_k=256, block_n=32, split_k=2)),
    ("gemm", (16, 33, 172, 128, True), dict(block_m=32, block_n=16, split_k=2)),
    ("gemm", (3, 96, 100, -1, False), dict(block_m=16, block_n=64, split_k=1)),
    ("gemm", (70, 96, 384, 128, False), dict(block_m=32, block_n=32, split_k=2)),  # 3 row tiles
    ("gemm", (16, 96, 300, 256, False), dict(block_m=64, block_n=64, split_k=3)),  # 2 tiles per group
    # groups smaller than the K-tile: the scale is folded into each word row
    ("gemm", (33, 96, 256, 64, False), dict(block_m=16, block_n=32, split_k=4)),
    ("gemm", (33, 96, 172, 32, True), dict(block_m=16, block_n=32, split_k=2)),
    ("dequant", (33, 96, 172, 32, False), dict(block_n=16, block_k=32)),
    ("dequant", (3, 33, 100, -1, True), dict(block_n=128, block_k=16)),
]


@pytest.mark.parametrize("kernel,shape,config", SPLIT_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_configs(kernel, shape, config, dtype):
    x, w, ref, seed = make_problem(*shape, dtype)
    out = tw.run_kernel(kernel, *args(x, w), out=poisoned(ref.shape, dtype, DEVICE), **config)
    check(out, ref, dtype, f"{kernel} {shape} {config} seed={seed}")


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
@pytest.mark.parametrize("kernel", KERNELS)
def test_op_with_forced_kernel(kernel, case, monkeypatch):
    monkeypatch.setenv("INT4OPS_TRITON_KERNEL", kernel)
    M, N, K, gs, sym, dtype, sdt = case
    x, w, ref, seed = make_problem(M, N, K, gs, sym, dtype, sdt)
    out = torch.ops.int4ops.w4a16_mm(*args(x, w), backend="triton")
    if rounds_w(kernel, gs, K):
        check_w_rounding_path(out, x, w, ref, dtype, f"op/{kernel} {case_id(case)} seed={seed}")
    else:
        check(out, ref, dtype, f"op/{kernel} {case_id(case)} seed={seed}")


@pytest.mark.parametrize("M", (1, 16, 33))
def test_op_dispatch(M):
    x, w, ref, seed = make_problem(M, 96, 172, 64, False, torch.float16)
    check(torch.ops.int4ops.w4a16_mm(*args(x, w), backend="triton"), ref, torch.float16, f"M={M} seed={seed}")
    out = tw.w4a16_matmul(*args(x, w), out=poisoned(ref.shape, torch.float16, DEVICE))
    check(out, ref, torch.float16, f"direct M={M} seed={seed}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_fp32_activations(kernel):
    x, w, ref, seed = make_problem(16, 33, 100, 32, False, torch.float32, torch.float16)
    check(tw.run_kernel(kernel, *args(x, w)), ref, torch.float32, f"{kernel} seed={seed}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_x(kernel):
    x, w, ref, seed = make_problem(3, 33, 64, 32, True, torch.float16)
    x_t = x.t().contiguous().t()  # same values, column-major
    assert not x_t.is_contiguous()
    check(tw.run_kernel(kernel, *args(x_t, w)), ref, torch.float16, f"{kernel} seed={seed}")
    x_wide = torch.zeros(3, 80, dtype=x.dtype, device=DEVICE)
    x_wide[:, :64] = x  # row stride 80 != K
    check(tw.run_kernel(kernel, *args(x_wide[:, :64], w)), ref, torch.float16, f"{kernel} strided seed={seed}")


def test_gemm_block_k_is_fixed():
    x, w, _, _ = make_problem(16, 33, 256, 128, False, torch.float16)
    with pytest.raises(ValueError, match="block_k is 128"):
        tw.run_kernel("gemm", *args(x, w), block_k=64)


def test_gemm_ptx_unpack_needs_16_bit_x_on_a_gpu():
    x, w, _, _ = make_problem(3, 96, 256, 128, False, torch.float32)
    with pytest.raises(ValueError, match="use_asm=True needs an NVIDIA GPU and fp16/bf16 x"):
        tw.run_kernel("gemm", *args(x, w), use_asm=True)


def test_empty_m():
    _, w, _, _ = make_problem(1, 33, 64, 32, False, torch.float16)
    x = torch.empty(0, 64, dtype=torch.float16, device=DEVICE)
    assert tw.w4a16_matmul(*args(x, w)).shape == (0, 33)


# ------------------------------------------------------------------------------------------------
# Errors and plumbing
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weight():
    return make_problem(2, 33, 100, 32, False, torch.float16)[1]


def test_rejects_bad_dtype(weight):
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            tw.w4a16_matmul(*args(torch.ones(2, 100, device=DEVICE, dtype=dtype), weight))


def test_rejects_non_2d(weight):
    with pytest.raises(ValueError, match="2-D"):
        tw.w4a16_matmul(*args(torch.ones(100, device=DEVICE, dtype=torch.float16), weight))
    with pytest.raises(ValueError, match="2-D"):
        tw.w4a16_matmul(*args(torch.ones(1, 2, 100, device=DEVICE, dtype=torch.float16), weight))


def test_rejects_k_mismatch(weight):
    with pytest.raises(ValueError, match="K=64"):
        tw.w4a16_matmul(*args(torch.ones(2, 64, device=DEVICE, dtype=torch.float16), weight))


def test_rejects_bad_weight_and_out(weight):
    x = torch.ones(2, 100, device=DEVICE, dtype=torch.float16)
    with pytest.raises(Int4FormatError, match="qweight has"):
        tw.w4a16_matmul(x, weight.qweight[:-1], weight.scales, weight.zeros, 100, 32)
    with pytest.raises(Int4FormatError, match="group_size"):
        tw.w4a16_matmul(x, weight.qweight, weight.scales, weight.zeros, 100, 48)
    for bad in (torch.empty(2, 34, dtype=torch.float16), torch.empty(2, 33, dtype=torch.float32)):
        with pytest.raises(ValueError, match="out must be"):
            tw.w4a16_matmul(*args(x, weight), out=bad.to(DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        tw.w4a16_matmul(*args(x, weight), out=torch.empty(33, 2, dtype=torch.float16, device=DEVICE).t())


def test_rejects_bad_kernel_override(weight, monkeypatch):
    monkeypatch.setenv("INT4OPS_TRITON_KERNEL", "marlin")
    with pytest.raises(ValueError, match="INT4OPS_TRITON_KERNEL"):
        tw.w4a16_matmul(*args(torch.ones(2, 100, device=DEVICE, dtype=torch.float16), weight))
    with pytest.raises(ValueError, match="kernel must be one of"):
        tw.run_kernel("marlin", *args(torch.ones(2, 100, device=DEVICE, dtype=torch.float16), weight))


def test_available(monkeypatch):
    assert tw.available(DEVICE)
    assert not tw.available("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tw.available("cpu") is False


@pytest.mark.parametrize("M", (1, 2, 5, 16, 64, 200, 4096))
@pytest.mark.parametrize("N,K", ((4096, 4096), (28672, 4096), (4096, 14336), (33, 100)))
@pytest.mark.parametrize("group_size", (32, 128, -1))
def test_heuristic_configs_are_valid(M, N, K, group_size):
    for kernel in KERNELS:
        cfg = tw.heuristic_config(kernel, M, N, K, group_size, sms=132)
        bk = cfg["block_k"]
        assert bk >= 16 and bk & (bk - 1) == 0, cfg
        if kernel == "gemm":
            assert bk == 128, cfg  # fixed K-tile; small groups fold the scale instead
        elif kernel == "dequant":
            assert group_size == -1 or group_size % bk == 0, cfg  # (the GEMV takes any K-tile)
        assert 1 <= cfg.get("split_k", 1) <= math.ceil(K / bk), cfg


def test_default_kernel_rule():
    """Untuned GPUs: the GEMV at M = 1 (any size), the GEMM up to M = 128, then dequantize
    + cuBLAS."""
    assert tw.default_kernel(1) == "gemv"
    assert tw.default_kernel(2) == "gemm"
    assert tw.default_kernel(128) == "gemm"
    assert tw.default_kernel(129) == "dequant"


def test_shipped_tuned_configs_are_valid():
    files = sorted(tw.TUNED_DIR.glob("*.json"))
    for path in files:
        data = json.loads(path.read_text())
        assert tw.tuned_file(data["device"]) == path, "file name must match the device name"
        for shape, by_m in data["configs"].items():
            N, K = map(int, shape.split("x"))
            for m, cfg in by_m.items():
                assert cfg["kernel"] in KERNELS and int(m) >= 1, (path.name, shape, m)
                assert cfg["block_k"] & (cfg["block_k"] - 1) == 0, (path.name, shape, m)
                refit = tw._tuned({"base": tw.tuned_tables(data)["base"]}, int(m), N, K, 32)["block_k"]
                # the GEMM's K-tile is fixed, the dequant's divides the group, the GEMV's is kept
                assert refit == {"gemm": 128, "dequant": min(32, cfg["block_k"])}.get(cfg["kernel"], cfg["block_k"])
        for group, configs in data.get("configs_by_group", {}).items():
            assert int(group) in (32, 64, 256, -1), (path.name, group)
            for shape, by_m in configs.items():
                for m, cfg in by_m.items():
                    assert cfg["kernel"] in KERNELS and cfg["block_k"] & (cfg["block_k"] - 1) == 0, (path.name, group, shape)


def test_tuned_configs_prefer_the_group_they_were_tuned_at():
    """A config tuned at the call's group size wins over the base table's (tuned at 128);
    other Ms and groups fall back to the base table, fitted to the group."""
    gemv = lambda bk, bn, s: dict(kernel="gemv", block_k=bk, block_n=bn, split_k=s, num_warps=4, num_stages=1)
    deq = dict(kernel="dequant", block_n=64, block_k=128, num_warps=4)
    table = {"base": {"4096x4096": {1: gemv(256, 32, 6), 1024: deq}},
             "groups": {64: {"4096x4096": {1: gemv(128, 64, 11)}}}}
    assert tw._tuned(table, 1, 4096, 4096, 64) == gemv(128, 64, 11)
    assert tw._tuned(table, 1, 4096, 4096, 32) == gemv(256, 32, 6)  # the GEMV keeps its K-tile
    assert tw._tuned(table, 1, 4096, 4096, 128) == gemv(256, 32, 6)
    assert tw._tuned(table, 1024, 4096, 4096, 64)["block_k"] == 64  # the dequant's fits the group
    assert tw._tuned(table, 16, 4096, 4096, 64) is None  # tuned for M = 1 only: the heuristic
    assert tw._tuned(table, 1, 4096, 8192, 64) is None


# ------------------------------------------------------------------------------------------------
# gemm_sm90 (Gluon; GPU-only to run): its dispatch, its refusals, and its sm_90 code
# ------------------------------------------------------------------------------------------------


def test_sm90_default_rule():
    """gemm_sm90 replaces the Triton paths where it measured faster: M = 17-128 (one token tile, K
    split), to 256 on layers larger than 4096x4096, and past 256 where its 128 x 256 tiles fill
    ~0.7 of a wave; fp16/bf16 x and TMA-friendly K and N only."""
    if tw.gluon_sm90 is None:
        pytest.skip(f"no Gluon in this Triton: {tw._SM90_ERROR}")
    f16 = torch.float16
    assert tw.sm90_default(1024, 4096, 4096, f16, 132)  # 128 tiles
    assert tw.sm90_default(512, 6144, 4096, torch.bfloat16, 132)  # 96 tiles
    assert tw.sm90_default(1536, 4096, 14336, f16, 132)
    assert tw.sm90_default(128, 28672, 4096, f16, 132)  # one token tile, K split
    assert tw.sm90_default(65, 6144, 4096, torch.bfloat16, 132)
    assert tw.sm90_default(256, 4096, 14336, f16, 132)
    assert tw.sm90_default(17, 28672, 4096, f16, 132)
    assert tw.sm90_default(64, 4096, 4096, torch.bfloat16, 132)
    assert tw.sm90_default(128, 4096, 4096, f16, 132)
    assert not tw.sm90_default(16, 4096, 4096, f16, 132)  # the fused Triton GEMM's M
    assert not tw.sm90_default(1, 28672, 8192, f16, 132)  # the GEMV's
    assert not tw.sm90_default(129, 4096, 4096, f16, 132)  # dequantize + cuBLAS on the smallest layer
    assert not tw.sm90_default(257, 4096, 4096, f16, 132)  # 64 tiles of 256 tokens: half a wave
    assert not tw.sm90_default(512, 4096, 4096, f16, 132)
    assert tw.sm90_default(2048, 4096, 14336, f16, 132)
    assert tw.sm90_default(2048, 4096, 4096, torch.bfloat16, 132)
    assert tw.sm90_default(4096, 4096, 4096, f16, 132)
    assert tw.sm90_default(3072, 4096, 4096, torch.bfloat16, 132)  # bf16 as fp16 since its pairs take 4 ops
    assert tw.sm90_default(4096, 28672, 4096, torch.bfloat16, 132)
    assert not tw.sm90_default(1024, 4096, 4096, torch.float32, 132)
    assert not tw.sm90_default(1024, 4096, 4100, f16, 132)  # K % 8: x's TMA row stride
    assert not tw.sm90_default(1024, 4098, 4096, f16, 132)  # N % 4: the words' TMA row stride


def test_sm90_plan_splits_a_half_empty_last_wave():
    if tw.gluon_sm90 is None:
        pytest.skip(f"no Gluon in this Triton: {tw._SM90_ERROR}")
    plan, L = tw.gluon_sm90.plan, tw.gluon_sm90.Launch
    # 48 feature tiles x 4 token tiles on 132 SMs: 60 tiles would make a second wave 45% full,
    # so the last 15 feature tiles run as 120 tiles of 128 tokens.
    assert plan(1024, 6144, 64, 132) == (L(256, 0, 33), L(128, 33, 15))
    assert plan(1024, 4096, 64, 132) == (L(256, 0, 32),)  # one wave
    assert plan(1024, 28672, 64, 132) == (L(256, 0, 224),)  # 6.8 waves: the last is 79% full
    assert plan(4096, 6144, 64, 132) == (L(256, 0, 48),)  # x is the larger operand: features walk first
    for M, N in ((1000, 6144), (300, 1000), (3000, 28672), (1024, 6144)):
        launches = plan(M, N, 64, 132)
        assert launches[0].n_tile0 == 0 and sum(la.n_tiles for la in launches) == math.ceil(N / 128)
        assert all(a.n_tile0 + a.n_tiles == b.n_tile0 for a, b in zip(launches, launches[1:]))


@pytest.mark.parametrize("M,N,num_k,bm,split", (
    (1, 4096, 64, 8, 4),  # 32 tiles x 4 splits: 128 units, one wave
    (64, 4096, 64, 64, 4),
    (64, 6144, 64, 64, 2),  # 48 x 2: one wave; x 4 would take two, each unit still a quarter
    (1, 6144, 64, 8, 2),  # x 8 would stream fewer bytes per CTA but pay three units' fixed cost
    (128, 28672, 64, 128, 1),  # 224 tiles already fill 1.7 waves; a 128-token partial is costly
    (16, 28672, 128, 16, 1),  # 28672x8192: 1.7 waves; 4 splits measured 14% slower
    (256, 4096, 224, 256, 4),  # 4096x14336
    (100, 4100, 16, 128, 4),  # odd N, short K
    (3, 256, 2, 8, 1),  # one K-tile pair: nothing to split
))
def test_sm90_small_m_plan(M, N, num_k, bm, split):
    """Up to M = 256: one token tile of the smallest wgmma width >= M, K split so the units fill
    whole waves without paying more for the fp32 partials than the split saves; every split an
    even number of K-tiles, none empty, together all of K."""
    if tw.gluon_sm90 is None:
        pytest.skip(f"no Gluon in this Triton: {tw._SM90_ERROR}")
    (la,) = tw.gluon_sm90.plan(M, N, num_k, 132)
    assert (la.bm, la.n_tile0, la.n_tiles, la.split) == (bm, 0, math.ceil(N / 128), split)
    assert la.k_per_split % 2 == 0 and (la.split - 1) * la.k_per_split < num_k <= la.split * la.k_per_split
    for forced in (1, 3, 5, 64):
        (la,) = tw.gluon_sm90.plan(M, N, num_k, 132, split=forced)
        assert la.k_per_split % 2 == 0 and (la.split - 1) * la.k_per_split < num_k <= la.split * la.k_per_split
        assert la.split <= max(1, forced)


def test_sm90_refuses_clearly_where_it_cannot_run(weight):
    """Forced on a machine or call it cannot take, gemm_sm90 says why (here: no sm_90 GPU under
    the interpreter, or a GPU that is not sm_90, or K % 8 != 0); the automatic choice never
    picks it there."""
    x = torch.ones(2, 100, device=DEVICE, dtype=torch.float16)  # K = 100: not a multiple of 8
    with pytest.raises(ValueError, match="gemm_sm90 cannot run this call: .*(sm_90|K % 8|Gluon)"):
        tw.run_kernel("gemm_sm90", *args(x, weight))
    assert tw.choose_config(x.device, 2048, 33, 100, 32, None, torch.float16)["kernel"] != "gemm_sm90"


def test_sm90_refused_at_run_time_falls_back_to_the_portable_choice(monkeypatch):
    """Chosen but unable to take a call (here: no sm_90 GPU; on one, a misaligned x), gemm_sm90
    hands the call to what the plain-Triton choice runs at that M (the fused GEMM at M = 33, not
    dequantize + cuBLAS), and the result is right."""
    x, w, ref, seed = make_problem(33, 33, 100, 32, False, torch.float16)
    ran = []
    gemm = tw.LAUNCHERS["gemm"]
    monkeypatch.setitem(tw.LAUNCHERS, "gemm", lambda *a, **k: ran.append("gemm") or gemm(*a, **k))
    out = tw._launch({"kernel": "gemm_sm90"}, *args(x, w), out=poisoned((33, 33), torch.float16, DEVICE))
    assert ran == ["gemm"]
    assert tw.portable_config(x.device, 33, 33, 100, 32)["kernel"] == "gemm"
    check(out, ref, torch.float16, f"fallback seed={seed}")


def _sm90_sass_counts(dtype, group_size, bm, split_k, scales_tma):
    """gemm_sm90's SASS statistics: {instruction: count, "shared": bytes}."""
    return _sass_counts([str(dtype).split(".")[1], str(group_size), str(bm), str(int(split_k)), str(int(scales_tma))])


def _sass_counts(argv):
    """tests/sm90_sass.py ``argv`` in a child process without the interpreter: its JSON."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).with_name("sm90_sass.py")), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"this Triton cannot compile Gluon for sm_90 here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, f"compiling {' '.join(argv)} for sm_90 failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,group_size,bm,split_k,scales_tma", (
    (torch.float16, 128, 256, False, True), (torch.bfloat16, 32, 128, False, True),
    (torch.float16, 64, 128, True, False), (torch.float16, 128, 8, True, True)))
def test_sm90_kernel_keeps_wgmmas_in_flight(dtype, group_size, bm, split_k, scales_tma):
    """Compiled for sm_90 (here, without a GPU), the K loop keeps one wgmma in flight: ptxas
    waits for all of them (WARPGROUP.DEPBAR.LE gsb0, 0x0) only at the loop's two retiring waits
    and the tile's end. Shared-memory stores of the A tile, a second consumer partition or too
    few registers each made it wait after every wgmma (notes items 27-28), which halves speed
    and would pass every correctness test. Also: 4 ops per pair in both dtypes (PRMT, LOP3, HFMA2,
    HMUL2; bf16 took a fifth, an IMAD, and a HADD2 in place of the HFMA2 before session 23)."""
    if tw.gluon_sm90 is None:
        pytest.skip(f"no Gluon in this Triton: {tw._SM90_ERROR}")
    counts = _sm90_sass_counts(dtype, group_size, bm, split_k, scales_tma)
    hgmma, waits = counts["HGMMA."], counts["WARPGROUP.DEPBAR.LE gsb0, 0x0"]
    assert hgmma == 8, f"{hgmma} HGMMA: expected 4 per K-tile, two K-tiles per trip"
    assert waits <= 3, f"{waits} full wgmma waits for {hgmma} wgmmas: ptxas serialised them"
    assert counts["STL"] == 0, "register spills"
    assert counts["shared"] <= 227 * 1024
    assert counts["HFMA2"] == counts["HMUL2"] > 0


# ------------------------------------------------------------------------------------------------
# gemv_mma (Gluon; GPU-only to run): its K split, its refusals, and its sm_90 code
# ------------------------------------------------------------------------------------------------


def test_gemv_mma_split_rule():
    """~8 CTAs of 32 features per SM: the splits measured fastest on the five layers (notes item 33)."""
    if tw.gluon_gemv is None:
        pytest.skip(f"no Gluon in this Triton: {tw._GEMV_MMA_ERROR}")
    rule = tw.gluon_gemv.split_rule
    assert rule(4096, 4096, 132) == 8
    assert rule(6144, 4096, 132) == 6
    assert rule(4096, 14336, 132) == 8
    assert rule(28672, 4096, 132) == 1
    assert rule(28672, 8192, 132) == 1
    assert rule(33, 100, 132) == 1  # one step of 32 word rows covers K
    assert rule(64, 4096, 132) == 16  # capped
    cfg = tw.heuristic_config("gemv_mma", 1, 4096, 4096, 128, 132)
    assert cfg == dict(kernel="gemv_mma", warps_k=4, rows_per_lane=2, split_k=8)


def test_gemv_mma_refuses_clearly_where_it_cannot_run(weight):
    """Forced where it cannot run (here: no sm_90 GPU, or M > 1, or K % 8), gemv_mma says why;
    the automatic choice picks it only at M = 1 on an sm_90 GPU."""
    for M in (1, 2):
        x = torch.ones(M, 100, device=DEVICE, dtype=torch.float16)
        with pytest.raises(ValueError, match="gemv_mma cannot run this call: .*(sm_90|M = 1|Gluon)"):
            tw.run_kernel("gemv_mma", *args(x, weight))
    assert tw.choose_config(torch.device(DEVICE), 1, 33, 100, 32, None, torch.float16)["kernel"] != "gemv_mma"


def test_gemv_mma_refused_at_run_time_falls_back_to_the_gemv(monkeypatch):
    """Chosen but unable to take a call, gemv_mma hands it to the plain GEMV, with the right result."""
    x, w, ref, seed = make_problem(1, 33, 100, 32, False, torch.float16)
    ran = []
    gemv = tw.LAUNCHERS["gemv"]
    monkeypatch.setitem(tw.LAUNCHERS, "gemv", lambda *a, **k: ran.append("gemv") or gemv(*a, **k))
    out = tw._launch(tw.heuristic_config("gemv_mma", 1, 33, 100, 32, 8), *args(x, w),
                     out=poisoned((1, 33), torch.float16, DEVICE))
    assert ran == ["gemv"]
    check(out, ref, torch.float16, f"fallback seed={seed}")


@pytest.mark.parametrize("dtype,has_zeros,rep,wk", (
    (torch.float16, True, 2, 4), (torch.bfloat16, True, 2, 4),
    (torch.float16, False, 1, 4), (torch.bfloat16, False, 4, 2)))
def test_gemv_mma_compiles_to_mma_sync(dtype, has_zeros, rep, wk):
    """Compiled for sm_90 (here, without a GPU): per step each lane issues REP packs of one 16-byte
    word load, one 16-byte x load and 4 HMMA.16816, with no register spills. (An asm operand or
    layout mistake that still compiled would show up here as other counts, or in the GPU tests.)"""
    if tw.gluon_gemv is None:
        pytest.skip(f"no Gluon in this Triton: {tw._GEMV_MMA_ERROR}")
    counts = _sass_counts(["gemv", str(dtype).split(".")[1], str(int(has_zeros)), str(rep), str(wk)])
    assert counts["HMMA.16816.F32"] == 4 * rep, counts
    assert counts["LDG.E.128"] == 2 * rep, counts
    assert counts["STL"] == 0 and counts["LDL"] == 0, "register spills"


# ------------------------------------------------------------------------------------------------
# GPU: real layer sizes, the op's registration, CUDA graphs (skipped without a GPU)
# ------------------------------------------------------------------------------------------------

LLAMA_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (8192, 28672))
SM90 = ("gemm_sm90",) if torch.cuda.is_available() and tw.sm90_capable(torch.device("cuda")) else ()
needs_sm90 = pytest.mark.skipif(not SM90, reason="gemm_sm90 needs an sm_90 GPU and Gluon")
GEMV_MMA = ("gemv_mma",) if torch.cuda.is_available() and tw.gemv_mma_capable(torch.device("cuda")) else ()
needs_gemv_mma = pytest.mark.skipif(not GEMV_MMA, reason="gemv_mma needs an sm_90 GPU and Gluon")


@pytest.mark.gpu
@needs_gemv_mma
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,group_size,sym,scale_dtype,config", (
    (4096, 4096, 128, False, None, {}),
    (4096, 4096, 128, True, torch.float32, dict(split_k=1)),
    (1000, 1000, 64, False, None, dict(split_k=3)),  # K: 125 word rows, a partial last step
    (33, 4104, 32, False, torch.float16, {}),  # N: one partial CTA; group 32: one word row per lane
    (4099, 520, -1, True, None, dict(split_k=2)),  # per channel, N % 4 != 0
    (4096, 8, 256, False, None, {}),  # one word row
    (6144, 4096, 256, True, None, dict(warps_k=2, rows_per_lane=4)),
    (2048, 14336, 128, False, torch.bfloat16, dict(warps_k=8, rows_per_lane=1, split_k=5)),
))
def test_gpu_gemv_mma_matches_reference(N, K, group_size, sym, scale_dtype, config, dtype):
    """Odd N and K, every group size, sym/asym, scale dtypes, K splits and tiles; the same bits on a
    second call (the split-K reduce adds in a fixed order)."""
    x, w, ref, seed = make_problem(1, N, K, group_size, sym, dtype, scale_dtype, device="cuda")
    first = tw.run_kernel("gemv_mma", *args(x, w), out=poisoned((1, N), dtype, "cuda"), **config)
    check(first, ref, dtype, f"gemv_mma N={N} K={K} g={group_size} sym={sym} {config} seed={seed}")
    again = tw.run_kernel("gemv_mma", *args(x, w), out=poisoned((1, N), dtype, "cuda"), **config)
    assert torch.equal(first, again), f"not deterministic, seed={seed}"


@pytest.mark.gpu
@needs_gemv_mma
def test_gpu_gemv_mma_dispatch_and_fallback():
    """The default at M = 1 in fp16/bf16 with K % 8 == 0; fp32 x, K % 8 != 0 and an x at an odd
    element offset run the plain GEMV, with right results."""
    dev = torch.device("cuda")
    for dtype in DTYPES:
        assert tw.choose_config(dev, 1, 4096, 4096, 128, None, dtype)["kernel"] == "gemv_mma"
    assert tw.choose_config(dev, 1, 4096, 4096, 128, None, torch.float32)["kernel"] == "gemv"
    assert tw.choose_config(dev, 1, 4096, 4100, 128, None, torch.float16)["kernel"] == "gemv"
    assert tw.choose_config(dev, 2, 4096, 4096, 128, None, torch.float16)["kernel"] != "gemv_mma"
    x, w, ref, seed = make_problem(1, 4096, 4096, 128, False, torch.float16, device="cuda")
    buf = torch.empty(4096 + 1, dtype=torch.float16, device="cuda")
    xs = buf[1:].view(1, 4096)  # odd element offset: no int32 view
    xs.copy_(x)
    assert not tw.gluon_gemv.pointers_ok(xs, w.qweight)
    check(tw.w4a16_matmul(*args(xs, w), out=poisoned((1, 4096), torch.float16, "cuda")), ref, torch.float16,
          f"fallback seed={seed}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("scales_tma", (None, False), ids=("tma_where_possible", "plain_loads"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,group_size,sym,scale_dtype", (
    (77, 1000, 4096, 32, False, None),  # one partial token tile; N % 16 != 0: scales and zeros by plain loads
    (77, 1024, 4096, 32, False, None),  # groups of half a K-tile: two scale rows per ring slot
    (333, 4100, 1000, -1, True, None),  # per channel, K padded to 1024, partial feature tile, N % 8 != 0
    (333, 4096, 1000, -1, False, torch.float32),  # per channel, fp32 scales by TMA
    (1000, 6144, 4096, 128, False, None),  # the split last wave (128-token tiles), partial token tile
    (1024, 6144, 4096, 64, True, None),  # the split, groups of one K-tile
    (513, 384, 2048, 256, True, torch.float32),  # groups of four K-tiles
    (256, 256, 192, 64, False, None),  # three K-tiles: the loop's extra zero-filled one
    (4096, 4096, 4096, 128, False, None),  # features walk first (x larger than W)
    (2048, 28672, 4096, 128, False, None),  # several tiles per CTA (persistent)
))
def test_gpu_sm90_matches_reference(M, N, K, group_size, sym, scale_dtype, dtype, scales_tma):
    x, w, ref, seed = make_problem(M, N, K, group_size, sym, dtype, scale_dtype=scale_dtype, device="cuda")
    out = tw.run_kernel("gemm_sm90", *args(x, w), out=poisoned((M, N), dtype, "cuda"), scales_tma=scales_tma)
    check(out, ref, dtype, f"gemm_sm90 M={M} N={N} K={K} g={group_size} sym={sym} scales {scale_dtype} "
                           f"tma={scales_tma} seed={seed}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,group_size,sym,split", (
    (1, 4096, 4096, 128, False, None),  # 8-token tile, 4 splits
    (3, 1000, 4096, 32, True, 5),  # odd N, groups of half a K-tile
    (16, 4100, 1000, -1, False, 3),  # per channel, K padded, last split short
    (33, 6144, 4096, 64, True, None),
    (100, 384, 2048, 256, False, 16),  # 16 splits of 2 K-tiles
    (128, 28672, 4096, 128, False, 2),  # several units per CTA, split
    (200, 4096, 14336, 128, True, None),  # 256-token tile, 4 splits
))
def test_gpu_sm90_split_k_matches_reference(M, N, K, group_size, sym, split, dtype):
    """Small M: one token tile, K split across CTAs, partials summed by the tile's last CTA. Run
    twice: the second call finds the tickets the first reset (a stale one would skip a tile's store
    and leave NaN in the output)."""
    x, w, ref, seed = make_problem(M, N, K, group_size, sym, dtype, device="cuda")
    for call in range(2):
        out = tw.run_kernel("gemm_sm90", *args(x, w), out=poisoned((M, N), dtype, "cuda"), split_k=split)
        check(out, ref, dtype, f"gemm_sm90 split={split} call {call} M={M} N={N} K={K} g={group_size} seed={seed}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,sym", ((32, False), (128, False), (128, True), (-1, False)))
def test_gpu_sm90_dequantizes_exactly(group_size, sym, dtype):
    """x = I reads back W as the kernel dequantized it: the reference's W rounded once to x's dtype,
    bit for bit, over random words (every code) and every zero point 0-15. bf16's high half goes
    through subnormal bf16 values (see the module's docstring): hardware that flushed them would
    read its codes 1-7 as 0 here."""
    K, N = 256, 384
    _, w, _, seed = make_problem(1, N, K, group_size, sym, dtype, device="cuda")
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-2**31, 2**31, tuple(w.qweight.shape), generator=g, dtype=torch.int64)
    w.qweight = words.to(torch.int32).cuda()
    if w.zeros is not None:
        w.zeros = torch.randint(0, 16, tuple(w.zeros.shape), generator=g, dtype=torch.int64).to(w.zeros.dtype).cuda()
    x = torch.eye(K, dtype=dtype, device="cuda")
    out = tw.run_kernel("gemm_sm90", *args(x, w), out=poisoned((K, N), dtype, "cuda"))
    want = dequantize(w).t().to(dtype)
    bad = (out != want).sum().item()
    assert bad == 0, f"{bad} of {out.numel()} weights differ from the reference's rounding, seed={seed}"


@pytest.mark.gpu
@needs_sm90
def test_gpu_sm90_dispatch_fallback_and_graphs():
    """Where it wins it is the default; a call it cannot take (N % 4, a misaligned x) runs
    dequantize + cuBLAS instead; under CUDA-graph replay it reads the new x."""
    dev = torch.device("cuda")
    assert tw.choose_config(dev, 1024, 4096, 4096, 128, None, torch.float16)["kernel"] == "gemm_sm90"
    assert tw.choose_config(dev, 1024, 4096, 4096, 128, None, torch.float32)["kernel"] != "gemm_sm90"
    for N, offset in ((4099, 0), (4096, 4)):
        x, w, _, seed = make_problem(1024, N, 4096, 128, False, torch.float16, device="cuda")
        buf = torch.empty(1024 * 4096 + 8, dtype=torch.float16, device="cuda")
        xs = buf[offset:offset + x.numel()].view(1024, 4096)  # 8-byte aligned only when offset = 4
        xs.copy_(x)
        ref = w4a16_matmul_reference(xs.float(), w)
        check(tw.w4a16_matmul(*args(xs, w), out=poisoned((1024, N), torch.float16, "cuda")), ref, torch.float16,
              f"fallback N={N} offset={offset} seed={seed}")
    x, w, _, seed = make_problem(1024, 4096, 4096, 128, False, torch.bfloat16, device="cuda")
    out = torch.empty(1024, 4096, dtype=torch.bfloat16, device="cuda")
    tw.w4a16_matmul(*args(x, w), out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tw.w4a16_matmul(*args(x, w), out=out)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    check(out, w4a16_matmul_reference(x.float(), w), torch.bfloat16, f"graph replay seed={seed}")
    # Split K in a graph (the tickets exist from an eager call before the capture), replayed twice.
    assert tw.choose_config(dev, 100, 6144, 4096, 128, None, torch.float16)["kernel"] == "gemm_sm90"
    x, w, _, seed = make_problem(100, 6144, 4096, 128, False, torch.float16, device="cuda")
    out = torch.empty(100, 6144, dtype=torch.float16, device="cuda")
    tw.w4a16_matmul(*args(x, w), out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tw.w4a16_matmul(*args(x, w), out=out)
    for replay in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        check(out, w4a16_matmul_reference(x.float(), w), torch.float16, f"split graph replay {replay} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", LLAMA_SHAPES)
@pytest.mark.parametrize("M", (1, 3, 16, 64, 333, 4096))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_real_sizes(M, N, K, dtype):
    if M * N * K > 4096 * 8192 * 28672 // 4 and dtype == torch.bfloat16:
        pytest.skip("largest bf16 products covered by fp16 (reference time)")
    x, w, ref, seed = make_problem(M, N, K, 128, False, dtype, device="cuda")
    out = tw.w4a16_matmul(*args(x, w), out=poisoned((M, N), dtype, "cuda"))
    check(out, ref, dtype, f"auto M={M} N={N} K={K} seed={seed}")
    for kernel in (*KERNELS, *SM90, *(GEMV_MMA if M == 1 else ())) if M <= 64 else ("gemm", "dequant", *SM90):
        out = tw.run_kernel(kernel, *args(x, w), out=poisoned((M, N), dtype, "cuda"))
        check(out, ref, dtype, f"{kernel} M={M} N={N} K={K} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("group_size,sym", ((32, True), (64, False), (256, True), (-1, False)))
@pytest.mark.parametrize("M", (1, 16, 257))
def test_gpu_groups_odd_shapes(M, group_size, sym):
    for dtype in DTYPES:
        x, w, ref, seed = make_problem(M, 4099, 4100, group_size, sym, dtype, device="cuda")
        for kernel in KERNELS:
            out = tw.run_kernel(kernel, *args(x, w), out=poisoned((M, 4099), dtype, "cuda"))
            check(out, ref, dtype, f"{kernel} M={M} g={group_size} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,group_size,sym", (
    (1, 33, 172, 64, True), (16, 96, 256, 32, False), (3, 4096, 4096, 128, False),
    (33, 512, 1024, -1, True), (64, 4099, 4100, 256, False),
))
def test_gpu_gemm_ptx_unpack_matches_triton(M, N, K, group_size, sym, dtype):
    """The GEMM's PTX unpacking (the GPU default) and its plain Triton one (what the CPU suite
    runs) give the same bits: the same exact q - z, the same one rounding of a folded scale."""
    x, w, ref, seed = make_problem(M, N, K, group_size, sym, dtype, device="cuda")
    ptx = tw.run_kernel("gemm", *args(x, w), out=poisoned((M, N), dtype, "cuda"), use_asm=True)
    plain = tw.run_kernel("gemm", *args(x, w), out=poisoned((M, N), dtype, "cuda"), use_asm=False)
    check(ptx, ref, dtype, f"gemm M={M} N={N} K={K} g={group_size} seed={seed}")
    assert torch.equal(ptx, plain), f"PTX and Triton unpacking differ, seed={seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,M,config", [
    ("gemv", 1, dict(block_n=64, split_k=8)),  # early reduce
    ("gemm", 16, dict(block_m=16, block_n=64, split_k=8)),  # early reduce
    ("gemm", 64, dict(block_m=64, block_n=128, split_k=4, num_warps=8)),  # early GEMM
    ("gemm", 64, dict(block_m=64, block_n=128, split_k=1, num_warps=8)),  # early GEMM, no reduce
])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gpu_pdl_same_bits(kernel, M, config, dtype, monkeypatch):
    """Launching a call's second kernel early (programmatic dependent launch, the default on
    Hopper) gives the same bits as plain launches: it waits for the kernel before it. The
    weights are big enough that the kernels overlap in time."""
    x, w, ref, seed = make_problem(M, 4096, 4096, 128, False, dtype, device="cuda")
    from int4ops.kernels.triton_gemv import use_pdl
    if not use_pdl(x.device):
        pytest.skip("no programmatic dependent launch on this GPU (needs sm_90+)")
    early = tw.run_kernel(kernel, *args(x, w), out=poisoned((M, 4096), dtype, "cuda"), **config)
    monkeypatch.setenv("INT4OPS_PDL", "0")
    plain = tw.run_kernel(kernel, *args(x, w), out=poisoned((M, 4096), dtype, "cuda"), **config)
    check(early, ref, dtype, f"{kernel} M={M} {config} seed={seed}")
    assert torch.equal(early, plain), f"PDL changed the result, seed={seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 64))  # the GEMV; the GEMM behind an early permute
def test_gpu_pdl_waits_for_the_kernel_before(M):
    """The first kernel of a call is launched early (PDL) behind whatever kernel came before.
    Here that kernel lets it in at once and writes x only after ~2 ms of spinning: a call
    that read x before its ``gdc_wait`` would see the stale x (zeros)."""
    from int4ops.kernels.triton_gemv import use_pdl
    x, w, ref, seed = make_problem(M, 4096, 4096, 128, False, torch.float16, device="cuda")
    if not use_pdl(x.device):
        pytest.skip("no programmatic dependent launch on this GPU (needs sm_90+)")
    x_buf = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), 1024),)
    # Compile both first (16 spins: the same Triton specialisation as 2^16): a compile or
    # module load between the two launches would outlast the spin.
    _late_copy_kernel[grid](x, x_buf, x.numel(), 16, BLOCK=1024, num_warps=4)
    tw.w4a16_matmul(x_buf, *args(x, w)[1:])
    x_buf.zero_()
    out = poisoned(ref.shape, torch.float16, "cuda")  # its fill kernel must not come in between
    _late_copy_kernel[grid](x, x_buf, x.numel(), 1 << 16, BLOCK=1024, num_warps=4)
    tw.w4a16_matmul(x_buf, *args(x, w)[1:], out=out)
    check(out, ref, torch.float16, f"M={M} seed={seed}")


try:
    import triton
    import triton.language as tl

    from int4ops.kernels.triton_gemv import gdc_launch_dependents

    @triton.jit
    def _late_copy_kernel(src_ptr, dst_ptr, n, spins, BLOCK: tl.constexpr):
        """dst = src, written after ``spins`` dependent FMAs; lets PDL kernels launch at once."""
        gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(src_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        t = v * 0.0 + 1.0
        for _ in range(spins):
            t = t * 0.9999999 + 1e-7
        tl.store(dst_ptr + offs, (v + (t - t)).to(dst_ptr.dtype.element_ty), mask=offs < n)
except ImportError:  # no Triton: the GPU tests skip anyway
    pass


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 64))
def test_gpu_opcheck(M):
    x, w, _, _ = make_problem(M, 512, 384, 128, False, torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.int4ops.w4a16_mm.default, (*args(x, w), "triton"))
    torch.library.opcheck(torch.ops.int4ops.w4a16_mm.default, (x, w.qweight, w.scales, None, 384, 128, "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 16, 300))
def test_gpu_cuda_graph_capture_and_replay(M):
    x, w, _, _ = make_problem(M, 4096, 4096, 128, False, torch.float16, device="cuda")
    static_x = x.clone()
    op = lambda: torch.ops.int4ops.w4a16_mm(static_x, w.qweight, w.scales, w.zeros, 4096, 128, "triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op()  # warm up: JIT compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = op()
    for _ in range(2):
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        check(static_out, w4a16_matmul_reference(new_x.float(), w), torch.float16, f"graph M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 16))
def test_gpu_torch_compile(M):
    x, w, ref, _ = make_problem(M, 1024, 512, 128, True, torch.float16, device="cuda")
    fn = torch.compile(lambda x: torch.ops.int4ops.w4a16_mm(x, w.qweight, w.scales, w.zeros, 512, 128, "triton"), fullgraph=True)
    check(fn(x), ref, torch.float16, "compiled")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", (1, 16, 64, 1024))
def test_gpu_second_device(M, dtype):
    """Each path launches on x's device, here the second GPU, while the current device is the
    first (a model split over GPUs): M = 1 the GEMV (gemv_mma on sm_90), 16 the fused GEMM, 64 and
    1024 gemm_sm90 on sm_90 (its split-K tickets and SM count are per device), else the fused GEMM
    and dequantize + cuBLAS."""
    x, w, ref, seed = make_problem(M, 4096, 4096, 128, False, dtype, device="cuda:1")
    assert torch.cuda.current_device() == 0
    out = tw.w4a16_matmul(*args(x, w), out=poisoned((M, 4096), dtype, "cuda:1"))
    assert out.device == torch.device("cuda:1")
    check(out, ref, dtype, f"cuda:1 M={M} seed={seed}")
