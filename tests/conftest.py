"""Shared test setup.

- Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set
  before any kernel module is imported, which is why it is set here).
- Tests marked ``gpu`` are skipped without CUDA.
- Data from ``$INT4OPS_SHARED`` (default ``../shared``): missing data skips with a reason,
  except under CI (``CI`` set), where it fails.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent

# Relative Frobenius error bounds of a kernel against the fp32 reference.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in fp64; NaN anywhere (an unwritten output) gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write is caught."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def shared_path(*parts: str) -> Path:
    root = Path(os.environ.get("INT4OPS_SHARED", REPO.parent / "shared"))
    p = root.joinpath(*parts)
    if not p.exists():
        msg = f"test data {p} not found (set INT4OPS_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
