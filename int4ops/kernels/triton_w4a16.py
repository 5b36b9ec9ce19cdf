"""Triton backend of ``torch.ops.int4ops.w4a16_mm``: argument checks, kernel choice, configs.

Five paths (each kernel next to its launcher):

    gemv       triton_gemv.py  w4a16_gemv            decode, M = 1: a weight stream, split-K
    gemv_mma   gluon_gemv.py   w4a16_gemv_mma        M = 1 on sm_90: that stream, multiply-adds on mma.sync (Gluon)
    gemm       triton_gemm.py  w4a16_gemm            M = 1..128: fused tensor-core tiles (W on the left), split-K
    gemm_sm90  gluon_sm90.py   w4a16_gemm_sm90       M > 16 on sm_90: fused, warp-specialised wgmma (Gluon)
    dequant    triton_gemm.py  w4a16_dequant_matmul  large M elsewhere: dequantize to a dense buffer + cuBLAS

``w4a16_matmul`` picks one and its config per call from the M/N/K/group size:

1. a tuned table shipped for this GPU (``tuned/<gpu name>.json``, measured offline with
   the tuning script described in notes/triton_kernels.md; keyed by "NxK" and a few M values, the nearest M in log scale is used);
2. otherwise a heuristic (``heuristic_config``) that needs no benchmarking, so an untuned
   GPU never stalls on autotuning: the first call of a new config costs only Triton's JIT
   compile (see notes/triton_kernels.md), later calls a dict lookup.

The Gluon kernels take over on sm_90 GPUs (not in the interpreter) where they were measured faster:
``gemv_mma`` from ``gemv`` at M = 1 (fp16/bf16, K % 8 == 0), ``gemm_sm90`` from ``gemm``/``dequant``
(``sm90_default``). Where a call's shape or pointers do not suit one, the path chosen without it
runs (``portable_config``).
``INT4OPS_TRITON_KERNEL=gemv|gemv_mma|gemm|dequant|gemm_sm90`` forces one path (with its heuristic config):
a debugging and testing knob.

Nothing here reads tensor values on the host, so calls are CUDA-graph capturable and
torch.compile-friendly (the op is opaque to Dynamo anyway).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from ..format import effective_group_size, validate

log = logging.getLogger("int4ops")

try:
    import triton  # noqa: F401

    from triton.runtime.errors import OutOfResources

    from .triton_gemm import w4a16_dequant_matmul, w4a16_gemm
    from .triton_gemv import w4a16_gemv

    LAUNCHERS = {"gemv": w4a16_gemv, "gemm": w4a16_gemm, "dequant": w4a16_dequant_matmul}

    _IMPORT_ERROR = None
except ImportError as e:  # no Triton (e.g. macOS / Windows): the op falls back elsewhere
    _IMPORT_ERROR = e

try:  # Gluon is experimental: a Triton without it (or with another API) only loses gemm_sm90
    from . import gluon_sm90

    LAUNCHERS["gemm_sm90"] = gluon_sm90.w4a16_gemm_sm90
    _SM90_ERROR = None
except Exception as e:  # noqa: BLE001 - ImportError, or AttributeError from an API change
    gluon_sm90 = None
    _SM90_ERROR = e

try:  # the same for the decode kernel
    from . import gluon_gemv

    LAUNCHERS["gemv_mma"] = gluon_gemv.w4a16_gemv_mma
    _GEMV_MMA_ERROR = None
except Exception as e:  # noqa: BLE001
    gluon_gemv = None
    _GEMV_MMA_ERROR = e

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNELS = ("gemv", "gemv_mma", "gemm", "dequant", "gemm_sm90")
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_INT32_LIMIT = 2**31


def available(device) -> bool:
    """Whether the kernels can run on ``device``: CUDA with Triton, or CPU under the interpreter."""
    if _IMPORT_ERROR is not None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _fit_k(block_k: int, K: int) -> int:
    """A K-tile not needlessly larger than K, and >= 16."""
    return max(16, min(block_k, _pow2_at_least(K)))


def _block_k(group_size: int, K: int, cap: int) -> int:
    """Largest power of two <= cap that divides the group size (any, per channel), >= 16,
    and not needlessly larger than K."""
    return _fit_k(cap if group_size == -1 else min(cap, group_size), K)


def _split_for(programs: int, k_tiles: int, sms: int, waves: int, cap: int) -> int:
    """Split K until there are ~waves programs per SM (HBM needs many loads in flight)."""
    if programs >= waves * sms:
        return 1
    return max(1, min(k_tiles, cap, math.ceil(waves * sms / max(1, programs))))


def heuristic_config(kernel: str, M: int, N: int, K: int, group_size: int, sms: int) -> dict:
    """A benchmark-free config for ``kernel``: what the H200 tuning favoured, scaled by the SM
    count; used for untuned GPUs and shapes, and in the interpreter."""
    if kernel == "gemv":
        # K-tile (codes; the kernel splits it into one sub-tile per group) and features per
        # tile, by group size: what the H100 and H200 tuning favoured at M = 1 (session 15).
        # At groups >= 128 and per channel, two groups of 128 by 32 features ([32, 32] words:
        # 2 x 16-byte loads per thread at 4 warps); untuned on an H100 that beat the session-14
        # rule on 9 of 10 shapes x groups, by 1-4%. At 32, eight groups by 64 features; at 64,
        # two by 32: within 0-11% of the tuned configs on the five 8B/70B shapes, where the
        # session-14 rule (one group per tile) was 1.2-2.3x slower
        # (bench/results/gemv_heuristic_h100_2026-11-22_session15.txt).
        block_k, block_n = {32: (256, 64), 64: (128, 32)}.get(group_size, (256, 32))
        block_k = _fit_k(block_k, K)
        block_n = max(16, min(block_n, _pow2_at_least(N)))
        programs = M * math.ceil(N / block_n)
        split_k = _split_for(programs, math.ceil(K / block_k), sms, waves=6, cap=16)
        return dict(kernel="gemv", block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=1)
    if kernel == "dequant":
        return dict(kernel="dequant", block_n=64, block_k=_block_k(group_size, K, 128), num_warps=4)
    if kernel == "gemm_sm90":
        return dict(kernel="gemm_sm90")  # tiles, K split and ring depth: gluon_sm90.plan and _stages
    if kernel == "gemv_mma":
        # 4 warps of 2 word rows per lane per step (the fastest in fp16 on the five 8B/70B layers,
        # within ~3% in bf16; notes item 33), K split for ~8 CTAs per SM.
        return dict(kernel="gemv_mma", warps_k=4, rows_per_lane=2,
                    split_k=gluon_gemv.split_rule(N, K, sms) if gluon_gemv is not None else 1)
    # Fused GEMM (H100 tuning, 2026-11-22, PTX unpacking): the activation rows are the MMA's N,
    # so the row tile only needs to cover M; 64-feature tiles at M <= 16 (more programs), 128
    # above; K split until ~3 programs per SM, and so that no program walks more than 16 K-tiles.
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64 if M <= 16 else 128
    tiles = math.ceil(M / block_m) * math.ceil(N / block_n)
    k_tiles = math.ceil(K / 128)
    split_k = max(_split_for(tiles, k_tiles, sms, waves=3, cap=8), min(8, math.ceil(k_tiles / 16)))
    return dict(kernel="gemm", block_m=block_m, block_n=block_n, block_k=128, split_k=split_k,
                num_warps=4 if block_m == 16 else 8, num_stages=3)


def default_kernel(M: int) -> str:
    """M = 1: the GEMV (its word_dot spends ~4 instructions per code; it beat the fused GEMM,
    which runs a single row on the tensor cores with 15 of 16 MMA rows idle, at all five
    H100 shapes). M = 2..128: the fused GEMM. Past M = 128 dequantize + cuBLAS wins."""
    if M == 1:
        return "gemv"
    return "gemm" if M <= 128 else "dequant"


def sm90_default(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> bool:
    """Whether ``gemm_sm90`` replaces the fused Triton GEMM / dequantize + cuBLAS on an sm_90 GPU.
    Measured on an H100, fp16/bf16, group 128, timed in alternation with the path it replaces:

    * M = 17-256 (one token tile, K split across CTAs, scales by TMA): at M = 32 and 64 ahead of
      the fused Triton GEMM on all five 8B/70B layers (e.g. 28672x4096 at M = 64: 42 against 58 us,
      4096x4096 bf16: 14.3 against 16.2), at M = 65-256 of the fused GEMM and dequantize + cuBLAS
      on the layers larger than 4096x4096 and at M = 128 on 4096x4096 (20.5 against 21.8 us; at
      M = 256 dequantize + cuBLAS stays 8% ahead there). At M = 16 it won on two layers, lost on
      two by 3-4%; below, and at M = 1 (GEMV: 7.0 against 9.1 us at 4096x4096), the Triton paths
      stay ahead (notes item 30).
    * M > 256 (256-token tiles): once they fill ~0.7 of a wave: from M = 512 on 6144x4096 and
      the 28672-feature layers, at M = 1024 on all five (0.76-0.92x of cuBLAS against 0.74-0.79x in
      session 18; 0.86-1.02x since the scales come by TMA). At M = 2048 ahead of dequantize +
      cuBLAS on all five layers in both dtypes (1-14% less time, one tie), and at M = 3072 on
      four of five in both dtypes (2-11%; 6144x4096 2-7% behind). At M = 4096 fp16 1-8% ahead on
      all five, bf16 even over the five layers (two 1-5% ahead, a tie, two 1-4% behind). Until
      session 23 bf16 kept dequantize + cuBLAS from M = 3072: its dequantization took an
      instruction more per pair (notes items 32, 34).
    (bench/results/kernels_h100_2026-11-22_sm90_run*.json, gluon_sm90_tma_scales_lab_h100_2026-11-23.json,
    large_m_h100_2026-11-23*.json, bf16_pairs_lab_h100_2026-11-23.json)"""
    if gluon_sm90 is None or not gluon_sm90.shape_ok(M, N, K, dtype):
        return False
    if M <= gluon_sm90.SMALL_M:
        return M > 16 and (M <= 128 or N * K > 4096 * 4096)
    tiles = math.ceil(M / gluon_sm90.BM) * math.ceil(N / gluon_sm90.BN)
    return tiles >= 0.7 * sms


def tuned_file(device_name: str) -> Path:
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


# The Gluon paths: module (None when its import failed) and that import's error. Each module has
# capable(device), shape_ok(M, N, K, dtype), pointers_ok(x, qweight) and NEEDS_SHAPE/NEEDS_POINTERS.
_GLUON = {"gemm_sm90": (gluon_sm90, _SM90_ERROR), "gemv_mma": (gluon_gemv, _GEMV_MMA_ERROR)}


@functools.lru_cache(maxsize=None)
def _gluon_capable(kernel: str, device: torch.device) -> bool:
    """Gluon path ``kernel`` can run here: its module imported, its GPU, not the interpreter."""
    module = _GLUON[kernel][0]
    return module is not None and module.capable(device) and os.environ.get("TRITON_INTERPRET") != "1"


def sm90_capable(device: torch.device) -> bool:
    """gemm_sm90 can run here."""
    return _gluon_capable("gemm_sm90", device)


def gemv_mma_capable(device: torch.device) -> bool:
    """gemv_mma can run here."""
    return _gluon_capable("gemv_mma", device)


@functools.lru_cache(maxsize=None)
def _device_info(device: torch.device) -> tuple[int, dict]:
    """(SM count, tuned tables) of a device, read once per device. The tables are
    {"base": {"NxK": {M: config}}, "groups": {group: {"NxK": {M: config}}}}: "base" was tuned
    at the file's group_size (128), "groups" holds entries tuned at other group sizes."""
    if device.type != "cuda":
        return 8, {}
    props = torch.cuda.get_device_properties(device)
    path = tuned_file(props.name)
    table = {}
    if path.exists():
        table = tuned_tables(json.loads(path.read_text()))
        log.info("int4ops: Triton configs for %s from %s (%d shapes)", props.name, path.name, len(table["base"]))
    else:
        log.info("int4ops: no tuned Triton configs for %s; using heuristics", props.name)
    return props.multi_processor_count, table


