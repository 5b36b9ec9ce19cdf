"""Loader and Python entry points of the CUDA library ``libint4ops_cuda.so`` (csrc/).

The library has a plain C ABI (csrc/int4ops_cuda.h) and links only a static CUDA runtime, so
it is independent of the torch build: we load it with ctypes and pass raw pointers
(``tensor.data_ptr()``), sizes, dtype codes and torch's current stream handle.

Where the library is looked for, in order (the first that exists is loaded):

1. ``$INT4OPS_CUDA_LIB`` (a file path) when set; then nothing else is tried.
2. ``<dir>/lib/libint4ops_cuda.so`` for each directory of the ``int4ops`` package's
   ``__path__``: the wheel install, and for an editable install (scikit-build-core redirect
   mode) both the source tree and the site-packages directory the CMake install went to.
3. ``build/*/libint4ops_cuda.so`` under the source checkout (a manual ``cmake --build``,
   or scikit-build-core's ``build-dir``).

Nothing here syncs with the GPU: launches go on the current stream and workspaces come from
torch's caching allocator, so calls are CUDA-graph capturable.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from pathlib import Path

import torch

from ..format import Int4FormatError, effective_group_size, validate

log = logging.getLogger("int4ops")

LIB_NAME = "libint4ops_cuda.so"
ENV_LIB = "INT4OPS_CUDA_LIB"

# dtype codes of csrc/int4ops_cuda.h
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
ACT_DTYPES = (torch.float16, torch.bfloat16)

# Largest M of the scalar decode kernel (INT4OPS_GEMV_MAX_M) and of the tensor-core decode
# kernel (INT4OPS_MMA_MAX_M) in csrc/int4ops_cuda.h. Above the latter, w4a16_matmul runs the
# large-M path (ENV_LARGE_M). See notes/cuda_backend.md for the crossovers.
GEMV_MAX_M = 8
MMA_MAX_M = 16
# Which decode kernel runs at M <= its limit: "mma" (tensor cores, default) or "gemv".
ENV_DECODE = "INT4OPS_CUDA_DECODE"
# Which path runs above MMA_MAX_M: "fused" (default) = the wgmma GEMM of csrc/w4a16_gemm_sm90.cu
# where it can run (sm_90 GPU, N % 8 == 0 (16 with zero points), K % 8 == 0, 16-byte aligned
# tensors), else dequantize + cuBLAS; "dequant" = always dequantize + cuBLAS.
ENV_LARGE_M = "INT4OPS_CUDA_LARGE_M"
# The dequantize + cuBLAS path dequantizes at most this many weight elements at a time
# (512 MiB of fp16), so a huge layer does not need a full dense copy at once. Not smaller:
# chunks that fit in L2 (8-16 Mi elements) were measured slower on an H100 (cuBLAS on
# narrow slices loses more than the L2 hits save: 0.33-0.74x vs 0.73-0.78x of cuBLAS at
# M = 1024); at 256 Mi no Llama-70B layer is split.
DEQUANT_CHUNK_ELEMS = 256 << 20


class CudaLibraryError(RuntimeError):
    """A call into libint4ops_cuda.so failed; the message names the kernel and shapes."""


def _search_paths() -> list[Path]:
    env = os.environ.get(ENV_LIB)
    if env:
        return [Path(env)]
    import int4ops

    paths: list[Path] = []
    for d in list(getattr(int4ops, "__path__", [])):
        paths.append(Path(d) / "lib" / LIB_NAME)
    repo = Path(__file__).resolve().parents[2]
    paths += sorted(Path(p) for p in glob.glob(str(repo / "build" / "*" / LIB_NAME)))
    paths.append(repo / "build" / LIB_NAME)
    seen, out = set(), []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


class _Lib:
    """The loaded library (or why it could not be loaded)."""

    def __init__(self, env_value):
        self.searched = _search_paths()
        self.path = next((p for p in self.searched if p.is_file()), None)
        self.handle = None
        self.error = None
        if self.path is None:
            self.error = f"{LIB_NAME} not found (searched: {', '.join(map(str, self.searched))})"
            return
        try:
            h = ctypes.CDLL(str(self.path))
        except OSError as e:
            self.error = f"cannot load {self.path}: {e}"
            return
        c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        try:
            h.int4ops_w4a16_gemv_plan.argtypes = [c_int, c_int, c_int, c_int, ctypes.POINTER(c_size_t)]
            h.int4ops_w4a16_gemv_plan.restype = c_int
            h.int4ops_w4a16_gemv.argtypes = [c_void_p] * 6 + [c_int] * 9 + [c_void_p]
            h.int4ops_w4a16_gemv.restype = c_int
            h.int4ops_w4a16_mma_plan.argtypes = [c_int, c_int, c_int, c_int, ctypes.POINTER(c_size_t)]
            h.int4ops_w4a16_mma_plan.restype = c_int
            h.int4ops_w4a16_mma.argtypes = [c_void_p] * 6 + [c_int] * 9 + [c_void_p]
            h.int4ops_w4a16_mma.restype = c_int
            h.int4ops_w4a16_gemm_sm90_plan.argtypes = [c_int, c_int, c_int, c_int, ctypes.POINTER(c_size_t)]
            h.int4ops_w4a16_gemm_sm90_plan.restype = c_int
            h.int4ops_w4a16_gemm_sm90.argtypes = [c_void_p] * 6 + [c_size_t] + [c_int] * 8 + [c_void_p]
            h.int4ops_w4a16_gemm_sm90.restype = c_int
            h.int4ops_w4a16_gemm_sm90_supported.argtypes = [c_int]
            h.int4ops_w4a16_gemm_sm90_supported.restype = c_int
            h.int4ops_dequantize.argtypes = [c_void_p] * 4 + [c_int] * 8 + [c_void_p]
            h.int4ops_dequantize.restype = c_int
            h.int4ops_cuda_last_error.restype = ctypes.c_char_p
            h.int4ops_cuda_archs.restype = ctypes.c_char_p
            h.int4ops_cuda_versions.argtypes = [ctypes.POINTER(c_int), ctypes.POINTER(c_int)]
            h.int4ops_cuda_versions.restype = c_int
            h.int4ops_cuda_probe.argtypes = [c_int]
            h.int4ops_cuda_probe.restype = c_int
        except AttributeError as e:  # an old or foreign .so
            self.error = f"{self.path} lacks an expected symbol ({e}); rebuild it"
            return
        self.handle = h

    def last_error(self) -> str:
        return self.handle.int4ops_cuda_last_error().decode(errors="replace")

    def archs(self) -> list[int]:
        """Compute capabilities with SASS in the library, e.g. [80, 86, 89, 90]."""
        out = []
        for a in self.handle.int4ops_cuda_archs().decode().split(","):
            num = a.split("-")[0]
            if num.isdigit():
                out.append(int(num))
        return out

    def versions(self) -> tuple[int, int]:
        rt, drv = ctypes.c_int(0), ctypes.c_int(0)
        self.handle.int4ops_cuda_versions(ctypes.byref(rt), ctypes.byref(drv))
        return rt.value, drv.value


@functools.lru_cache(maxsize=None)
def _load(env_value) -> _Lib:
    lib = _Lib(env_value)
    if lib.handle is None:
        log.debug("int4ops cuda: %s", lib.error)
    else:
        log.debug("int4ops cuda: loaded %s", lib.path)
    return lib


def _lib() -> _Lib:
    # Keyed by $INT4OPS_CUDA_LIB so changing it (tests do) takes effect without a restart.
    return _load(os.environ.get(ENV_LIB))


@functools.lru_cache(maxsize=None)
def _probe(lib: _Lib, device_index: int) -> str | None:
    """None if the kernels can run on this device, else why not (cached per device)."""
    rt, drv = lib.versions()
    if drv and drv < rt:
        return (
            f"the CUDA driver supports CUDA {drv // 1000}.{drv % 1000 // 10} but {lib.path.name} was built "
            f"with CUDA {rt // 1000}.{rt % 1000 // 10}; update the driver or rebuild with an older toolkit"
        )
    if lib.handle.int4ops_cuda_probe(device_index) != 0:
        return lib.last_error()
    return None


def _device_of(x) -> torch.device | None:
    if isinstance(x, torch.Tensor):
        return x.device
    if x is not None:
        return torch.device(x)
    return None


def why_unavailable(x=None) -> str:
    """Why the CUDA backend cannot run (for ``x``'s device when given), or "" when it can."""
    lib = _lib()
    if lib.handle is None:
        return lib.error
    dev = _device_of(x)
    if dev is not None and dev.type != "cuda":
        return f"input is on {dev}, the CUDA library needs a CUDA tensor"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    index = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    cc = 10 * major + minor
    archs = lib.archs()
    # SASS runs on the same major arch with an equal or higher minor; PTX (the last arch) JITs
    # forward. Report the mismatch before the driver does, in words.
    runnable = any(a // 10 == major and a <= cc for a in archs) or (archs and cc >= max(archs))
    if archs and not runnable:
        return f"library built for archs {archs} but GPU {index} is sm_{cc}"
    problem = _probe(lib, index)
    return problem or ""


def available(device=None) -> bool:
    """True when the library is loaded and its kernels can run on ``device`` (default: current).

    Cached per (INT4OPS_CUDA_LIB, device): the op asks this on every call.
    """
    if device is None:
        if not torch.cuda.is_available():
            return why_unavailable() == ""  # loads the library, reports "no CUDA device"
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached_why(_device_of(device)) == ""


def library_info() -> dict:
    """Where the library is, what it was built for, and any load error."""
    lib = _lib()
    info = {
        "path": str(lib.path) if lib.path else None,
        "searched": [str(p) for p in lib.searched],
        "loaded": lib.handle is not None,
        "load_error": lib.error,
        "archs": None,
        "cuda_runtime_version": None,
        "cuda_driver_version": None,
    }
    if lib.handle is not None:
        info["archs"] = lib.archs()
        info["archs_raw"] = lib.handle.int4ops_cuda_archs().decode()
        info["cuda_runtime_version"], info["cuda_driver_version"] = lib.versions()
    return info


_ready: dict = {}  # (INT4OPS_CUDA_LIB, device) -> why_unavailable(); keeps the hot path cheap


def _cached_why(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    key = (os.environ.get(ENV_LIB), device)
    why = _ready.get(key)
    if why is None:
        why = _ready[key] = why_unavailable(device)
    return why


def _ready_lib(x: torch.Tensor) -> _Lib:
    why = _cached_why(x.device)
    if why:
        raise RuntimeError(f"int4ops cuda: unavailable: {why}")
    return _lib()


def _check(lib: _Lib, rc: int) -> None:
    if rc != 0:
        raise CudaLibraryError(f"int4ops cuda: {lib.last_error()} (code {rc})")


def _check_weight(qweight, scales, zeros, in_features, group_size, device) -> None:
    validate(qweight, scales, zeros, in_features, group_size)  # shapes/dtypes only, no sync
    if qweight.device != device:
        raise ValueError(f"activations are on {device} but the quantized weight is on {qweight.device}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()})")


def dequantize(qweight, scales, zeros, in_features: int, group_size: int, dtype=torch.float16) -> torch.Tensor:
    """Dense ``W`` [N, K] in ``dtype`` (fp16/bf16/fp32), dequantized on the GPU.

    The kernel writes ``W^T`` ([K, N], coalesced both ways, see csrc/dequantize.cu); this
    returns its transposed view, so the result is [N, K] with strides (1, N). Call
    ``.contiguous()`` if a row-major copy is needed; ``F.linear`` takes it as is.
    """
    lib = _ready_lib(qweight)
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"dequantize: dtype must be fp16, bf16 or fp32, got {dtype}")
    _check_weight(qweight, scales, zeros, in_features, group_size, qweight.device)
    n = qweight.shape[1]
    wt = torch.empty((in_features, n), dtype=dtype, device=qweight.device)
    _dequantize_into(lib, wt, qweight, scales, zeros, in_features, group_size, 0, n)
    return wt.t()


def _dequantize_into(lib, wt, qweight, scales, zeros, in_features, group_size, n0, n1) -> None:
    """wt [K, n1 - n0] = W[n0:n1, :]^T."""
    n = qweight.shape[1]
    gs = effective_group_size(in_features, group_size)
    with torch.cuda.device(qweight.device):
        stream = torch.cuda.current_stream(qweight.device).cuda_stream
        rc = lib.handle.int4ops_dequantize(
            qweight.data_ptr() + 4 * n0,
            scales.data_ptr() + scales.element_size() * n0,
            None if zeros is None else zeros.data_ptr() + n0,
            wt.data_ptr(),
            n1 - n0,
            n,
            in_features,
            qweight.shape[0],
            gs,
            _DTYPE_CODES[wt.dtype],
            _DTYPE_CODES[scales.dtype],
            qweight.device.index,
            stream,
        )
    _check(lib, rc)


@functools.lru_cache(maxsize=None)
def _gemm_sm90_why_not(lib: _Lib, index: int) -> str:
    """"" if the sm_90 GEMM can run on cuda:index, else why not (cached per device)."""
    why = "" if lib.handle.int4ops_w4a16_gemm_sm90_supported(index) else lib.last_error()
    log.debug("int4ops cuda: sm_90 GEMM on cuda:%d: %s", index, why or "yes")
    return why


def large_m_kernel(device=None) -> str:
    """What this backend runs above M = 16 on ``device`` (for ``int4ops info``)."""
    dev = _device_of(device) or torch.device("cuda")
    why = _cached_why(dev)
    if why:
        return f"none ({why})"
    not_fused = _gemm_sm90_why_not(_lib(), dev.index if dev.index is not None else torch.cuda.current_device())
    if not_fused:
        return f"dequantize + cuBLAS ({not_fused})"
    return "fused sm_90 GEMM (dequantize + cuBLAS for shapes it does not take)"


def _large_m_path(lib: _Lib, x, qweight, scales, zeros, out) -> str:
    """"fused" or "dequant" for this call (see ENV_LARGE_M). The fused GEMM copies its operands
    with TMA, which wants 16-byte aligned bases and row strides (int4ops_cuda.h)."""
    mode = os.environ.get(ENV_LARGE_M, "fused")
    if mode not in ("fused", "dequant"):
        raise ValueError(f"{ENV_LARGE_M} must be 'fused' or 'dequant', got {mode!r}")
    n = qweight.shape[1]
    fits = (
        n % (8 if zeros is None else 16) == 0
        and x.shape[1] % 8 == 0
        and all(t.data_ptr() % 16 == 0 for t in (x, qweight, scales, out) + (() if zeros is None else (zeros,)))
    )
    if mode == "fused" and fits and not _gemm_sm90_why_not(lib, x.device.index):
        return "fused"
    return "dequant"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pointers(*tensors):
    """The C ABI's pointer arguments: each tensor's data pointer, None (NULL) for a missing one."""
    return [None if t is None else t.data_ptr() for t in tensors]


def _planned_workspace(plan, m: int, n: int, k_rows: int, device: torch.device):
    """Ask a kernel's plan function (``int4ops_*_plan(M, N, K_rows, sm_count, &bytes)``) how it
    splits this shape and how much scratch memory that needs; the workspace comes from torch's
    allocator (None when none is needed). Returns (plan's result, workspace, its bytes)."""
    ws_bytes = ctypes.c_size_t(0)
    result = plan(m, n, k_rows, _sm_count(device.index), ctypes.byref(ws_bytes))
    workspace = torch.empty((ws_bytes.value,), dtype=torch.uint8, device=device) if ws_bytes.value else None
    return result, workspace, ws_bytes.value


def w4a16_matmul(x, qweight, scales, zeros, in_features: int, group_size: int, out=None) -> torch.Tensor:
    """``x [M, K] @ W^T -> [M, N]`` in x.dtype (fp16/bf16) with the CUDA library.

    M <= MMA_MAX_M: the tensor-core decode kernel (its streaming fast path at M <= 8 on
    aligned inputs; ``INT4OPS_CUDA_DECODE=gemv``: the scalar one, M <= GEMV_MAX_M); fp32
    accumulation, split-K. Larger M: on an H100/H200, the fused wgmma GEMM (csrc/w4a16_gemm_sm90.cu;
    W rounded to x.dtype in registers, fp32 accumulation, K split when its tiles would leave SMs idle); elsewhere, or with
    ``INT4OPS_CUDA_LARGE_M=dequant``, dequantize to x.dtype (in column chunks of at most
    DEQUANT_CHUNK_ELEMS) and multiply with cuBLAS.
    ``out``, if given, must be a contiguous [M, N] tensor of x's dtype and device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D [M, K] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"int4ops cuda: activations must be fp16 or bf16, got {x.dtype}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects in_features={in_features}")
    lib = _ready_lib(x)
    _check_weight(qweight, scales, zeros, in_features, group_size, x.device)
    if not x.is_contiguous():
        x = x.contiguous()
    m, n, k = x.shape[0], qweight.shape[1], in_features
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {x.dtype} tensor of shape {(m, n)} on {x.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if m == 0:
        return out

    decode = os.environ.get(ENV_DECODE, "mma")
    if decode not in ("mma", "gemv"):
        raise ValueError(f"{ENV_DECODE} must be 'mma' or 'gemv', got {decode!r}")
    max_m = MMA_MAX_M if decode == "mma" else GEMV_MAX_M
    if m > max_m and _large_m_path(lib, x, qweight, scales, zeros, out) == "fused":
        # Where its tiles would leave SMs idle the GEMM splits K (or runs stream-K) and adds the
        # parts of a tile through a scratch workspace (fp32 parts + counters); the plan says how big.
        parts, workspace, ws_bytes = _planned_workspace(
            lib.handle.int4ops_w4a16_gemm_sm90_plan, m, n, qweight.shape[0], x.device
        )
        if parts < 1:
            _check(lib, parts)
        with torch.cuda.device(x.device):
            rc = lib.handle.int4ops_w4a16_gemm_sm90(
                *_pointers(x, qweight, scales, zeros, out, workspace),
                ws_bytes,
                m,
                n,
                k,
                qweight.shape[0],
                effective_group_size(in_features, group_size),
                _DTYPE_CODES[x.dtype],
                _DTYPE_CODES[scales.dtype],
                x.device.index,
                torch.cuda.current_stream(x.device).cuda_stream,
            )
        _check(lib, rc)
        return out
    if m > max_m:
        # Large M without the fused GEMM: cuBLAS at full tensor-core rate on a dense copy of the
        # weight; the dequantize costs one read of the packed weight and one write of the dense
        # one, which the M rows of matmul amortize. Chunked over N, into one reused buffer, and cuBLAS writes each
        # chunk's columns of `out` in place (leading dimension N, no copy of the output slice),
        # so the buffer stays bounded at no extra traffic.
        cols = min(n, max(64, DEQUANT_CHUNK_ELEMS // k // 64 * 64))
        buf = torch.empty((k * cols,), dtype=x.dtype, device=x.device)
        for n0 in range(0, n, cols):
            n1 = min(n, n0 + cols)
            wt = buf[: k * (n1 - n0)].view(k, n1 - n0)
            _dequantize_into(lib, wt, qweight, scales, zeros, in_features, group_size, n0, n1)
            torch.matmul(x, wt, out=out if n1 - n0 == n else out[:, n0:n1])
        return out

    index = x.device.index
    plan, run = (
        (lib.handle.int4ops_w4a16_mma_plan, lib.handle.int4ops_w4a16_mma)
        if decode == "mma"
        else (lib.handle.int4ops_w4a16_gemv_plan, lib.handle.int4ops_w4a16_gemv)
    )
    splits, workspace, _ = _planned_workspace(plan, m, n, qweight.shape[0], x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        rc = run(
            *_pointers(x, qweight, scales, zeros, out, workspace),
            m,
            n,
            k,
            qweight.shape[0],
            effective_group_size(in_features, group_size),
            _DTYPE_CODES[x.dtype],
            _DTYPE_CODES[scales.dtype],
            splits,
            index,
            stream,
        )
    _check(lib, rc)
    return out


__all__ = [
    "available",
    "large_m_kernel",
    "why_unavailable",
    "library_info",
    "w4a16_matmul",
    "dequantize",
    "CudaLibraryError",
    "Int4FormatError",
]
