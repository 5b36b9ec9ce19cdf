"""The CUDA library backend (csrc/, int4ops/kernels/cuda.py).

CPU-only machines: the library builds with the machine's nvcc (skipped with a reason when
there is no nvcc, a failure under CI), and a missing library is reported clearly while the op
keeps working on the reference path. GPU machines (``gpu`` marker): correctness sweep against
the fp32 reference, dequantize, CUDA-graph capture and error reporting.
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, TOL, poisoned, rel_err
from int4ops import quantize_rtn, w4a16_matmul_reference
from int4ops import dequantize as ref_dequantize
from int4ops.kernels import cuda

EXPORTS = (
    "int4ops_w4a16_gemv",
    "int4ops_w4a16_gemv_plan",
    "int4ops_w4a16_mma",
    "int4ops_w4a16_mma_plan",
    "int4ops_w4a16_gemm_sm90",
    "int4ops_w4a16_gemm_sm90_supported",
    "int4ops_dequantize",
    "int4ops_cuda_last_error",
    "int4ops_cuda_archs",
    "int4ops_cuda_versions",
    "int4ops_cuda_probe",
)


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for p in ("/usr/local/cuda/bin/nvcc",):
        if Path(p).is_file():
            return p
    return None


def _require_nvcc():
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc not found: CI must build the CUDA library")
        pytest.skip("nvcc not found: cannot build the CUDA library on this machine")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    return nvcc


# --------------------------------------------------------------------------------------------
# CPU: build and loader


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """Configure and build csrc/ with CMake + nvcc into a temp dir (one arch, to stay quick)."""
    nvcc = _require_nvcc()
    build = tmp_path_factory.mktemp("cuda_build")
    # One real arch keeps this to ~1 min on 2 cores; the wheel build compiles the full list.
    archs = os.environ.get("INT4OPS_TEST_CUDA_ARCHS", "90-real")
    env = dict(os.environ, CUDACXX=nvcc)
    cfg = ["cmake", "-S", str(REPO), "-B", str(build), "-DINT4OPS_CUDA=on", f"-DINT4OPS_CUDA_ARCHS={archs}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    r = subprocess.run(cfg, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"cmake configure failed:\n{r.stdout}\n{r.stderr}"
    r = subprocess.run(["cmake", "--build", str(build), "-j2"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"cmake build failed:\n{r.stdout}\n{r.stderr}"
    lib = build / cuda.LIB_NAME
    assert lib.is_file(), f"{lib} was not built"
    return lib, archs


@pytest.mark.slow
def test_library_builds_without_torch_or_cudart_deps(built_library):
    lib, _ = built_library
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
        assert "torch" not in deps and "libc10" not in deps, deps
        assert "libcudart" not in deps, f"cudart should be linked statically:\n{deps}"
    # The C ABI is there and answers without a GPU.
    h = ctypes.CDLL(str(lib))
    for name in EXPORTS:
        assert hasattr(h, name), name


@pytest.mark.slow
def test_loader_reports_built_library(built_library, monkeypatch):
    lib, archs = built_library
    monkeypatch.setenv(cuda.ENV_LIB, str(lib))
    info = cuda.library_info()
    assert info["loaded"] and info["path"] == str(lib) and info["load_error"] is None
    assert info["archs"] == [int(a.split("-")[0]) for a in archs.split(";")]
    assert info["cuda_runtime_version"] >= 11000
    if not torch.cuda.is_available():
        assert not cuda.available()
        assert cuda.why_unavailable()  # says why: no device / no driver


def test_cmake_off_builds_nothing(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    r = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(tmp_path), "-DINT4OPS_CUDA=off"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "CUDA library disabled" in r.stdout


def _configure_without_toolkit(tmp_path, mode):
    """Configure with no nvcc reachable: PATH holds only cmake's directory and /usr/bin:/bin."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    path = os.pathsep.join([str(Path(cmake).parent), "/usr/bin", "/bin"])
    if shutil.which("nvcc", path=path):
        pytest.skip(f"nvcc is on the minimal PATH {path}; cannot hide the toolkit")
    env = dict(os.environ, PATH=path, CUDACXX=str(tmp_path / "no-nvcc"))
    env.pop("CUDA_PATH", None)
    cfg = [cmake, "-S", str(REPO), "-B", str(tmp_path / "b"), f"-DINT4OPS_CUDA={mode}"]
    return subprocess.run(cfg, env=env, capture_output=True, text=True)


