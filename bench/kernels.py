"""W4A16 kernel microbenchmarks against cuBLAS and other baselines, with a measured roofline.

    python -m bench.kernels                      # full sweep on the GPU (~3 min on an H100)
    python -m bench.kernels --quick              # a few shapes and M
    python -m bench.kernels --device cpu --quick # dry run of the same code paths on CPU (tiny shapes)

What is timed, per (shape N x K, M, dtype, backend): ``y[M, N] = x[M, K] @ W.T``.
  triton / cuda / reference   torch.ops.int4ops.w4a16_mm with that backend
  cublas                      F.linear with the dense fp16/bf16 weight (the speedup baseline)
  dequant+cublas              dequantize the int4 weight, then F.linear, every call (both timed)
  torch-int4pack              torch.ops.aten._weight_int4pack_mm (tinygemm; bf16 only)
  bitsandbytes / gemlite      when importable (nf4 / A16W4), otherwise skipped with a note

Method: see bench/common.py (CUDA graphs of calls over weight copies > 2x L2, CUDA events,
median and p10/p90 of replays). The same run measures copy bandwidth and the dense matmul
peak, and every point records bytes moved, GB/s, % of measured bandwidth, TFLOP/s and the
speedup over cuBLAS at the same dtype and M. Results go to JSON; ``python -m bench.report``
turns them into markdown and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common
from .common import DTYPES, dtype_name

log = logging.getLogger("bench")

# (name, N = out_features, K = in_features)
SHAPES = [
    ("8B qkv", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up", 28672, 4096),
    ("8B down", 4096, 14336),
    ("70B gate_up", 28672, 8192),
]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_SHAPES = [("8B o", 4096, 4096), ("8B gate_up", 28672, 4096)]
QUICK_MS = [1, 16, 128, 4096]
CPU_SHAPES = [("tiny", 256, 512), ("tiny-pad", 192, 320)]
CPU_MS = [1, 4, 16]
INT4_BACKENDS = ("triton", "cuda", "reference")


def fail(point: dict, err, device: torch.device) -> None:
    """Record a backend that failed at a point (the sweep goes on)."""
    text = err if isinstance(err, str) else f"{type(err).__name__}: {str(err)[:300]}"
    log.warning("%s %s M=%d %s failed: %s", point["shape"], point["dtype"], point["m"], point["backend"], text)
    point.update(ms=None, error=text)
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and M")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu for a dry run")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma list of fp16,bf16")
    p.add_argument("--shapes", default=None, help="comma list of NxK (out x in), e.g. 4096x4096,28672x4096")
    p.add_argument("--ms", default=None, help="comma list of M (tokens), e.g. 1,16,128")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128 (default) or -1")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (no zeros tensor)")
    p.add_argument("--backends", default=None, help="restrict to these (comma list of triton,cuda,reference,cublas,"
                   "dequant+cublas,torch-int4pack,bitsandbytes,gemlite)")
    p.add_argument("--with-reference", action="store_true", help="also time the reference backend (slow)")
    p.add_argument("--variant", action="append", default=[], metavar="BACKEND:VAR=VALUE",
                   help="also time BACKEND with the environment variable VAR=VALUE set while its calls are "
                   "captured, as backend 'BACKEND[VAR=VALUE]' (an A/B of a kernel switch in one run, timed in "
                   "alternation with the rest); repeatable, e.g. cuda:INT4OPS_GEMM_STREAM_K=0")
    p.add_argument("--no-graph", action="store_true", help="time eager calls with events instead of CUDA graphs")
    p.add_argument("--budget", type=float, default=0.25, help="max seconds of timed replays per point")
    p.add_argument("--reps", type=int, default=25, help="max timed replays per point")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: start no new shape after this "
                   "(the JSON says which were left out)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kernels_<gpu>_<date>.json)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    args.shapes = parse_shapes(args.shapes) if args.shapes else None
    args.ms = [int(m) for m in args.ms.split(",")] if args.ms else None
    args.backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    args.variants = []
    for v in args.variant:
        backend, sep, assign = v.partition(":")
        var, eq, value = assign.partition("=")
        if not (sep and eq and var) or backend not in INT4_BACKENDS:
            p.error(f"--variant wants BACKEND:VAR=VALUE with BACKEND one of {', '.join(INT4_BACKENDS)}, got {v!r}")
        args.variants.append((backend, var, value))
    return args


def _replay_with_env(values: dict, replay) -> None:
    with env_set(values):
        replay()


@contextlib.contextmanager
def env_set(values: dict):
    """Set environment variables for the block, then put the old values back."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    known = {(n, k): name for name, n, k in SHAPES}
    out = []
    for item in text.split(","):
        n, k = (int(v) for v in item.lower().strip().split("x"))
        out.append((known.get((n, k), f"{n}x{k}"), n, k))
    return out