def tuned_tables(data: dict) -> dict:
    """A tuned file's JSON as the tables _tuned reads (M keys as ints)."""
    by_shape = lambda configs: {shape: {int(m): cfg for m, cfg in by_m.items()} for shape, by_m in configs.items()}
    return {"base": by_shape(data["configs"]),
            "groups": {int(g): by_shape(c) for g, c in data.get("configs_by_group", {}).items()}}


def _tuned(table: dict, M: int, N: int, K: int, group_size: int) -> dict | None:
    """The tuned config nearest M (log scale) for this shape: one tuned at this group size if
    the table has one for that M, else the base table's, fitted to the group."""
    shape = f"{N}x{K}"
    own = table.get("groups", {}).get(group_size, {}).get(shape, {})
    by_m = {**{m: (c, False) for m, c in table.get("base", {}).get(shape, {}).items()},
            **{m: (c, True) for m, c in own.items()}}
    if not by_m:
        return None
    m_key = min(by_m, key=lambda m: (abs(math.log2(m) - math.log2(M)), -m))
    cfg, at_this_group = dict(by_m[m_key][0]), by_m[m_key][1]
    if cfg["kernel"] != "dequant" and M > 4 * m_key:
        return None  # tuned for far fewer rows (e.g. split-K settings): the heuristic is safer
    if cfg["kernel"] == "dequant" and not at_this_group:  # its K-tile must divide the group
        cfg["block_k"] = _block_k(group_size, K, cfg["block_k"])
    elif cfg["kernel"] == "gemv":  # any K-tile: it splits itself into one sub-tile per group
        cfg["block_k"] = _fit_k(cfg["block_k"], K)
    return cfg