def test_cmake_auto_without_toolkit_skips(tmp_path):
    r = _configure_without_toolkit(tmp_path, "auto")
    assert r.returncode == 0, f"auto must never fail without CUDA:\n{r.stdout}\n{r.stderr}"
    assert "skipping the CUDA library" in r.stdout


def test_cmake_on_without_toolkit_fails(tmp_path):
    r = _configure_without_toolkit(tmp_path, "on")
    assert r.returncode != 0 and "INT4OPS_CUDA=on but no CUDA compiler" in r.stderr


def test_missing_library_is_reported(monkeypatch):
    missing = "/nonexistent/dir/libint4ops_cuda.so"
    monkeypatch.setenv(cuda.ENV_LIB, missing)
    assert not cuda.available()
    why = cuda.why_unavailable()
    assert missing in why and "not found" in why
    info = cuda.library_info()
    assert not info["loaded"] and missing in info["load_error"]

    # The op still runs (reference path off the GPU, or whatever auto picks), and asking for
    # the CUDA backend explicitly fails with the reason.
    torch.manual_seed(0)
    w = quantize_rtn(torch.randn(24, 64), group_size=32)
    x = torch.randn(3, 64)
    y = torch.ops.int4ops.w4a16_mm(x, w.qweight, w.scales, w.zeros, 64, 32, "auto")
    torch.testing.assert_close(y, w4a16_matmul_reference(x, w))
    with pytest.raises(RuntimeError, match="nonexistent"):
        torch.ops.int4ops.w4a16_mm(x, w.qweight, w.scales, w.zeros, 64, 32, "cuda")


def test_cpu_tensor_is_refused_clearly():
    w = quantize_rtn(torch.randn(8, 32), group_size=32)
    with pytest.raises(RuntimeError, match="int4ops cuda: unavailable"):
        cuda.w4a16_matmul(torch.randn(1, 32, dtype=torch.float16), w.qweight, w.scales, w.zeros, 32, 32)


# --------------------------------------------------------------------------------------------
# GPU


def _need_lib():
    why = cuda.why_unavailable(torch.device("cuda"))
    if why:
        if os.environ.get("CI") or os.environ.get("INT4OPS_REQUIRE_CUDA_LIB"):
            pytest.fail(f"CUDA library unavailable: {why}")
        pytest.skip(f"CUDA library unavailable: {why}")


