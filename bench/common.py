"""Shared benchmark plumbing: timing, bytes/FLOP accounting, roofline math, environment info,
and a small table printer. Pure-Python parts (accounting, roofline, table) are tested on CPU
in tests/test_bench_smoke.py.

Timing method on CUDA: a CUDA graph is captured that calls the op once for each of
``n_copies`` weight copies (enough copies that their bytes exceed 2x L2, so every call streams
its weight from HBM), each graph replay is bracketed by CUDA events, and per-call time is
replay time / calls in the graph. We report the median and p10/p90 over replays. If capture
fails (an op that syncs the host, say) we fall back to events around eager calls and say so.
On CPU (the ``--device cpu`` dry run) the same code times eager calls with a wall clock.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

log = logging.getLogger("bench")

MB = 1e6
GB = 1e9


# ----------------------------------------------------------------------------- accounting


def int4_weight_bytes(n: int, k: int, group_size: int, sym: bool, scale_bytes: int = 2) -> int:
    """Bytes of one packed weight in the stored format (qweight + scales + zeros), K padding included."""
    from int4ops.format import packed_nbytes

    return packed_nbytes(n, k, group_size, sym, scale_bytes)


def dense_weight_bytes(n: int, k: int, elem_bytes: int = 2) -> int:
    return n * k * elem_bytes


def io_bytes(m: int, n: int, k: int, act_bytes: int = 2) -> int:
    """Activation read (M x K) plus output written (M x N)."""
    return (m * k + m * n) * act_bytes


def point_bytes(kind: str, m: int, n: int, k: int, group_size: int = 128, sym: bool = False) -> int:
    """Fewest bytes a W4A16 ('int4') or dense fp16/bf16 ('dense') matmul must move through HBM."""
    w = int4_weight_bytes(n, k, group_size, sym) if kind == "int4" else dense_weight_bytes(n, k)
    return w + io_bytes(m, n, k)


def flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def roofline_time_s(nbytes: float, nflops: float, bw_bytes_s: float, peak_flops_s: float) -> float:
    """Lower bound on time: the larger of the memory time and the compute time."""
    return max(nbytes / bw_bytes_s, nflops / peak_flops_s)


def derive(point: dict, bw_bytes_s: float | None, peak_flops_s: float | None, ref_ms: float | None) -> dict:
    """Add GB/s, % of measured bandwidth, TFLOP/s and speedup over ``ref_ms`` to a timed point."""
    ms = point.get("ms")
    if not ms:
        return point
    s = ms * 1e-3
    point["gbps"] = point["bytes"] / s / GB
    point["tflops"] = point["flops"] / s / 1e12
    if bw_bytes_s:
        point["pct_bw"] = 100.0 * point["bytes"] / s / bw_bytes_s
    if ref_ms:
        point["speedup"] = ref_ms / ms
    return point


# ----------------------------------------------------------------------------- timing


def quantiles(xs: Sequence[float]) -> dict:
    xs = sorted(xs)

    def q(p):
        if len(xs) == 1:
            return xs[0]
        i = p * (len(xs) - 1)
        lo, hi = math.floor(i), math.ceil(i)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)

    return {"ms": statistics.median(xs), "p10": q(0.1), "p90": q(0.9), "reps": len(xs)}


def copies_for(nbytes_per_copy: int, l2_bytes: int, factor: float = 2.0, cap: int = 512) -> int:
    """How many weight copies a rotation needs so their total exceeds ``factor`` x L2."""
    if nbytes_per_copy <= 0:
        return 1
    return max(1, min(cap, math.ceil(factor * l2_bytes / nbytes_per_copy) + (1 if l2_bytes else 0)))


def make_replay(
    fns: Sequence[Callable[[], object]], device: torch.device, min_calls: int = 8, use_graph: bool = True
) -> tuple[Callable[[], None], str, int]:
    """One timed unit: ``fns`` called in order (each call on its own weight copy), repeated until
    at least ``min_calls`` calls, captured in a CUDA graph where possible.

    Returns ``(replay, method, calls)``; method is cuda-graph, cuda-events (capture failed:
    eager calls) or wall-clock (CPU). Callers warm the op up once before (Triton autotuning,
    cuBLAS handles).
    """
    rounds = max(1, math.ceil(min_calls / len(fns)))
    calls = len(fns) * rounds

    def run_all():
        for _ in range(rounds):
            for f in fns:
                f()

    if device.type != "cuda":
        return run_all, "wall-clock", calls
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                run_all()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run_all()

            # The graph reads the tensors fns read (weights, x) at their addresses, but does
            # not own them: hold fns, and through them those tensors, as long as the replay.
            def replay_graph(g=g, fns=fns):
                g.replay()

            return replay_graph, "cuda-graph", calls
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            log.warning("graph capture failed (%s: %s); timing eager calls", type(e).__name__, str(e)[:200])
            torch.cuda.synchronize()
    return run_all, "cuda-events", calls


def time_replays(replay: Callable[[], None], calls: int, device: torch.device, reps: int, warmup: int = 2,
                 budget_s: float = 0.5, min_reps: int = 5) -> list[float]:
    """Per-call times (ms) of up to ``reps`` replays after ``warmup`` untimed ones; stops early
    once ``budget_s`` is spent and at least ``min_reps`` replays are timed."""
    for _ in range(warmup):
        replay()
    if device.type != "cuda":
        times, t_end = [], time.perf_counter() + budget_s
        while len(times) < reps and (len(times) < min_reps or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            replay()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
        return times
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    t_end = time.perf_counter() + budget_s
    done = 0
    for i in range(reps):
        starts[i].record()
        replay()
        ends[i].record()
        done += 1
        if done >= min_reps and time.perf_counter() > t_end:
            break
    torch.cuda.synchronize()
    return [starts[i].elapsed_time(ends[i]) / calls for i in range(done)]


def bench_calls(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    min_calls: int = 8,
    reps: int = 20,
    warmup: int = 2,
    budget_s: float = 0.5,
    use_graph: bool = True,
) -> dict:
    """Time one call of ``fns`` (each call on its own weight copy), cycled in order.

    Returns quantiles of the per-call time in ms, plus ``method`` and ``calls`` (see make_replay).
    """
    replay, method, calls = make_replay(fns, device, min_calls, use_graph)
    times = time_replays(replay, calls, device, reps, warmup, budget_s, min_reps=2 if device.type != "cuda" else 5)
    return {**quantiles(times), "method": method, "calls": calls}


def bench_interleaved(units: dict[str, tuple[Callable[[], None], str, int]], device: torch.device, reps: int = 25,
                      budget_s: float = 0.25, rounds: int = 5, warmup: int = 2) -> dict[str, dict]:
    """Time several candidates of one point in alternation: ``rounds`` rounds, each timing about
    reps / rounds replays of every candidate, the order rotated by one each round.

    Why: a Hopper GPU at full tensor load sits at its power limit and its clock drifts by 10%
    or more with what ran just before (an H100 measured 1350-1530 MHz under sustained GEMMs).
    Timed one after the other, the candidate measured second inherits the first's heat; in
    alternation every candidate sees the same mix of states. ``units`` maps a name to
    ``make_replay``'s result; returns name -> quantiles (as ``bench_calls``), or
    ``{"error": ...}`` for a candidate whose replay raised.
    """
    names = list(units)
    rounds = max(1, min(rounds, reps))
    per_round = max(1, math.ceil(reps / rounds))
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for n in names:  # warm-up, also surfaces failures before any timing
        try:
            for _ in range(warmup):
                units[n][0]()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            errors[n] = f"{type(e).__name__}: {str(e)[:300]}"
    live = [n for n in names if n not in errors]
    for r in range(rounds):
        for i in range(len(live)):
            n = live[(i + r) % len(live)]
            if n in errors:
                continue
            replay, _, calls = units[n]
            try:
                times[n] += time_replays(replay, calls, device, per_round, warmup=0,
                                         budget_s=budget_s / rounds, min_reps=1)
            except Exception as e:  # noqa: BLE001
                errors[n] = f"{type(e).__name__}: {str(e)[:300]}"
                if device.type == "cuda":
                    torch.cuda.synchronize()
    out = {}
    for n in names:
        if n in errors:
            out[n] = {"error": errors[n]}
        else:
            out[n] = {**quantiles(times[n]), "method": units[n][1], "calls": units[n][2], "rounds": rounds}
    return out


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict:
    """Device-memory bandwidth: a device-to-device copy (bytes read + written) and a read-only
    pass (a sum: what a weight-streaming GEMV does). ``gbps`` is the larger, the ceiling that
    "% of measured bandwidth" refers to. The GPU is kept busy ~0.3 s first so it is at its
    working clocks (a first copy measured right after idle read 2.8 TB/s on an H200 whose
    warm copy does ~4 TB/s, which put cuBLAS above 100%)."""
    n = nbytes // 2
    a = torch.empty(n, dtype=torch.float16, device=device).fill_(1.0)
    b = torch.empty_like(a)
    if device.type == "cuda":
        t_end = time.perf_counter() + 0.3
        while time.perf_counter() < t_end:
            b.copy_(a)
            torch.cuda.synchronize(device)
    reps = 30 if device.type == "cuda" else 3
    copy = bench_calls([lambda: b.copy_(a)], device, min_calls=1, reps=reps, budget_s=2.0)
    read = bench_calls([lambda: a.sum(dtype=torch.float32)], device, min_calls=1, reps=reps, budget_s=2.0)
    del a, b
    copy_gbps = 2 * nbytes / (copy["ms"] * 1e-3) / GB
    read_gbps = nbytes / (read["ms"] * 1e-3) / GB
    return {"bytes": 2 * nbytes, "ms": copy["ms"], "copy_gbps": copy_gbps, "read_gbps": read_gbps,
            "gbps": max(copy_gbps, read_gbps), "method": copy["method"]}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192) -> dict:
    """Dense square matmul throughput (cuBLAS on CUDA) in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    t = bench_calls([lambda: torch.mm(a, b)], device, min_calls=1, reps=10 if device.type == "cuda" else 3, budget_s=2.0)
    del a, b
    return {"size": size, "dtype": dtype_name(dtype), "ms": t["ms"], "tflops": 2 * size**3 / (t["ms"] * 1e-3) / 1e12}


