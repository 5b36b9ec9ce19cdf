"""The one op every quantized matmul goes through: ``torch.ops.int4ops.w4a16_mm``.

It is a ``torch.library`` custom op with a fake (meta) implementation, so torch.compile
traces through it without graph breaks and CUDA graphs capture it. Inside, it picks a
backend per call:

    reference  plain PyTorch dequantize + fp32 matmul (any device; the oracle)
    triton     fused Triton kernels (int4ops/kernels/triton_w4a16.py), CUDA tensors
    cuda       the CUDA C++ library (csrc/, loaded by int4ops/kernels/cuda.py), CUDA tensors
    auto       the fastest available for this device, M and dtype (see ``select_backend``)

``INT4OPS_BACKEND`` in the environment overrides the backend every caller asked for.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .format import Int4Weight, validate
from .reference import w4a16_matmul_reference

log = logging.getLogger("int4ops")

BACKENDS = ("auto", "triton", "cuda", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _triton_ready(x: torch.Tensor) -> bool:
    from .kernels import triton_w4a16

    return triton_w4a16.available(x.device)


def _cuda_ready(x: torch.Tensor) -> bool:
    from .kernels import cuda

    return x.is_cuda and cuda.available()


_announced: set = set()


def _announce(backend: str, why: str) -> None:
    """One log line per (backend, reason) for the life of the process."""
    if (backend, why) not in _announced:
        _announced.add((backend, why))
        log.info("int4ops: using the %s backend (%s)", backend, why)


def select_backend(x: torch.Tensor, requested: str) -> str:
    """Resolve ``requested`` (possibly overridden by INT4OPS_BACKEND) to a concrete backend."""
    check_backend(requested)
    env = os.environ.get("INT4OPS_BACKEND")
    if env:
        requested = check_backend(env)
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not _triton_ready(x):
            raise RuntimeError(
                f"backend='triton' was requested but Triton cannot run on {x.device} "
                "(needs a CUDA tensor and Triton, or TRITON_INTERPRET=1 on the CPU)"
            )
        return "triton"
    if requested == "cuda":
        if not _cuda_ready(x):
            from .kernels import cuda

            raise RuntimeError(f"backend='cuda' was requested but is unavailable: {cuda.why_unavailable(x)}")
        return "cuda"
    # auto
    if not x.is_cuda:
        _announce("reference", f"input on {x.device.type}, kernels need a GPU")
        return "reference"
    if x.dtype not in KERNEL_DTYPES:
        _announce("reference", f"activations are {x.dtype}; kernels take fp16/bf16")
        return "reference"
    if _triton_ready(x):
        _announce("triton", "auto: Triton kernels available on this GPU")
        return "triton"
    if _cuda_ready(x):
        _announce("cuda", "auto: Triton unavailable, CUDA library loaded")
        return "cuda"
    _announce("reference", "auto: neither Triton nor the CUDA library is available")
    return "reference"


@torch.library.custom_op("int4ops::w4a16_mm", mutates_args=())
def w4a16_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    in_features: int,
    group_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` in x.dtype, W in the packed format (see int4ops.format)."""
    which = select_backend(x, backend)
    if which == "triton":
        from .kernels import triton_w4a16

        return triton_w4a16.w4a16_matmul(x, qweight, scales, zeros, in_features, group_size)
    if which == "cuda":
        from .kernels import cuda

        return cuda.w4a16_matmul(x, qweight, scales, zeros, in_features, group_size)
    w = Int4Weight(qweight, scales, zeros, in_features, group_size)
    return w4a16_matmul_reference(x, w)


@w4a16_mm.register_fake
def _w4a16_mm_fake(x, qweight, scales, zeros, in_features, group_size, backend="auto"):
    return x.new_empty((x.shape[0], qweight.shape[1]))


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
    y = torch.ops.int4ops.w4a16_mm(x2, qweight, scales, zeros, in_features, group_size, backend)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, qweight.shape[1])