@functools.lru_cache(maxsize=4096)
def choose_config(device: torch.device, M: int, N: int, K: int, group_size: int, forced: str | None,
                  dtype: torch.dtype = torch.float16) -> dict:
    sms = _device_info(device)[0]
    if forced is None and gemv_mma_capable(device) and gluon_gemv.shape_ok(M, N, K, dtype):
        return heuristic_config("gemv_mma", M, N, K, group_size, sms)  # ahead of the GEMV's tuned table
    if forced is None and sm90_capable(device) and sm90_default(M, N, K, dtype, sms):
        return heuristic_config("gemm_sm90", M, N, K, group_size, sms)
    return portable_config(device, M, N, K, group_size, forced)


@functools.lru_cache(maxsize=4096)
def portable_config(device: torch.device, M: int, N: int, K: int, group_size: int,
                    forced: str | None = None) -> dict:
    """The choice among the plain-Triton paths: the tuned table's, else the heuristic's. Also
    what runs when a Gluon kernel was chosen but cannot take a call (e.g. a misaligned x)."""
    sms, table = _device_info(device)
    if forced is None:
        cfg = _tuned(table, M, N, K, group_size)
        if cfg is not None:
            return cfg
    return heuristic_config(forced or default_kernel(M), M, N, K, group_size, sms)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _check_args(x, qweight, scales, zeros, in_features, group_size, out):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)} (flatten leading dims first)")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    validate(qweight, scales, zeros, in_features, group_size)
    if x.shape[1] != in_features:
        raise ValueError(f"x has K={x.shape[1]} columns but the weight has in_features={in_features}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {qweight.device}")
    M, N = x.shape[0], qweight.shape[1]
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, N) or out.dtype != x.dtype:
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a {x.dtype} tensor of shape {(M, N)}, got {got}")
        if out.device != x.device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor on {x.device}")
    if max(x.numel(), M * N, qweight.numel()) >= _INT32_LIMIT:
        raise ValueError(f"problem too large for the kernels' int32 indexing: M={M}, N={N}, K={in_features}")


