"""Time the CUDA library against F.linear on Llama-3-8B layer shapes (run on a GPU).

Decode kernel at M = 1, 4, 8 and dequantize + cuBLAS at M = 1024, 4096, each vs F.linear
with a dense fp16 weight. Each timed call uses a different copy of the weights (rotating
through enough copies to exceed 2x L2), so weights come from HBM, as in a real model
forward. Timing: CUDA graph of `reps` calls, CUDA events, median over trials.

    python csrc/tools/bench_cuda.py --out results.json
"""

import argparse
import json
import logging
import statistics

import torch
import torch.nn.functional as F

from int4ops import quantize_rtn
from int4ops.kernels import cuda

log = logging.getLogger("bench_cuda")

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def time_graph(fns, trials=7, reps=None):
    """Median microseconds per call of the functions in `fns` (called round-robin)."""
    reps = reps or len(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,4,8,16,1024,4096")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    results = {"device": torch.cuda.get_device_name(dev), "library": cuda.library_info(), "rows": []}
    for name, (n, k) in SHAPES.items():
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        q = quantize_rtn(w16, group_size=128, sym=False)
        packed_bytes = q.nbytes
        copies = max(2, int(4 * l2 // packed_bytes) + 1)
        qs = [(q.qweight.clone(), q.scales.clone(), q.zeros.clone()) for _ in range(copies)]
        dcopies = max(2, int(4 * l2 // (n * k * 2)) + 1)
        ds = [w16.clone() for _ in range(dcopies)]
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            outs = torch.empty(m, n, device=dev, dtype=torch.float16)
            fns = [lambda t=t: cuda.w4a16_matmul(x, t[0], t[1], t[2], k, 128, out=outs) for t in qs]
            dense = [lambda w=w: F.linear(x, w) for w in ds]
            reps = max(len(fns), len(dense)) if m <= 16 else max(2, len(fns))
            t_q = time_graph(fns, reps=reps)
            t_d = time_graph(dense, reps=reps)
            gbs = packed_bytes / (t_q * 1e-6) / 1e9
            row = dict(layer=name, N=n, K=k, M=m, int4_us=round(t_q, 2), fp16_us=round(t_d, 2),
                       speedup=round(t_d / t_q, 2), int4_weight_GBps=round(gbs, 1))
            results["rows"].append(row)
            log.info("%-8s N=%5d K=%5d M=%4d  int4 %8.2f us  fp16 %8.2f us  x%.2f  (%.0f GB/s of packed weight)",
                     name, n, k, m, t_q, t_d, t_d / t_q, gbs)
        del qs, ds
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
