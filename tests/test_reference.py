"""The reference matmul and the op entry point on the CPU."""

import pytest
import torch

from int4ops.ops import select_backend, w4a16_linear
from int4ops.quantize import quantize_rtn
from int4ops.reference import dequantize, w4a16_matmul_reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n,k,gs", [(1, 33, 172, 128), (5, 64, 256, 32), (3, 7, 40, -1)])
def test_reference_matches_dense_fp64(dtype, m, n, k, gs):
    w = quantize_rtn(torch.randn(n, k), gs)
    x = torch.randn(m, k).to(dtype)
    y = w4a16_matmul_reference(x, w)
    assert y.dtype == dtype and y.shape == (m, n)
    exact = x.double() @ dequantize(w, torch.float64).t()
    assert torch.allclose(y.double(), exact, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


def test_op_is_registered_with_a_fake_and_runs():
    w = quantize_rtn(torch.randn(16, 64), 32)
    x = torch.randn(3, 64)
    y = torch.ops.int4ops.w4a16_mm(x, w.qweight, w.scales, w.zeros, 64, 32, "reference")
    assert torch.equal(y, w4a16_matmul_reference(x, w))
    with torch.device("meta"):
        ym = torch.ops.int4ops.w4a16_mm(x.to("meta"), w.qweight.to("meta"), w.scales.to("meta"), None, 64, 32, "auto")
    assert ym.shape == (3, 16) and ym.device.type == "meta"


def test_opcheck_reference_path():
    w = quantize_rtn(torch.randn(16, 64), 32)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.int4ops.w4a16_mm.default, (x, w.qweight, w.scales, w.zeros, 64, 32, "reference"))


def test_linear_any_leading_shape_and_bias():
    w = quantize_rtn(torch.randn(16, 40), -1, sym=True)
    x = torch.randn(2, 3, 40)
    bias = torch.randn(16)
    y = w4a16_linear(x, w.qweight, w.scales, w.zeros, 40, -1, bias)
    assert y.shape == (2, 3, 16)
    assert torch.allclose(y, x @ dequantize(w).t() + bias, atol=1e-5)


def test_bad_inputs_name_the_problem():
    w = quantize_rtn(torch.randn(16, 40), 32)
    with pytest.raises(ValueError, match="in_features=40"):
        w4a16_linear(torch.randn(2, 41), w.qweight, w.scales, w.zeros, 40, 32)
    with pytest.raises(TypeError, match="floating point"):
        w4a16_linear(torch.ones(2, 40, dtype=torch.int64), w.qweight, w.scales, w.zeros, 40, 32)
    with pytest.raises(ValueError, match="backend"):
        select_backend(torch.randn(2, 40), "fast")


def test_env_override_and_cpu_auto(monkeypatch):
    x = torch.randn(2, 8)
    assert select_backend(x, "auto") == "reference"
    monkeypatch.setenv("INT4OPS_BACKEND", "reference")
    assert select_backend(x, "triton") == "reference"
    monkeypatch.setenv("INT4OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        select_backend(x, "auto")


@pytest.fixture
def measured_table(monkeypatch, tmp_path):
    """A fake measured table for a fake GPU, with the lookup caches cleared before and after."""
    import json

    from int4ops import ops

    table = {"NVIDIA Test GPU": {"source": "x.json", "date": "d", "group_size": 128, "shapes": {
        "64x32": {"1": "cuda", "4": "triton", "64": "triton"},
        "128x32": {"1": "cuda", "4": "cuda", "64": "cuda"},
        "256x32": {"1": "cuda", "4": "triton", "64": "triton"},
    }}}
    path = tmp_path / "auto_backend.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(ops, "AUTO_TABLE", path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    ready = {"triton": True, "cuda": True}
    monkeypatch.setattr(ops, "_triton_ready", lambda device: ready["triton"])
    monkeypatch.setattr(ops, "_cuda_ready", lambda device: ready["cuda"])
    ops._measured_table.cache_clear()
    ops._auto_cuda.cache_clear()
    yield ops, ready
    ops._measured_table.cache_clear()
    ops._auto_cuda.cache_clear()


def test_auto_uses_the_measured_table(measured_table):
    ops, ready = measured_table
    dev, f16 = torch.device("cpu"), torch.float16  # the device only keys the cache here
    t = ops._measured_table("NVIDIA Test GPU")
    assert t["64x32"] == {1: "cuda", 4: "triton", 64: "triton"}
    assert t["*"] == {1: "cuda", 4: "triton", 64: "triton"}  # most shapes' winner per M
    assert ops._measured_table("Some Other GPU") == {}
    assert ops._auto_cuda(dev, f16, 1, 64, 32)[0] == "cuda"  # exact shape and M
    assert ops._auto_cuda(dev, f16, 3, 64, 32)[0] == "triton"  # nearest M in log scale: 4
    assert ops._auto_cuda(dev, f16, 45, 128, 32)[0] == "cuda"  # nearest is 64
    assert ops._auto_cuda(dev, f16, 2, 999, 32)[0] == "cuda"  # unmeasured shape: "*", M 2 -> 1 (tie: smaller)
    assert ops._auto_cuda(dev, f16, 16, 999, 32)[0] == "triton"
    assert ops._auto_cuda(dev, torch.float32, 1, 64, 32)[0] == "reference"
    ready["cuda"] = False
    ops._auto_cuda.cache_clear()
    assert ops._auto_cuda(dev, f16, 1, 64, 32) == ("triton", "auto: Triton kernels available")


def test_compile_fullgraph_traces_the_op_not_its_implementation():
    from torch import nn

    from int4ops import QuantLinear

    q = QuantLinear.from_linear(nn.Linear(64, 16), group_size=32)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    x = torch.randn(3, 64)
    with torch.no_grad():
        out = torch.compile(q, backend=backend, fullgraph=True)(x)
    assert any("int4ops.w4a16_mm" in t for t in seen), seen
    assert torch.equal(out, q(x))  # eager inference takes the direct path: same numbers


def test_tracers_and_transforms_see_the_op():
    from torch import nn
    from torch.fx.experimental.proxy_tensor import make_fx

    from int4ops import QuantLinear

    q = QuantLinear.from_linear(nn.Linear(64, 16), group_size=32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        graph = make_fx(q, tracing_mode="real")(x)
        assert any("int4ops.w4a16_mm" in str(n.target) for n in graph.graph.nodes)
        traced = torch.jit.trace(q, x, check_trace=False)
        assert "int4ops::w4a16_mm" in str(traced.graph)
        assert torch.allclose(torch.vmap(q)(x.unsqueeze(1)).squeeze(1), q(x), atol=1e-6)
    # gradients do not depend on whether x requires grad: the op never differentiates scales
    q.scales.requires_grad_(True)
    q(x).sum().backward()
    assert q.scales.grad is None
