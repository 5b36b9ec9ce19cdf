"""pytest-benchmark entry for those who like it (needs a CUDA GPU; skipped otherwise):

    python -m pytest bench/test_bench_kernels.py --benchmark-columns=median,iqr,rounds

Each benchmark times ``calls`` op calls over weight copies whose bytes exceed 2x L2 (cold
weights, as in bench/kernels.py) inside one CUDA graph replay; pytest-benchmark's wall clock
around ``replay(); synchronize()`` adds a few microseconds, so for publishable numbers use
``python -m bench.kernels`` (CUDA events, same-run baselines, roofline).
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 128]


def _graph(fns):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()

    def run():
        g.replay()
        torch.cuda.synchronize()

    return run


def _setup(n, k, m, backend):
    from bench import common
    from int4ops import quantize_rtn

    dev = torch.device("cuda")
    w = (torch.randn(n, k, device=dev) * 0.02).half()
    x = torch.randn(m, k, device=dev, dtype=torch.float16)
    l2 = common.l2_bytes(dev)
    if backend == "cublas":
        copies = [w] + [w.clone() for _ in range(common.copies_for(w.numel() * 2, l2) - 1)]
        return [lambda c=c: F.linear(x, c) for c in copies]
    q = quantize_rtn(w, 128)
    n_copies = common.copies_for(q.nbytes, l2)
    copies = [(q.qweight.clone(), q.scales.clone(), q.zeros.clone()) for _ in range(n_copies)]
    op = torch.ops.int4ops.w4a16_mm
    return [lambda c=c: op(x, c[0], c[1], c[2], k, 128, backend) for c in copies]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("backend", ["cublas", "triton", "cuda"])
def test_w4a16_fp16(benchmark, backend, n, k, m):
    if backend == "cuda":
        from int4ops.kernels import cuda as cuda_lib

        if not cuda_lib.available():
            pytest.skip(f"CUDA library unavailable: {cuda_lib.why_unavailable()}")
    fns = _setup(n, k, m, backend)
    fns[0]()  # compile / autotune outside the graph
    run = _graph(fns)
    benchmark.extra_info.update(calls=len(fns), n=n, k=k, m=m, backend=backend)
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