def _weight(n, k, group_size, sym, scale_dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    return quantize_rtn(w, group_size=group_size, sym=sym, scale_dtype=scale_dtype)


# (N, K): odd N/K, padded groups; K % 8 != 0 (scalar x path, padding tail); tiny per-channel K.
# N % 8 == 0 and K % 8 == 0 take the streaming decode kernel at M <= 8 (w4a16_mma_stream.cu):
# (256, 4096) its plain case; (200, 1000) a last column tile of 8 channels (lanes past N) and a
# K tail (K % 32 == 8); (8, 520) a single 8-channel tile and a per-channel K_pad of 65 rows.
SHAPES = [(129, 200), (256, 4096), (4100, 1000), (3, 72), (130, 172), (64, 100), (5, 8), (9, 20), (200, 1000), (8, 520)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 17, 300])  # mma decode up to 16, then the large-M path
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
def test_matmul_matches_reference(m, group_size, dtype, sym, n, k):
    _need_lib()
    w = _weight(n, k, group_size, sym, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = poisoned((m, n), dtype, "cuda")
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size, out=out)
    assert y is out
    ref = w4a16_matmul_reference(x.float(), w)
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"rel_err {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("n,k", SHAPES)
def test_scalar_gemv_decode_kernel(m, group_size, dtype, sym, n, k, monkeypatch):
    """The scalar decode kernel (INT4OPS_CUDA_DECODE=gemv), kept for GPUs and cases it wins."""
    _need_lib()
    monkeypatch.setenv(cuda.ENV_DECODE, "gemv")
    w = _weight(n, k, group_size, sym, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size, out=poisoned((m, n), dtype, "cuda"))
    err = rel_err(y, w4a16_matmul_reference(x.float(), w))
    assert err <= TOL[dtype], f"rel_err {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 8, 16, 33])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_dtypes_and_op_entry(m, scale_dtype):
    _need_lib()
    n, k, gs = 200, 384, 128
    w = _weight(n, k, gs, False, scale_dtype, seed=1)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y = torch.ops.int4ops.w4a16_mm(x, w.qweight, w.scales, w.zeros, k, gs, "cuda")
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("n,k", [(129, 200), (256, 1024), (5, 8)])
def test_dequantize_matches_reference(dtype, group_size, n, k):
    _need_lib()
    for sym in (False, True):
        w = _weight(n, k, group_size, sym, torch.float16)
        d = cuda.dequantize(w.qweight, w.scales, w.zeros, k, group_size, dtype)
        assert d.shape == (n, k) and d.dtype == dtype
        # Same fp32 math (q - z) * s, one rounding to dtype: bitwise equal.
        torch.testing.assert_close(d, ref_dequantize(w, dtype), rtol=0, atol=0)


@pytest.mark.gpu
def test_noncontiguous_x_and_side_stream():
    _need_lib()
    w = _weight(300, 512, 64, False, torch.float16)
    x = torch.randn(512, 4, device="cuda", dtype=torch.float16).t()  # [4, 512], not contiguous
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 512, 64)
    torch.cuda.current_stream().wait_stream(s)
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16, 64, 1024])
def test_cuda_graph_capture(m):
    _need_lib()
    # M = 1..16: decode split-K (workspace); on an H100/H200, 64: the sm_90 GEMM with K split
    # (workspace + memset), 1024: without; elsewhere dequantize + cuBLAS.
    n, k, gs = 4096, 1024, 128
    w = _weight(n, k, gs, False, torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (loads kernels) outside capture
        cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, gs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, gs)
    for seed in (1, 2):
        x.copy_(torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graph", [False, True])
def test_pdl_reduce_same_bits(dtype, graph, monkeypatch):
    """The streaming kernel's split-K reduce, launched with PDL on sm_90+ (INT4OPS_PDL=0: plain
    launch), sums the partials in the same order either way: the bits must match."""
    _need_lib()
    n, k, gs = 4096, 4096, 128  # 64 column tiles: several splits on any GPU with >= 32 SMs
    w = _weight(n, k, gs, False, dtype)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    outs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("INT4OPS_PDL", pdl)
        if not graph:
            outs.append(cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, gs))
            continue
        cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, gs)  # warm up outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, gs)
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        outs.append(y.clone())
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], w4a16_matmul_reference(x.float(), w)) <= TOL[dtype]


