"""A few small calls of every kernel, for `compute-sanitizer --tool memcheck` (run on a GPU).

    compute-sanitizer --tool memcheck python csrc/tools/memcheck_cuda.py
"""

import logging
import os

import torch

from int4ops import quantize_rtn, w4a16_matmul_reference
from int4ops.kernels import cuda

log = logging.getLogger("memcheck_cuda")


def matmul_error(x, w, k, gs):
    """One call of the library's matmul; its relative Frobenius error against the reference."""
    y = cuda.w4a16_matmul(x, w.qweight, w.scales, w.zeros, k, gs)
    ref = w4a16_matmul_reference(x.float(), w)
    return ((y.float() - ref).norm() / ref.norm()).item()


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    # N % 8 == 0 and K % 8 == 0 run the streaming mma kernel at M <= 8: (256, 1000) with a K tail,
    # (200, 1000) and (8, 520) with lanes past N; the others run the general mma kernel.
    shapes = [(3, 72, 32, False), (129, 200, 64, True), (256, 1000, 128, False), (67, 300, -1, False),
              (200, 1000, 32, True), (8, 520, -1, False)]
    # On an H100/H200, M > 16 runs the sm_90 GEMM where N % 16 == 0 (or N % 8 == 0 without zero
    # points) and K % 8 == 0: (256, 1000), (8, 520) sym, (528, 776) (partial tiles, a K tail);
    # M = 17 and 300 run with 128-token tiles; 300 also with 256-token ones (INT4OPS_GEMM_TILE_TOKENS).
    shapes += [(528, 776, 64, False)]
    for n, k, gs, sym in shapes:
        w = quantize_rtn(torch.randn(n, k, device="cuda") * 0.05, group_size=gs, sym=sym)
        # mma decode at M <= 16, the scalar decode kernel at M <= 8, the large-M path above.
        for m, decode, tile in ((1, "mma", ""), (3, "mma", ""), (9, "mma", ""), (16, "mma", ""), (17, "mma", ""),
                                (300, "mma", "128"), (300, "mma", "256"), (1, "gemv", ""), (8, "gemv", "")):
            os.environ[cuda.ENV_DECODE] = decode
            os.environ["INT4OPS_GEMM_TILE_TOKENS"] = tile
            for dtype in (torch.float16, torch.bfloat16):
                # Exact-size allocations so out-of-bounds accesses hit unallocated memory.
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                err = matmul_error(x, w, k, gs)
                log.info("N=%d K=%d gs=%d sym=%s M=%d %s%s %s rel_err=%.2e", n, k, gs, sym, m, decode, tile, dtype, err)
        cuda.dequantize(w.qweight, w.scales, w.zeros, k, gs, torch.float16)
    # (256, 1000) above runs the GEMM with K split in 2 (2-3 tiles). Here 192 tiles of 256 tokens
    # on a 132-SM GPU: stream-K (one block per SM, tiles cut by block edges handed over through
    # the workspace), and without it the last wave's 15 channel tiles as a second launch, of
    # 256-token tiles with K in two parts per cluster of 2 blocks (distributed shared memory) or
    # (INT4OPS_GEMM_PAIRS=0) of 128-token tiles.
    os.environ["INT4OPS_GEMM_TILE_TOKENS"] = ""
    w = quantize_rtn(torch.randn(6144, 1024, device="cuda") * 0.05, group_size=128, sym=False)
    for stream_k, pairs in (("1", "1"), ("0", "1"), ("0", "0")):
        os.environ["INT4OPS_GEMM_STREAM_K"] = stream_k
        os.environ["INT4OPS_GEMM_PAIRS"] = pairs
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(1000, 1024, device="cuda", dtype=dtype)
            log.info("N=6144 K=1024 M=1000 stream-K=%s pairs=%s %s rel_err=%.2e", stream_k, pairs, dtype,
                     matmul_error(x, w, 1024, 128))
    os.environ.pop("INT4OPS_GEMM_STREAM_K")
    os.environ.pop("INT4OPS_GEMM_PAIRS")
    # 432 tiles at M = 2100 (9 token tiles, the last partial): a persistent grid of one block per
    # SM runs 396 of them, 3 a block, then the last wave's 36 as clusters; and 100 tiles of 128
    # tokens more than two waves' worth at M = 100, all on a persistent grid.
    for m, n in ((2100, 6144), (100, 128 * (2 * cuda._sm_count(0) + 100))):
        w = quantize_rtn(torch.randn(n, 1024, device="cuda") * 0.05, group_size=128, sym=False)
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, 1024, device="cuda", dtype=dtype)
            log.info("N=%d K=1024 M=%d persistent %s rel_err=%.2e", n, m, dtype, matmul_error(x, w, 1024, 128))
    torch.cuda.synchronize()
    log.info("done")


if __name__ == "__main__":
    main()
