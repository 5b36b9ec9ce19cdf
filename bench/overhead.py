"""Host-side cost of one W4A16 call, layer by layer down the stack (eager mode, no graphs).

    python -m bench.overhead            # on a GPU; tiny shapes, so the GPU work is negligible

Each line is the wall-clock time per call of a loop of calls followed by one synchronize: at
these sizes that is the Python + launch cost the layer adds. What eager decoding pays per
linear layer (CUDA graphs and torch.compile remove it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, device, iters: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also cProfile QuantLinear.forward (top functions)")
    args = ap.parse_args(argv)

    from int4ops import QuantLinear
    from int4ops.kernels import cuda, triton_w4a16
    from int4ops.ops import w4a16_linear

    dev = torch.device("cuda")
    lin = torch.nn.Linear(args.k, args.n, bias=False).to(dev, torch.float16)
    q = QuantLinear.from_linear(lin, group_size=128)
    x = torch.randn(args.m, args.k, device=dev, dtype=torch.float16)
    a = (x, q.qweight, q.scales, q.zeros, args.k, 128)
    cfg = triton_w4a16.choose_config(dev, args.m, args.n, args.k, 128, None)
    rows = [
        ("F.linear fp16 (cuBLAS)", lambda: F.linear(x, lin.weight)),
        ("QuantLinear.forward", lambda: q(x)),
        ("ops.w4a16_linear", lambda: w4a16_linear(*a, None, "auto")),
        ("torch.ops.int4ops.w4a16_mm (triton)", lambda: torch.ops.int4ops.w4a16_mm(*a, "triton")),
        ("triton_w4a16.w4a16_matmul", lambda: triton_w4a16.w4a16_matmul(*a)),
        (f"triton_w4a16._launch ({cfg['kernel']}, split_k={cfg.get('split_k')})",
         lambda: triton_w4a16._launch(cfg, *a, None)),
        ("torch.empty (output)", lambda: torch.empty((args.m, args.n), device=dev, dtype=torch.float16)),
    ]
    if cuda.available(dev):
        rows.insert(4, ("torch.ops.int4ops.w4a16_mm (cuda)", lambda: torch.ops.int4ops.w4a16_mm(*a, "cuda")))
        rows.append(("cuda.w4a16_matmul", lambda: cuda.w4a16_matmul(*a)))
    with torch.no_grad():
        print(f"{torch.cuda.get_device_name(dev)}, M={args.m} N={args.n} K={args.k}, us per call:")
        for name, fn in rows:
            print(f"  {per_call_us(fn, dev, args.iters):8.1f}  {name}")
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(lambda: [q(x) for _ in range(args.iters)])
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