@pytest.mark.gpu
def test_errors_name_kernel_and_shapes():
    _need_lib()
    lib = cuda._lib()
    w = _weight(64, 128, 32, True, torch.float16)
    x = torch.randn(9, 128, device="cuda", dtype=torch.float16)
    out = torch.empty(9, 64, device="cuda", dtype=torch.float16)
    # M = 9 is past the decode kernel's instantiations: the C side refuses with a message.
    rc = lib.handle.int4ops_w4a16_gemv(
        x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), None, out.data_ptr(), None,
        9, 64, 128, w.qweight.shape[0], 32, 0, 0, 1, x.device.index, torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    with pytest.raises(cuda.CudaLibraryError, match=r"int4ops cuda: w4a16_gemv failed for M=9, N=64, K=128"):
        cuda._check(lib, rc)
    x17 = torch.randn(17, 128, device="cuda", dtype=torch.float16)
    rc = lib.handle.int4ops_w4a16_mma(
        x17.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), None, out.data_ptr(), None,
        17, 64, 128, w.qweight.shape[0], 32, 0, 0, 1, x.device.index, torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    with pytest.raises(cuda.CudaLibraryError, match=r"w4a16_mma failed for M=17, N=64, K=128.*M must be 1..16"):
        cuda._check(lib, rc)
    # Python-side validation.
    with pytest.raises(ValueError, match="in_features"):
        cuda.w4a16_matmul(x[:, :100], w.qweight, w.scales, w.zeros, 128, 32)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        cuda.w4a16_matmul(x.float(), w.qweight, w.scales, w.zeros, 128, 32)
    with pytest.raises(ValueError, match="out must be"):
        cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 128, 32, out=out[:, :10])
    info = cuda.library_info()
    assert info["loaded"] and info["cuda_driver_version"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_unaligned_activations_take_the_scalar_path(m):
    _need_lib()
    w = _weight(96, 256, 128, False, torch.float16)
    base = torch.randn(m * 256 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(m, 256)  # 2-byte offset: no 16-byte vector loads of x possible
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 256, 128, out=poisoned((m, 96), torch.float16, "cuda"))
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.float16]


@pytest.mark.gpu
def test_large_m_dequantizes_in_column_chunks(monkeypatch):
    _need_lib()
    monkeypatch.setattr(cuda, "DEQUANT_CHUNK_ELEMS", 64 * 256)  # force several chunks
    w = _weight(300, 256, 64, True, torch.bfloat16)
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 256, 64, out=poisoned((40, 300), torch.bfloat16, "cuda"))
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.bfloat16]


# --------------------------------------------------------------------------------------------
# GPU: the fused large-M GEMM of sm_90 (csrc/w4a16_gemm_sm90.cu)


def _need_sm90_gemm():
    _need_lib()
    why = cuda._gemm_sm90_why_not(cuda._lib(), torch.cuda.current_device())
    if why:
        pytest.skip(f"no sm_90 GEMM here: {why}")


# (N, K): (16, 64) one partial block; (528, 1000) a partial channel tile and a K tail inside a
# stage; (1040, 776) groups that end mid-stage; (384, 4104) a K_pad past K; (8, 72) N = 8, which
# only fits without zero points (the zero-point copy needs N % 16 == 0).
SM90_SHAPES = [(16, 64), (256, 4096), (528, 1000), (1040, 776), (384, 4104), (8, 72)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 100, 255, 1000])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("n,k", SM90_SHAPES)
@pytest.mark.parametrize("tile", ["128", "256"])
def test_sm90_gemm_matches_reference(m, group_size, dtype, sym, n, k, tile, monkeypatch):
    _need_sm90_gemm()
    monkeypatch.setenv("INT4OPS_GEMM_TILE_TOKENS", tile)  # both kernel instantiations at every M
    w = _weight(n, k, group_size, sym, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = poisoned((m, n), dtype, "cuda")
    expected = "dequant" if (not sym and n % 16) else "fused"
    assert cuda._large_m_path(cuda._lib(), x, w.qweight, w.scales, w.zeros, out) == expected
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size, out=out)
    err = rel_err(y, w4a16_matmul_reference(x.float(), w))
    assert err <= TOL[dtype], f"rel_err {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sm90_gemm_scale_dtypes(x_dtype, scale_dtype):
    _need_sm90_gemm()
    w = _weight(272, 384, 64, False, scale_dtype, seed=3)
    x = torch.randn(333, 384, device="cuda", dtype=x_dtype)
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 384, 64, out=poisoned((333, 272), x_dtype, "cuda"))
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[x_dtype]


