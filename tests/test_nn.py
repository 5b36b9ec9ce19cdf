"""QuantLinear: forward against the reference, state_dict round trip, repr, errors."""

import pytest
import torch
from torch import nn

from int4ops import QuantLinear, dequantize, quantize_rtn
from int4ops.format import Int4FormatError


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gs,sym", [(128, False), (32, True), (-1, False)])
def test_forward_matches_dequantized_linear(dtype, bias, gs, sym):
    lin = nn.Linear(100, 33, bias=bias)
    q = QuantLinear.from_linear(lin, group_size=gs, sym=sym)
    x = torch.randn(2, 3, 100).to(dtype)
    y = q(x)
    assert y.shape == (2, 3, 33) and y.dtype == dtype
    w = dequantize(q.weight_int4)
    ref = x.double() @ w.double().t() + (lin.bias.double() if bias else 0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.double(), ref, rtol=tol, atol=tol)


def test_non_contiguous_input():
    q = QuantLinear.from_linear(nn.Linear(64, 16), group_size=32)
    x = torch.randn(64, 5).t()  # [5, 64], not contiguous
    assert torch.equal(q(x), q(x.contiguous()))


def test_state_dict_round_trip():
    src = QuantLinear.from_linear(nn.Linear(172, 40, bias=True), group_size=128)
    sd = src.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}
    dst = QuantLinear(172, 40, bias=True, group_size=128, scale_dtype=src.scales.dtype)
    dst.load_state_dict(sd)
    x = torch.randn(4, 172)
    assert torch.equal(src(x), dst(x))
    sym = QuantLinear.from_linear(nn.Linear(64, 8), group_size=32, sym=True)
    assert "zeros" not in sym.state_dict()


def test_load_state_dict_mismatch_is_an_error():
    src = QuantLinear.from_linear(nn.Linear(128, 16), group_size=64)
    with pytest.raises(RuntimeError, match="size mismatch"):
        QuantLinear(128, 16, group_size=32).load_state_dict(src.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        QuantLinear(128, 16, group_size=64, sym=True).load_state_dict(src.state_dict())


def test_extra_repr_and_bytes():
    q = QuantLinear.from_linear(nn.Linear(256, 64).half(), group_size=128)
    r = repr(q)
    for piece in ("in_features=256", "out_features=64", "bits=4", "group_size=128", "sym=False", "bytes="):
        assert piece in r
    # 256*64/2 code bytes + 2 groups * 64 * (2 scale bytes + 1 zero byte) + 64 * 2 bias bytes
    assert q.nbytes == 256 * 64 // 2 + 2 * 64 * 3 + 64 * 2


def test_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs
    nn.init.normal_(conv.weight)
    q = QuantLinear.from_linear(conv, group_size=32)
    x = torch.randn(3, 64)
    ref = x @ dequantize(q.weight_int4).t() + conv.bias
    assert q.out_features == 48 and torch.allclose(q(x), ref, atol=1e-4)
    assert ((q(x) - conv(x)).norm() / conv(x).norm()) < 0.2


def test_bad_construction():
    with pytest.raises(Int4FormatError, match="group_size"):
        QuantLinear(64, 8, group_size=7)
    with pytest.raises(Int4FormatError, match="group_size"):
        QuantLinear.from_linear(nn.Linear(64, 8), group_size=0)
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(64, 8, backend="gpu")
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv2d(3, 3, 3))
    q = QuantLinear.from_linear(nn.Linear(64, 8), group_size=32)
    with pytest.raises(ValueError, match="in_features=64"):
        q(torch.randn(2, 65))


def test_gradients_flow_to_activations_not_weights():
    torch.manual_seed(0)
    lin = nn.Linear(72, 24)
    q = QuantLinear.from_linear(lin, group_size=32)
    x = torch.randn(3, 72, requires_grad=True)
    q(x).square().sum().backward()
    dense = x.detach().clone().requires_grad_(True)
    (dense @ dequantize(q.weight_int4).t() + lin.bias).square().sum().backward()
    assert torch.allclose(x.grad, dense.grad, atol=1e-4)
    assert not any(b.requires_grad for b in q.buffers())


def test_loading_keeps_the_checkpoint_scale_dtype():
    src = QuantLinear.from_linear(nn.Linear(256, 16, bias=True).to(torch.bfloat16), group_size=128)
    src.scales[0, 0] = 1e5  # representable in bf16, inf in fp16
    dst = QuantLinear(256, 16, bias=True, group_size=128)  # fp16 shell
    dst.load_state_dict(src.state_dict())
    assert dst.scales.dtype == torch.bfloat16 and dst.bias.dtype == torch.bfloat16
    assert torch.equal(dst.scales, src.scales)
