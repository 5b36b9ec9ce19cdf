"""The packed format: bit layout, pack/unpack exactness, RTN quantizer, validation errors."""

import pytest
import torch

from int4ops.format import (
    Int4FormatError,
    Int4Weight,
    num_groups,
    pack_int4,
    padded_in_features,
    unpack_int4,
)
from int4ops.quantize import quantize_rtn
from int4ops.reference import dequantize

GROUP_SIZES = [32, 64, 128, 256, -1]


def test_word_layout_matches_docstring():
    # Code j of word i is bits 4j..4j+3: codes 1..8 along K make the word 0x87654321.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 0]])
    words = pack_int4(codes)
    assert words.shape == (1, 2) and words.dtype == torch.int32
    assert words[0, 0].item() & 0xFFFFFFFF == 0x87654321
    assert words[0, 1].item() == 15


@pytest.mark.parametrize("n", [1, 3, 33, 64])
@pytest.mark.parametrize("k_pad", [8, 24, 176, 256])
def test_pack_unpack_roundtrip_bit_exact(n, k_pad):
    codes = torch.randint(0, 16, (n, k_pad), dtype=torch.uint8)
    words = pack_int4(codes)
    assert words.shape == (k_pad // 8, n)
    assert torch.equal(unpack_int4(words), codes)
    assert torch.equal(pack_int4(unpack_int4(words)), words)


def test_pack_rejects_bad_codes():
    with pytest.raises(Int4FormatError, match="0..15"):
        pack_int4(torch.full((2, 8), 16))
    with pytest.raises(Int4FormatError, match="divisible by 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.uint8))
    with pytest.raises(Int4FormatError, match="integer"):
        pack_int4(torch.zeros(2, 8))
    with pytest.raises(Int4FormatError, match="2-D"):
        pack_int4(torch.zeros(8, dtype=torch.uint8))


@pytest.mark.parametrize("k,gs,expect", [(172, 128, (2, 256)), (172, 32, (6, 192)), (172, -1, (1, 176)), (4096, 128, (32, 4096))])
def test_group_and_padding_arithmetic(k, gs, expect):
    assert (num_groups(k, gs), padded_in_features(k, gs)) == expect


def naive_dequantize(w: Int4Weight) -> torch.Tensor:
    """Per element, straight from the docstring formula (slow, obviously right)."""
    gs = padded_in_features(w.in_features, -1) if w.group_size == -1 else w.group_size
    out = torch.empty(w.out_features, w.in_features, dtype=torch.float64)
    for n in range(w.out_features):
        for k in range(w.in_features):
            word = int(w.qweight[k // 8, n]) & 0xFFFFFFFF
            q = (word >> (4 * (k % 8))) & 0xF
            g = k // gs
            z = 8 if w.zeros is None else int(w.zeros[g, n])
            out[n, k] = (q - z) * float(w.scales[g, n])
    return out


@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("sym", [False, True])
def test_dequantize_matches_naive(gs, sym):
    w = quantize_rtn(torch.randn(5, 100), gs, sym)
    assert torch.allclose(dequantize(w, torch.float64), naive_dequantize(w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("shape", [(33, 172), (8, 64), (1, 300), (17, 8)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rtn_error_within_half_step(gs, sym, shape, scale_dtype):
    weight = torch.randn(shape)
    w = quantize_rtn(weight, gs, sym, scale_dtype)
    assert w.scales.dtype == scale_dtype and w.sym == sym
    n, k = shape
    g, k_pad = num_groups(k, gs), padded_in_features(k, gs)
    assert w.qweight.shape == (k_pad // 8, n) and w.scales.shape == (g, n)
    # Round-to-nearest: every weight is within half a step of its dequantized value, plus, at
    # the ends of an asymmetric range, 15 codes' worth of the scale's own rounding to its dtype.
    eff = k_pad if gs == -1 else gs
    step = w.scales.float().repeat_interleave(eff, 0)[:k].t()
    slack = {torch.float32: 1e-6, torch.float16: 15 * 2**-11, torch.bfloat16: 15 * 2**-8}[scale_dtype]
    err = (dequantize(w) - weight).abs()
    assert (err <= step * (0.5 + slack) + 1e-6).all()
    # Padding codes equal the zero point, so padded positions dequantize to exactly 0.
    codes = unpack_int4(w.qweight)[:, k:]
    zp = torch.full_like(codes, 8) if sym else w.zeros.t().repeat_interleave(eff, 1)[:, k:k_pad]
    assert torch.equal(codes, zp)


def test_rtn_is_exact_on_grid_values_and_zero_groups():
    # A group already on the 4-bit grid (0..15 times a power of two) is reproduced exactly.
    weight = (torch.randint(0, 16, (4, 64)).float() - 5) * 0.25
    weight[:, 0::32], weight[:, 1::32] = -1.25, 2.5  # each group spans codes 0..15
    weight[1] = 0.0  # an all-zero row must not divide by zero
    w = quantize_rtn(weight, 32, sym=False, scale_dtype=torch.float32)
    assert torch.equal(dequantize(w), weight)


def test_chunking_does_not_change_the_result():
    weight = torch.randn(70, 200)
    a, b = quantize_rtn(weight, 64), quantize_rtn(weight, 64, chunk_bytes=1)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("gs", [0, 7, 100, 512, -2, True, 128.0])
def test_bad_group_size_is_refused(gs):
    with pytest.raises(Int4FormatError, match="group_size"):
        quantize_rtn(torch.randn(4, 64), gs)


def test_bad_weights_are_refused():
    with pytest.raises(Int4FormatError, match="2-D"):
        quantize_rtn(torch.randn(64), 32)
    with pytest.raises(Int4FormatError, match="floating-point"):
        quantize_rtn(torch.ones(4, 64, dtype=torch.int32), 32)
    with pytest.raises(Int4FormatError, match="NaN"):
        quantize_rtn(torch.tensor([[float("nan")] * 32]), 32)
    with pytest.raises(Int4FormatError, match="meta"):
        quantize_rtn(torch.empty(4, 64, device="meta"), 32)
    with pytest.raises(Int4FormatError, match="scale_dtype"):
        quantize_rtn(torch.randn(4, 64), 32, scale_dtype=torch.int8)


def test_validation_names_the_problem():
    w = quantize_rtn(torch.randn(6, 100), 32)
    with pytest.raises(Int4FormatError, match="int32"):
        Int4Weight(w.qweight.to(torch.int64), w.scales, w.zeros, 100, 32)
    with pytest.raises(Int4FormatError, match="rows"):
        Int4Weight(w.qweight, w.scales, w.zeros, 300, 32)
    with pytest.raises(Int4FormatError, match="scales must have shape"):
        Int4Weight(w.qweight, w.scales[:2], w.zeros, 100, 32)
    with pytest.raises(Int4FormatError, match="zeros must be uint8"):
        Int4Weight(w.qweight, w.scales, w.zeros.to(torch.int32), 100, 32)
    with pytest.raises(Int4FormatError, match="scales must be fp16"):
        Int4Weight(w.qweight, w.scales.to(torch.float64), w.zeros, 100, 32)
    with pytest.raises(Int4FormatError, match="group_size"):
        Int4Weight(w.qweight, w.scales, w.zeros, 100, 48)