def _gemm_plan(m, n, k_rows):
    ws = ctypes.c_size_t(0)
    parts = cuda._lib().handle.int4ops_w4a16_gemm_sm90_plan(m, n, k_rows, cuda._sm_count(torch.cuda.current_device()),
                                                             ctypes.byref(ws))  # fmt: skip
    return parts, ws.value


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,group_size,sym", [(1000, 2048, 128, False), (777, 2120, 64, True), (1000, 512, 128, False)])
def test_sm90_gemm_last_wave_split(m, k, group_size, sym, dtype, monkeypatch):
    """~1.4 waves of 256-token tiles (4 token tiles x (SMs / 4 + 12) channel tiles; 6144 channels
    at M = 1000 on 132 SMs): without stream-K the channel tiles of the half-empty last wave run as
    a second launch (gemm_sm90_plan), either as 256-token tiles with K in two parts per cluster of
    two blocks (swap_halves; K >= 16 stages of 64) or as 128-token tiles (INT4OPS_GEMM_PAIRS=0,
    and K = 512). Neither adds a workspace; the pairs give the same bits on every call."""
    _need_sm90_gemm()
    monkeypatch.setenv("INT4OPS_GEMM_STREAM_K", "0")
    n = 128 * (cuda._sm_count(torch.cuda.current_device()) // 4 + 12)
    w = _weight(n, k, group_size, sym, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = w4a16_matmul_reference(x.float(), w)
    outs = {}
    for pairs in ("1", "0"):
        monkeypatch.setenv("INT4OPS_GEMM_PAIRS", pairs)
        assert _gemm_plan(m, n, w.qweight.shape[0]) == (1, 0)  # no K split through the workspace
        y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size, out=poisoned((m, n), dtype, "cuda"))
        assert rel_err(y, ref) <= TOL[dtype]
        for _ in range(2):
            assert torch.equal(cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size), y)
        outs[pairs] = y
    # Two K parts round differently from one pass: equal bits would mean the pairs never ran.
    assert torch.equal(outs["1"], outs["0"]) == (k < 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["last-wave", "stream-k"])
def test_sm90_gemm_second_launch_pdl(case, dtype, monkeypatch):
    """A call of two launches (the last-wave split; stream-K after a whole wave) starts the second
    with programmatic dependent launch. Same bits as with INT4OPS_PDL=0 (plain launches), eagerly
    and in a CUDA graph whose next kernel reads the whole output: the call must be complete, both
    launches' channels, when its second launch is."""
    _need_sm90_gemm()
    sm = cuda._sm_count(torch.cuda.current_device())
    m, n, k, stream_k = {"last-wave": (1000, 6144, 2048, "0"), "stream-k": (300, 128 * (sm + 5), 4104, "1")}[case]
    monkeypatch.setenv("INT4OPS_GEMM_STREAM_K", stream_k)
    w = _weight(n, k, 128, False, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = w4a16_matmul_reference(x.float(), w)
    outs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("INT4OPS_PDL", pdl)
        y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, 128, out=poisoned((m, n), dtype, "cuda"))
        assert rel_err(y, ref) <= TOL[dtype]
        g = torch.cuda.CUDAGraph()
        out = poisoned((m, n), dtype, "cuda")
        with torch.cuda.graph(g):
            copy = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, 128, out=out).clone()
        out.fill_(float("nan"))
        copy.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(copy, y) and torch.equal(out, y)
        outs.append(y)
    assert torch.equal(outs[0], outs[1])