# ----------------------------------------------------------------------------- environment


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def env_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "gpu": "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        import int4ops

        info["int4ops"] = getattr(int4ops, "__version__", "?")
        info["int4ops_path"] = str(int4ops.__file__)
    except Exception as e:  # noqa: BLE001
        info["int4ops"] = f"import failed: {e}"
    try:
        from int4ops.kernels import cuda as cuda_lib

        lib = cuda_lib.library_info()
        info["cuda_library"] = {k: lib.get(k) for k in ("path", "loaded", "load_error", "archs")}
    except Exception as e:  # noqa: BLE001
        info["cuda_library"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        info["transformers"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_bytes=l2_bytes(device),
        )
    else:
        info["gpu"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe for file names)."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"


def default_out(prefix: str, info: dict) -> str:
    gpu = slug(info["gpu"].replace("NVIDIA", "")) if info["gpu"].startswith("NVIDIA") else slug(info["gpu"].split(" ")[0])
    return f"bench/results/{prefix}_{gpu}_{info['date'][:10]}.json"


def write_json(path, doc: dict) -> None:
    """Write atomically (temp file + rename), so a run killed mid-write leaves the last complete file."""
    import json
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


# ----------------------------------------------------------------------------- table printer


def fmt(v, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if spec:
        return format(v, spec)
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """A fixed-width text table, or a GitHub markdown table with ``markdown=True``."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
