"""The one op every quantized matmul goes through: ``torch.ops.int4ops.w4a16_mm``.

It is a ``torch.library`` custom op with a fake (meta) implementation, so torch.compile
traces through it without graph breaks and CUDA graphs capture it. Inside, it picks a
backend per call:

    reference  plain PyTorch dequantize + fp32 matmul (any device; the oracle)
    triton     fused Triton kernels (int4ops/kernels/triton_w4a16.py), CUDA tensors
    cuda       the CUDA C++ library (csrc/, loaded by int4ops/kernels/cuda.py), CUDA tensors
    auto       the fastest available for this GPU, shape and M (see ``select_backend``)

``INT4OPS_BACKEND`` in the environment overrides the backend every caller asked for.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

from .format import Int4Weight
from .reference import w4a16_grad_input_reference, w4a16_matmul_reference

log = logging.getLogger("int4ops")

BACKENDS = ("auto", "triton", "cuda", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _triton_ready(device: torch.device) -> bool:
    from .kernels import triton_w4a16

    return triton_w4a16.available(device)


def _cuda_ready(device: torch.device) -> bool:
    from .kernels import cuda

    return device.type == "cuda" and cuda.available(device)


_announced: set = set()


def _announce(backend: str, why: str) -> None:
    """One log line per (backend, reason) for the life of the process."""
    if (backend, why) not in _announced:
        _announced.add((backend, why))
        log.info("int4ops: using the %s backend (%s)", backend, why)


AUTO_TABLE = Path(__file__).resolve().parent / "kernels" / "auto_backend.json"


@functools.lru_cache(maxsize=None)
def _measured_table(gpu_name: str) -> dict:
    """{"NxK": {M: backend}} measured on this GPU model by bench/choose_backends.py, plus
    "*": {M: the backend that won most shapes at that M}; {} for an unmeasured GPU."""
    if not AUTO_TABLE.exists():
        return {}
    entry = json.loads(AUTO_TABLE.read_text()).get(gpu_name)
    if not entry:
        return {}
    shapes = {shape: {int(m): b for m, b in by_m.items()} for shape, by_m in entry["shapes"].items()}
    votes = collections.defaultdict(collections.Counter)
    for by_m in shapes.values():
        for m, b in by_m.items():
            votes[m][b] += 1
    shapes["*"] = {m: c.most_common(1)[0][0] for m, c in votes.items()}
    return shapes


@functools.lru_cache(maxsize=4096)
def _auto_cuda(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> tuple[str, str]:
    """(backend, why) for a CUDA input: the measured winner where we have one, else Triton,
    else the CUDA library, else the reference. Cached, so the choice costs a dict lookup."""
    if dtype not in KERNEL_DTYPES:
        return "reference", f"activations are {dtype}; kernels take fp16/bf16"
    ready = {"triton": _triton_ready(device), "cuda": _cuda_ready(device)}
    gpu = torch.cuda.get_device_name(device)
    table = _measured_table(gpu)
    by_m = table.get(f"{n}x{k}") or table.get("*")
    if by_m:
        nearest = min(by_m, key=lambda mm: (abs(math.log2(mm) - math.log2(max(m, 1))), mm))
        best = by_m[nearest]
        if ready.get(best):
            return best, f"auto: fastest measured on {gpu} (table {AUTO_TABLE.name})"
    if ready["triton"]:
        return "triton", "auto: Triton kernels available" + ("" if table else f" ({gpu} not in the measured table)")
    if ready["cuda"]:
        return "cuda", "auto: Triton unavailable, CUDA library loaded"
    return "reference", "auto: neither Triton nor the CUDA library is available"


def select_backend(x: torch.Tensor, requested: str, n: int | None = None) -> str:
    """Resolve ``requested`` (possibly overridden by INT4OPS_BACKEND) to a concrete backend
    for activations ``x`` [M, K] and ``n`` output features."""
    check_backend(requested)
    env = os.environ.get("INT4OPS_BACKEND")
    if env:
        requested = check_backend(env)
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not _triton_ready(x.device):
            raise RuntimeError(
                f"backend='triton' was requested but Triton cannot run on {x.device} "
                "(needs a CUDA tensor and Triton, or TRITON_INTERPRET=1 on the CPU)"
            )
        return "triton"
    if requested == "cuda":
        if not _cuda_ready(x.device):
            from .kernels import cuda

            raise RuntimeError(f"backend='cuda' was requested but is unavailable: {cuda.why_unavailable(x)}")
        return "cuda"
    if not x.is_cuda:
        _announce("reference", f"input on {x.device.type}, kernels need a GPU")
        return "reference"
    m, k = (x.shape[0], x.shape[-1]) if x.dim() == 2 else (1, x.shape[-1])
    backend, why = _auto_cuda(x.device, x.dtype, m, n or 0, k)
    _announce(backend, why)
    return backend


def _w4a16_mm_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    in_features: int,
    group_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` in x.dtype, W in the packed format (see int4ops.format)."""
    which = select_backend(x, backend, qweight.shape[1])
    if which == "triton":
        from .kernels import triton_w4a16

        return triton_w4a16.w4a16_matmul(x, qweight, scales, zeros, in_features, group_size)
    if which == "cuda":
        from .kernels import cuda

        return cuda.w4a16_matmul(x, qweight, scales, zeros, in_features, group_size)
    w = Int4Weight(qweight, scales, zeros, in_features, group_size)
    return w4a16_matmul_reference(x, w)


w4a16_mm = torch.library.custom_op("int4ops::w4a16_mm", _w4a16_mm_impl, mutates_args=())


@w4a16_mm.register_fake
def _w4a16_mm_fake(x, qweight, scales, zeros, in_features, group_size, backend="auto"):
    return x.new_empty((x.shape[0], qweight.shape[1]))


# Autograd: the packed weights are frozen (integer codes have no gradient), the activations
# are not, so LoRA-style adapters and input gradients work through a QuantLinear.
def _setup_context(ctx, inputs, output):
    _, qweight, scales, zeros, in_features, group_size, _ = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.in_features, ctx.group_size = in_features, group_size


def _backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    w = Int4Weight(qweight, scales, zeros, ctx.in_features, ctx.group_size)
    return w4a16_grad_input_reference(grad, w), None, None, None, None, None, None


w4a16_mm.register_autograd(_backward, setup_context=_setup_context)


def _plain_eager_inference(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """True when nothing could observe the difference between calling the op and calling its
    implementation: plain tensors, no tracer (torch.compile, export, jit.trace, make_fx),
    no dispatch mode or functorch transform (vmap, grad), and no gradient wanted."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or scales.requires_grad))


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear`` for a packed weight: x of any leading shape [..., K] -> [..., N].

    Checks here are shape/dtype/device comparisons only (no host syncs), so this is safe to
    call inside torch.compile and CUDA-graph capture.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects in_features={in_features}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"activations must be floating point (fp16/bf16/fp32), got {x.dtype}")
    if x.device != qweight.device:
        raise ValueError(f"input is on {x.device} but the quantized weight is on {qweight.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if _plain_eager_inference(x2, scales):
        # The op's own implementation, without the custom-op dispatcher, which costs ~40 us a
        # call (bench/results/overhead_h200_2026-11-22.txt). Everything else goes through the op.
        y = _w4a16_mm_impl(x2, qweight, scales, zeros, in_features, group_size, backend)
    else:
        y = torch.ops.int4ops.w4a16_mm(x2, qweight, scales, zeros, in_features, group_size, backend)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, qweight.shape[1])