def _gemm_kernels(call):
    """The names of the sm_90 GEMM kernels one call launches (CUDA activity in torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "w4a16_gemm_sm90_kernel" in e.name]


def _is_persistent(name):
    # The kernel's LaunchKind template argument, as the demangler prints an enum class value.
    return "LaunchKind)2" in name or "kPersistent" in name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["tokens-fastest", "channels-fastest", "128-token", "last-wave-split"])
def test_sm90_gemm_persistent(case, dtype, monkeypatch):
    """More whole tiles than SMs run on a persistent grid, one block per SM taking tiles b, b + SMs,
    ... (TileWork): the same bits as one block per tile (INT4OPS_GEMM_PERSISTENT=0), on shapes
    from the SM count: 2 waves + 100 tiles, 2 or 3 tiles a block, token tiles of a channel tile
    adjacent, partial token tile and K tail; 'channels-fastest', 4M > N, so consecutive tiles
    are channel tiles; '128-token' tiles (M <= 128); 'last-wave-split', 2 whole waves then the
    half-empty last one as a second launch of clusters (not persistent)."""
    _need_sm90_gemm()
    sm = cuda._sm_count(torch.cuda.current_device())
    m, n, k, group_size, sym = {
        "tokens-fastest": (300, 128 * (sm + 50), 1000, 64, False),
        "channels-fastest": (4000, 2048, 264, -1, True),
        "128-token": (100, 128 * (2 * sm + 40), 520, 32, False),
        "last-wave-split": (1000, 128 * (sm // 2 + 12), 2048, 128, False),
    }[case]
    w = _weight(n, k, group_size, sym, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = w4a16_matmul_reference(x.float(), w)

    def call():
        return cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size, out=poisoned((m, n), dtype, "cuda"))

    outs = {}
    for persistent in ("1", "0"):
        monkeypatch.setenv("INT4OPS_GEMM_PERSISTENT", persistent)
        kernels = _gemm_kernels(call)
        assert kernels, "the profiler saw no sm_90 GEMM kernel"
        assert any(_is_persistent(k) for k in kernels) == (persistent == "1"), kernels
        y = call()
        assert rel_err(y, ref) <= TOL[dtype]
        assert torch.equal(call(), y)
        outs[persistent] = y
    assert torch.equal(outs["1"], outs["0"])


def _check_parts(x, w, k, group_size, parts_ok, off_env, monkeypatch):
    """A call whose plan adds tile parts (parts_ok(parts), with a workspace) matches the
    reference, gives the same bits on every call, and matches the call with off_env=0, which
    adds no parts."""
    m, n, k_rows = x.shape[0], w.qweight.shape[1], w.qweight.shape[0]
    parts, ws = _gemm_plan(m, n, k_rows)
    assert parts_ok(parts) and ws > 0

    def call():
        return cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, group_size, out=poisoned((m, n), x.dtype, "cuda"))

    ref = w4a16_matmul_reference(x.float(), w)
    y = call()
    assert rel_err(y, ref) <= TOL[x.dtype]
    for _ in range(3):
        assert torch.equal(call(), y)
    monkeypatch.setenv(off_env, "0")
    assert _gemm_plan(m, n, k_rows) == (1, 0)
    whole = call()
    assert rel_err(whole, ref) <= TOL[x.dtype]
    assert rel_err(y, whole.float()) <= TOL[x.dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,group_size", [(64, 4096, 4096, 128), (300, 1024, 4104, 64), (17, 256, 1000, -1),
                                              (129, 2048, 2048, 32)])
def test_sm90_gemm_split_k(m, n, k, group_size, dtype, monkeypatch):
    """Split K (fewer tiles than SMs; 2-5 parts here, the last one shorter for K = 4104): the
    parts add up to the unsplit result within the tolerance, every call gives the same bits (the
    last part to finish adds them in a fixed order), and INT4OPS_GEMM_SPLIT_K=0 turns it off."""
    _need_sm90_gemm()
    w = _weight(n, k, group_size, False, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    _check_parts(x, w, k, group_size, lambda parts: parts > 1, "INT4OPS_GEMM_SPLIT_K", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["all-shared", "whole-wave-first", "tails"])
def test_sm90_gemm_stream_k(case, dtype, monkeypatch):
    """Stream-K (a last wave that would leave SMs idle; gemm_sm90_plan): one block per SM, each
    running an even share of the stages, the tiles cut by a block edge added up by hand_over.
    Shapes from the SM count: 'all-shared' has 1.33 waves of 128-token tiles, all shared out;
    'whole-wave-first' has 2 waves + 10 tiles of 256 tokens, so one wave runs whole tiles first
    and K ends past K (4104); 'tails' has partial token tiles, per-channel scales, no zero points.
    Checked against the reference and the same call without stream-K, and bitwise repeatable."""
    _need_sm90_gemm()
    sm = cuda._sm_count(torch.cuda.current_device())
    m, n, k, group_size, sym = {
        "all-shared": (100, 128 * (sm + sm // 3 + 1), 1000, 64, False),
        "whole-wave-first": (300, 128 * (sm + 5), 4104, 128, False),
        "tails": (1000, 128 * (sm // 2 + 3), 776, -1, True),
    }[case]
    w = _weight(n, k, group_size, sym, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    monkeypatch.setenv("INT4OPS_GEMM_STREAM_K", "1")
    _check_parts(x, w, k, group_size, lambda parts: parts == 2, "INT4OPS_GEMM_STREAM_K", monkeypatch)


@pytest.mark.gpu
def test_sm90_gemm_workspace_checked():
    """Called directly, the C side refuses a missing or short workspace and says how much it needs."""
    _need_sm90_gemm()
    lib = cuda._lib()
    m, n, k = 64, 4096, 4096
    w = _weight(n, k, 128, False, torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    parts, need = _gemm_plan(m, n, w.qweight.shape[0])
    assert parts > 1
    short = torch.empty(need - 16, dtype=torch.uint8, device="cuda")
    for ws, size in ((None, 0), (short.data_ptr(), need - 16)):
        rc = lib.handle.int4ops_w4a16_gemm_sm90(
            x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), out.data_ptr(), ws, size,
            m, n, k, w.qweight.shape[0], 128, 0, 0, x.device.index, torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
        with pytest.raises(cuda.CudaLibraryError, match=rf"needs a workspace of {need} bytes"):
            cuda._check(lib, rc)


@pytest.mark.gpu
def test_large_m_path_choice(monkeypatch):
    _need_sm90_gemm()
    lib = cuda._lib()
    w = _weight(256, 512, 128, False, torch.float16)
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    out = torch.empty(64, 256, device="cuda", dtype=torch.float16)
    assert cuda._large_m_path(lib, x, w.qweight, w.scales, w.zeros, out) == "fused"
    assert cuda.large_m_kernel(x.device).startswith("fused sm_90 GEMM")
    monkeypatch.setenv(cuda.ENV_LARGE_M, "dequant")
    assert cuda._large_m_path(lib, x, w.qweight, w.scales, w.zeros, out) == "dequant"
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 512, 128)
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.float16]
    monkeypatch.setenv(cuda.ENV_LARGE_M, "bogus")
    with pytest.raises(ValueError, match="INT4OPS_CUDA_LARGE_M"):
        cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 512, 128)
    monkeypatch.delenv(cuda.ENV_LARGE_M)
    # A 2-byte-offset x cannot be a TMA source: the dequantize path takes it.
    x_odd = torch.randn(64 * 512 + 1, device="cuda", dtype=torch.float16)[1:].view(64, 512)
    assert cuda._large_m_path(lib, x_odd, w.qweight, w.scales, w.zeros, out) == "dequant"
    y = cuda.w4a16_matmul(x_odd, w.qweight, w.scales, w.zeros, 512, 128)
    assert rel_err(y, w4a16_matmul_reference(x_odd.float(), w)) <= TOL[torch.float16]
    # So does an out the result cannot be stored into by TMA (a 4-byte offset).
    out_odd = torch.empty(64 * 256 + 2, device="cuda", dtype=torch.float16)[2:].view(64, 256)
    assert cuda._large_m_path(lib, x, w.qweight, w.scales, w.zeros, out_odd) == "dequant"
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, 512, 128, out=out_odd.fill_(float("nan")))
    assert y.data_ptr() == out_odd.data_ptr()
    assert rel_err(y, w4a16_matmul_reference(x.float(), w)) <= TOL[torch.float16]
    # Called directly with what it cannot take, the C side says which requirement failed.
    rc = lib.handle.int4ops_w4a16_gemm_sm90(
        x_odd.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(), out.data_ptr(), None, 0,
        64, 256, 512, w.qweight.shape[0], 128, 0, 0, x.device.index, torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    with pytest.raises(cuda.CudaLibraryError, match=r"w4a16_gemm_sm90 failed for M=64, N=256, K=512.*16-byte aligned"):
        cuda._check(lib, rc)