# ----------------------------------------------------------------------------- backends


def int4_backends(device: torch.device) -> tuple[list[str], list[dict]]:
    """The int4ops backends that can run here, and a note for each that cannot."""
    ok, skipped = [], []
    try:
        from int4ops.kernels import triton_w4a16

        if triton_w4a16.available(device):  # on CPU only under TRITON_INTERPRET=1 (slow: opt in with --backends)
            ok.append("triton")
        else:
            skipped.append({"backend": "triton", "reason": f"not available on {device}"})
    except Exception as e:  # noqa: BLE001
        skipped.append({"backend": "triton", "reason": f"import failed: {type(e).__name__}: {e}"})
    try:
        from int4ops.kernels import cuda as cuda_lib

        if device.type == "cuda" and cuda_lib.available():
            ok.append("cuda")
        else:
            why = getattr(cuda_lib, "why_unavailable", None)
            reason = why(torch.empty(0, device=device)) if (why and device.type == "cuda") else f"not available on {device}"
            skipped.append({"backend": "cuda", "reason": str(reason)})
    except Exception as e:  # noqa: BLE001
        skipped.append({"backend": "cuda", "reason": f"import failed: {type(e).__name__}: {e}"})
    return ok, skipped


def make_dequant(device: torch.device):
    """(fn(Int4Weight, dtype) -> dense [N, K], label): the CUDA library's dequantize if loaded, else the reference."""
    from int4ops.reference import dequantize as ref_dequant

    try:
        from int4ops.kernels import cuda as cuda_lib

        if device.type == "cuda" and cuda_lib.available() and hasattr(cuda_lib, "dequantize"):
            def deq(w, dtype):
                return cuda_lib.dequantize(w.qweight, w.scales, w.zeros, w.in_features, w.group_size, dtype=dtype)

            return deq, "dequant+cublas = int4ops.kernels.cuda.dequantize then F.linear, both timed every call"
    except Exception:  # noqa: BLE001
        pass
    return ref_dequant, ("dequant+cublas = int4ops.reference.dequantize (fp32 PyTorch unpack; no CUDA library) then "
                         "F.linear, both timed every call")


def to_int4pack(w, inner_k_tiles: int = 8):
    """Convert an Int4Weight to torch's tinygemm layout: (packed weight, bf16 [G, N, 2] scale+zero).

    tinygemm dequantizes ``(q - 8) * s + zero``; ours is ``(q - z) * s``, so ``zero = (8 - z) * s``.
    """
    from int4ops.format import unpack_int4

    codes = unpack_int4(w.qweight)[:, : w.in_features].to(torch.int32)  # [N, K]
    s = w.scales.float()
    z = torch.full_like(s, 8.0) if w.zeros is None else w.zeros.float()
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
    if codes.is_cuda:
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles), sz
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), inner_k_tiles), sz


def int4pack_mm(x, wp, group_size, sz):
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, wp, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, wp, group_size, sz)


def int4pack_bytes(m, n, k, group_size):
    g = k // group_size
    return n * k // 2 + g * n * 2 * 2 + common.io_bytes(m, n, k)


def optional_peers() -> tuple[dict, list[dict]]:
    """Importable peer libraries, and a skip note for each that is not."""
    found, skipped = {}, []
    for name in ("bitsandbytes", "gemlite"):
        try:
            found[name] = __import__(name)
        except Exception as e:  # noqa: BLE001
            skipped.append({"backend": name, "reason": f"not importable ({type(e).__name__})"})
    return found, skipped


def bnb_setup(bnb, W, group_size):
    """bitsandbytes nf4 (its own 4-bit format, block size = our group size): (qweight, state)."""
    blocksize = group_size if group_size in (64, 128, 256) else 64
    return bnb.functional.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")


