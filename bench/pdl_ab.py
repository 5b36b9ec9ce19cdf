"""Programmatic dependent launch on and off: the shipped Triton path, timed both ways.

    python -m bench.pdl_ab [--ms 1,4,16,64] [--out pdl.txt]      # on a GPU, from the repo root

Each point times ``w4a16_matmul`` with ``INT4OPS_PDL=0`` and with the default (on), twice each,
alternating, in fp16 and bf16 (same method as bench.tune_triton: one CUDA graph of one call
per weight copy, copies > 2.4x L2, median of 5 batches of replays), and checks that both give
the same bits. See ``use_pdl`` in int4ops/kernels/triton_gemv.py for what PDL changes.
"""

import argparse
import os

import torch
import torch.nn.functional as F

from bench.tune_triton import SHAPES, graph_time_us, weight_copies
from int4ops.kernels import triton_w4a16 as tw
from int4ops.kernels.triton_gemv import use_pdl


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,4,16,64")
    p.add_argument("--out", default=None, help="also write the lines to this file")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    import triton

    lines = [f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, PDL capable: {use_pdl(dev)}; "
             "us per call (speedup over cuBLAS fp16), PDL off / on / off / on"]
    print(lines[0], flush=True)
    for N, K in SHAPES:
        ws, dense = weight_copies(N, K, dev, props.L2_cache_size)
        w0 = ws[0]
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            t_cublas = graph_time_us([lambda d=d: F.linear(x, d) for d in dense])
            cfg = tw.choose_config(dev, M, N, K, 128, None)
            line = f"M={M:4d} {N:5d}x{K:5d} cublas {t_cublas:6.1f}  {cfg['kernel']:4s} split {cfg.get('split_k', 1):2d}"
            for dtype in (torch.float16, torch.bfloat16):
                xd = x.to(dtype)
                outs = {}
                line += f" | {str(dtype)[6:]}"
                for pdl in ("0", "1", "0", "1"):
                    os.environ["INT4OPS_PDL"] = pdl
                    outs[pdl] = tw.w4a16_matmul(xd, w0.qweight, w0.scales, w0.zeros, K, 128)
                    t = graph_time_us([lambda w=w: tw.w4a16_matmul(xd, w.qweight, w.scales, w.zeros, K, 128)
                                       for w in ws])
                    line += f" {t:6.1f} ({t_cublas / t:.2f}x)"
                if not torch.equal(outs["0"], outs["1"]):
                    line += " MISMATCH"
            os.environ.pop("INT4OPS_PDL", None)
            print(line, flush=True)
            lines.append(line)
        del ws, dense
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