def w4a16_matmul(x, qweight, scales, zeros, in_features, group_size, out=None):
    """``x [M, K] @ dequant(W).T -> [M, N]`` in x.dtype (fp16/bf16; fp32 also works).

    W is in the packed format of int4ops.format. ``out`` (contiguous [M, N], x.dtype) is
    written if given. Runs on x's device; picks the kernel and config per call.
    """
    forced = os.environ.get("INT4OPS_TRITON_KERNEL") or None
    if forced not in (None, *KERNELS):
        raise ValueError(f"INT4OPS_TRITON_KERNEL must be one of {KERNELS}, got {forced!r}")
    _check_args(x, qweight, scales, zeros, in_features, group_size, out)
    M, N = x.shape[0], qweight.shape[1]
    if M == 0 or N == 0:
        return out if out is not None else x.new_empty((M, N))
    cfg = choose_config(x.device, M, N, in_features, group_size, forced, x.dtype)
    return _launch(cfg, x, qweight, scales, zeros, in_features, group_size, out, strict=forced is not None)


def run_kernel(kernel, x, qweight, scales, zeros, in_features, group_size, out=None, **config):
    """Run ``kernel`` ("gemv" or "gemm") explicitly: its heuristic config updated with
    ``config`` (block sizes, split_k, ...). For tests and tuning; same checks as above."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    _check_args(x, qweight, scales, zeros, in_features, group_size, out)
    M, N = x.shape[0], qweight.shape[1]
    cfg = {**heuristic_config(kernel, M, N, in_features, group_size, _device_info(x.device)[0]), **config}
    return _launch(cfg, x, qweight, scales, zeros, in_features, group_size, out, strict=True)


def _gluon_refusal(kernel: str, x, qweight, in_features) -> str | None:
    """Why Gluon path ``kernel`` cannot run this call, or None."""
    module, error = _GLUON[kernel]
    if module is None:
        return f"Gluon is unavailable in this Triton ({type(error).__name__}: {error})"
    if not _gluon_capable(kernel, x.device):
        return f"it needs an sm_90 GPU (Hopper) outside the Triton interpreter, got {x.device}"
    M, N = x.shape[0], qweight.shape[1]
    if not module.shape_ok(M, N, in_features, x.dtype):
        return f"it needs {module.NEEDS_SHAPE}, got M={M}, N={N}, K={in_features}, {x.dtype}"
    if not module.pointers_ok(x, qweight):
        return module.NEEDS_POINTERS
    return None


def _launch(cfg, x, qweight, scales, zeros, in_features, group_size, out, strict=False):
    M, N = x.shape[0], qweight.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    why = _gluon_refusal(cfg["kernel"], x, qweight, in_features) if cfg["kernel"] in _GLUON else None
    if why is not None:
        if strict:
            raise ValueError(f"kernel {cfg['kernel']} cannot run this call: {why}")
        cfg = portable_config(x.device, M, N, in_features, group_size)
    params = dict(cfg)
    launch = LAUNCHERS[params.pop("kernel")]
    gs = effective_group_size(in_features, group_size)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        try:
            return launch(x, qweight, scales, zeros, in_features, gs, out, **params)
        except OutOfResources as e:
            # A config too deep for this GPU's shared memory: shows up at the first (compiling)
            # call; drop a pipeline stage, and remember it in the (cached) config.
            if cfg.get("num_stages", 1) <= 1:
                raise
            log.warning("int4ops: %s; retrying with num_stages=%d", e, cfg["num_stages"] - 1)
            cfg["num_stages"] -= 1
            return _launch(cfg, x, qweight, scales, zeros, in_features, group_size, out)
