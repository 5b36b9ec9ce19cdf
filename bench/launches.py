"""GPU time of each kernel launch inside one Triton W4A16 call (x permute, GEMM or GEMV, split-K reduce).

    python -m bench.launches                                   # on a GPU, from the repo root
    python -m bench.launches --shapes 4096x4096 --ms 1,16,64 --out launches.txt

Small layers are latency-bound: at M = 16 on 4096x4096 a call is ~12 us of which ~2.5 us are the
two helper launches. This shows where a call's time goes: each point is captured in a CUDA graph
(one call per weight copy, copies > 2x L2 as in bench.kernels), replayed under torch.profiler,
and every kernel's mean duration (CUPTI) is printed next to the graph's time per call. The
kernel and config are the ones the op picks (the shipped table, else the heuristic), unless
INT4OPS_TRITON_KERNEL forces a path.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096", help="NxK,... (out x in features)")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--out", help="also append the lines to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.launches needs a CUDA GPU (it reads kernel durations from CUPTI)", file=sys.stderr)
        return 2

    from torch.profiler import ProfilerActivity, profile

    from bench.tune_triton import capture_graph, replay_time_us
    from int4ops import quantize_rtn
    from int4ops.kernels import triton_w4a16 as tw

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    lines = [f"# {torch.cuda.get_device_name(dev)}, {args.dtype}, group {args.group_size}: "
             "graph us/call, then each kernel's mean us per call (CUPTI)"]
    print(lines[0], flush=True)
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        w0 = quantize_rtn(torch.randn(N, K, device=dev, dtype=dtype), args.group_size, False)
        ws = [w0] + [quantize_rtn(torch.randn(N, K, device=dev, dtype=dtype), args.group_size, False)
                     for _ in range(max(1, math.ceil(2 * l2 / w0.nbytes)))]
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            calls = [lambda w=w: tw.w4a16_matmul(x, w.qweight, w.scales, w.zeros, K, args.group_size) for w in ws]
            graph = capture_graph(calls)
            per_call = replay_time_us(graph, len(calls))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.replays):
                    graph.replay()
                torch.cuda.synchronize()
            us = collections.defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    us[e.name] += e.time_range.elapsed_us()
            n = args.replays * len(calls)
            cfg = tw.choose_config(dev, M, N, K, args.group_size, None)
            line = (f"{N}x{K} M={M}: {per_call:.2f} us/call | "
                    + " + ".join(f"{name} {total / n:.2f}" for name, total in us.items())
                    + f" | {cfg}")
            print(line, flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