def gemlite_setup(gemlite, w, dtype):
    """gemlite A16W4 layer built from our codes/scales/zeros (its asymmetric group format)."""
    from int4ops.format import unpack_int4

    n, k = w.out_features, w.in_features
    codes = unpack_int4(w.qweight)[:, :k].contiguous()
    layer = gemlite.GemLiteLinear(4, group_size=w.group_size, in_features=k, out_features=n,
                                  input_dtype=gemlite.DType.FP16 if dtype == torch.float16 else gemlite.DType.BF16,
                                  output_dtype=gemlite.DType.FP16 if dtype == torch.float16 else gemlite.DType.BF16)
    z = torch.full_like(w.scales, 8) if w.zeros is None else w.zeros
    layer.pack(codes, w.scales.t().contiguous().to(dtype), z.t().contiguous().to(dtype), bias=None)
    return layer


# ----------------------------------------------------------------------------- the sweep


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_shape(name, n, k, dtype, ms, args, device, l2, backends, peers, results, skipped):
    from int4ops import quantize_rtn
    from int4ops.reference import dequantize as ref_dequant

    gs, sym = args.group_size, args.sym
    torch.manual_seed(0)
    W = (torch.randn(n, k, device=device, dtype=torch.float32) * 0.02).to(dtype)
    w0 = quantize_rtn(W, gs, sym=sym, scale_dtype=dtype)
    w4_bytes = common.int4_weight_bytes(n, k, gs, sym, scale_bytes=w0.scales.element_size())
    n4 = common.copies_for(w4_bytes, l2)
    nd = common.copies_for(n * k * W.element_size(), l2)
    q_copies = [w0] + [type(w0)(w0.qweight.clone(), w0.scales.clone(), None if sym else w0.zeros.clone(), k, gs)
                       for _ in range(n4 - 1)]
    d_copies = [W] + [W.clone() for _ in range(nd - 1)]
    deq, deq_label = make_dequant(device)
    W_ref = ref_dequant(w0, torch.float32)  # the oracle for rel_err: the dequantized weight in fp32

    # Optional/fragile baselines are set up once per shape; failures become notes.
    want = lambda b: args.backends is None or b in args.backends  # noqa: E731
    extra = {}
    if want("torch-int4pack"):
        if dtype != torch.bfloat16:
            pass  # tinygemm takes bf16 activations; it is timed in the bf16 pass only
        elif gs not in (32, 64, 128, 256) or k % (8 * 16) or n % 8:
            skipped.append({"backend": "torch-int4pack", "shape": name, "reason": f"needs group 32..256, K % 128 == 0"})
        else:
            try:
                extra["torch-int4pack"] = [to_int4pack(w) for w in q_copies]
            except Exception as e:  # noqa: BLE001
                skipped.append({"backend": "torch-int4pack", "shape": name, "reason": f"{type(e).__name__}: {str(e)[:160]}"})
    if "bitsandbytes" in peers and want("bitsandbytes") and device.type == "cuda":
        try:
            extra["bitsandbytes"] = [bnb_setup(peers["bitsandbytes"], W, gs)]
        except Exception as e:  # noqa: BLE001
            skipped.append({"backend": "bitsandbytes", "shape": name, "reason": f"{type(e).__name__}: {str(e)[:160]}"})
    if "gemlite" in peers and want("gemlite") and device.type == "cuda":
        try:
            extra["gemlite"] = [gemlite_setup(peers["gemlite"], w, dtype) for w in q_copies]
        except Exception as e:  # noqa: BLE001
            skipped.append({"backend": "gemlite", "shape": name, "reason": f"{type(e).__name__}: {str(e)[:160]}"})

    # Correctness is checked at the first M (GEMV path) and the first M >= 64 (GEMM path).
    check_ms = {ms[0], next((m for m in ms if m >= 64), ms[0])}
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=dtype)
        ref = x.float() @ W_ref.t() if m in check_ms else None
        cases = {}  # backend -> (list of callables, bytes, note)
        if want("cublas"):
            cases["cublas"] = ([lambda Wc=Wc: F.linear(x, Wc) for Wc in d_copies], common.point_bytes("dense", m, n, k), "")
        for b in backends:
            if want(b):
                op = torch.ops.int4ops.w4a16_mm
                fns = [lambda w=w, b=b: op(x, w.qweight, w.scales, w.zeros, k, gs, b) for w in q_copies]
                cases[b] = (fns, common.point_bytes("int4", m, n, k, gs, sym), "")
        envs = {}  # --variant backends: the environment their calls are captured under
        for b, var, value in args.variants:
            if b in backends:
                op = torch.ops.int4ops.w4a16_mm
                label = f"{b}[{var}={value}]"
                cases[label] = ([lambda w=w, b=b: op(x, w.qweight, w.scales, w.zeros, k, gs, b) for w in q_copies],
                                common.point_bytes("int4", m, n, k, gs, sym), f"{var}={value}")
                envs[label] = {var: value}
        if want("dequant+cublas"):
            fns = [lambda w=w: F.linear(x, deq(w, dtype)) for w in q_copies]
            cases["dequant+cublas"] = (fns, common.point_bytes("int4", m, n, k, gs, sym), deq_label)
        if "torch-int4pack" in extra:
            fns = [lambda p=p: int4pack_mm(x, p[0], gs, p[1]) for p in extra["torch-int4pack"]]
            cases["torch-int4pack"] = (fns, int4pack_bytes(m, n, k, gs), "aten._weight_int4pack_mm, inner_k_tiles=8")
        if "bitsandbytes" in extra:
            bnb = peers["bitsandbytes"]
            qw, st = extra["bitsandbytes"][0]
            fns = [lambda: bnb.matmul_4bit(x, qw.t(), quant_state=st)]
            cases["bitsandbytes"] = (fns, common.point_bytes("int4", m, n, k, gs, True), "nf4, one weight copy")
        if "gemlite" in extra:
            cases["gemlite"] = ([lambda lay=lay: lay(x) for lay in extra["gemlite"]], common.point_bytes("int4", m, n, k, gs, sym), "A16W4")

        # Warm up (compiles / autotunes outside the timed graph), check, capture each backend;
        # then time all of them in alternation (common.bench_interleaved says why).
        points, units = {}, {}
        for backend, (fns, nbytes, note) in cases.items():
            point = {"shape": name, "n": n, "k": k, "m": m, "dtype": dtype_name(dtype), "group_size": gs, "sym": sym,
                     "backend": backend, "copies": len(fns), "bytes": nbytes, "flops": common.flops(m, n, k), "note": note}
            points[backend] = point
            try:
                with env_set(envs.get(backend, {})):
                    out = fns[0]()
                    if ref is not None and backend != "cublas":
                        point["rel_err"] = rel_err(out, ref)
                    del out
                    slow = backend in ("dequant+cublas", "reference")  # one pass over the copies is plenty
                    replay, method, calls = common.make_replay(fns, device, min_calls=1 if slow else 8,
                                                               use_graph=not args.no_graph)
                if backend in envs and method != "cuda-graph":  # eager calls read the environment each time
                    replay = functools.partial(_replay_with_env, envs[backend], replay)
                units[backend] = (replay, method, calls)
            except Exception as e:  # noqa: BLE001
                fail(point, e, device)
        timed = common.bench_interleaved(units, device, reps=args.reps, budget_s=args.budget)
        for backend, point in points.items():
            t = timed.get(backend)
            if t is not None and "error" in t:
                fail(point, t["error"], device)
            elif t is not None:
                point.update(t)
            results.append(point)
            log.debug("%s", point)
        del units
        del x
    del q_copies, d_copies, extra, W, W_ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_derived(results: list[dict], bw: dict, peaks: dict) -> None:
    """Per point: GB/s, % of measured copy bandwidth, TFLOP/s, speedup over cuBLAS (same shape/M/dtype),
    and the roofline bound on that speedup: cuBLAS time / (int4 bytes at copy bandwidth, or FLOPs at peak)."""
    bw_b = bw["gbps"] * common.GB if bw else None
    base = {(p["shape"], p["m"], p["dtype"]): p.get("ms") for p in results if p["backend"] == "cublas"}
    for p in results:
        ref = base.get((p["shape"], p["m"], p["dtype"]))
        common.derive(p, bw_b, None, ref)
        peak = peaks.get(p["dtype"], {}).get("tflops")
        if bw_b and peak:
            ib = common.point_bytes("int4", p["m"], p["n"], p["k"], p["group_size"], p["sym"])
            p["roofline_ms"] = common.roofline_time_s(ib, p["flops"], bw_b, peak * 1e12) * 1e3
            if ref:
                p["bound_speedup"] = ref / p["roofline_ms"]


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cpu = device.type == "cpu"
    shapes = args.shapes or (CPU_SHAPES if on_cpu else QUICK_SHAPES if args.quick else SHAPES)
    ms = args.ms or (CPU_MS if on_cpu else QUICK_MS if args.quick else MS)
    info = common.env_info(device)
    l2 = common.l2_bytes(device)
    log.info("device %s | torch %s | triton %s | CUDA %s | L2 %.0f MB", info["gpu"], info["torch"], info["triton"],
             info["cuda"], l2 / common.MB)
    import int4ops  # noqa: F401  (registers torch.ops.int4ops)

    backends, skipped = int4_backends(device)
    if on_cpu and "triton" in backends and not (args.backends and "triton" in args.backends):
        backends.remove("triton")
        skipped.append({"backend": "triton", "reason": "CPU interpreter: only with --backends triton"})
    if args.with_reference or on_cpu:
        backends.append("reference")
    peers, peer_skips = optional_peers()
    skipped += peer_skips
    for s in skipped:
        log.info("skip %s: %s", s["backend"], s["reason"])

    # The matmul peaks first: they also bring the GPU to its working clocks for the copy.
    peaks = {dtype_name(dt): common.measure_matmul_peak(device, dt, 8192 if not on_cpu else 512) for dt in args.dtypes}
    bw = common.measure_copy_bandwidth(device, (1 << 30) if not on_cpu else (64 << 20))
    log.info("bandwidth %.0f GB/s (copy, read+write %.0f; read-only %.0f); dense peak %s", bw["gbps"],
             bw.get("copy_gbps", bw["gbps"]), bw.get("read_gbps", bw["gbps"]),
             ", ".join(f"{k} {v['tflops']:.0f} TFLOP/s" for k, v in peaks.items()))

    results: list[dict] = []
    doc = {"kind": "kernels", "env": info, "method": method_text(args, device, l2), "args": {
        "group_size": args.group_size, "sym": args.sym, "quick": args.quick, "graphs": not args.no_graph},
        "bandwidth": bw, "matmul_peak": peaks, "skipped": skipped, "results": results, "left_out": []}
    out = Path(args.out or common.default_out("kernels", info))
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = [(name, n, k, dtype) for name, n, k in shapes for dtype in args.dtypes]
    left_out = doc["left_out"]
    # shape outer, dtype inner: a time-limited run still compares dtypes
    for i, (name, n, k, dtype) in enumerate(todo):
        if args.time_limit and time.perf_counter() - t0 > args.time_limit:
            left_out.append(f"{name} {n}x{k} {dtype_name(dtype)} (time limit {args.time_limit:.0f}s)")
            log.warning("time limit: leaving out %s", left_out[-1])
            continue
        log.info("%s %dx%d %s: M in %s, backends %s", name, n, k, dtype_name(dtype), ms, backends)
        run_shape(name, n, k, dtype, ms, args, device, l2, backends, peers, results, skipped)
        add_derived(results, bw, peaks)
        # After every shape, so a killed run keeps its points and names what it never reached.
        pending = [f"{nm} {nn}x{kk} {dtype_name(dt)} (not reached: the run was stopped)" for nm, nn, kk, dt in todo[i + 1:]]
        common.write_json(out, {**doc, "left_out": left_out + pending})
    common.write_json(out, doc)
    log.info("wrote %s (%d points in %.0fs)", out, len(results), time.perf_counter() - t0)

    from . import report

    print(report.kernels_markdown(doc))
    if not args.no_plot:
        png = report.plot_kernels(doc, out.with_suffix(".png"))
        if png:
            log.info("wrote %s", png)
    failed = [p for p in results if p.get("error")]
    return 1 if results and len(failed) == len(results) else 0


def method_text(args, device, l2) -> str:
    if device.type != "cuda":
        return "CPU dry run: wall-clock around eager calls (numbers are meaningless; checks the code paths)"
    how = "events around eager calls" if args.no_graph else "CUDA events around replays of a captured CUDA graph"
    return (f"{how}; each graph calls the op once per weight copy, with enough copies that their bytes exceed "
            f"2x L2 ({2 * l2 / common.MB:.0f} MB) so weights stream from HBM; per-call time = replay / calls; "
            f"median and p10/p90 over up to {args.reps} replays (<= {args.budget}s) after warm-up; the backends "
            f"of a point are timed in alternation (5 rounds, order rotated each round), so none inherits "
            f"another's clock/power state")


if __name__ == "__main__":
    sys.exit(main())
