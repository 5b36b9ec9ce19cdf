"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight is stored in the packed INT4 format."""

from __future__ import annotations

import torch
from torch import nn

from .format import Int4Weight, check_group_size, num_groups, padded_in_features, validate
from .ops import check_backend, w4a16_linear
from .quantize import quantize_rtn


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` group-wise INT4 (see ``int4ops.format``).

    Buffers (all in the state dict, so ``state_dict``/``load_state_dict`` round-trip):
    ``qweight`` int32 [K_pad/8, N], ``scales`` [G, N], ``zeros`` uint8 [G, N] (asymmetric
    only), ``bias`` [N] (optional, kept in the original linear's dtype).
    Activations may be fp16, bf16 or fp32 and of any leading shape; the output has the
    activation's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        sym: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype | None = None,
        backend: str = "auto",
        device=None,
    ):
        """An empty (zero-filled) layer of the right shapes, to be filled by ``load_state_dict``."""
        super().__init__()
        check_group_size(group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.sym = group_size, sym
        self.backend = check_backend(backend)
        g = num_groups(in_features, group_size)
        k_pad = padded_in_features(in_features, group_size)
        self.register_buffer("qweight", torch.zeros((k_pad // 8, out_features), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros((g, out_features), dtype=scale_dtype, device=device))
        zeros = None if sym else torch.zeros((g, out_features), dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        b = torch.zeros(out_features, dtype=bias_dtype or scale_dtype, device=device) if bias else None
        self.register_buffer("bias", b)

    @classmethod
    def from_weight(cls, w: Int4Weight, bias: torch.Tensor | None = None, backend: str = "auto") -> "QuantLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = w.in_features, w.out_features
        layer.group_size, layer.sym = w.group_size, w.sym
        layer.backend = check_backend(backend)
        layer.register_buffer("qweight", w.qweight)
        layer.register_buffer("scales", w.scales)
        layer.register_buffer("zeros", w.zeros)
        layer.register_buffer("bias", None if bias is None else bias.detach().clone())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        group_size: int = 128,
        sym: bool = False,
        scale_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (or a Hugging Face GPT-2 ``Conv1D``) with RTN, on its device."""
        weight = linear_weight(linear)
        return cls.from_weight(quantize_rtn(weight, group_size, sym, scale_dtype), linear.bias, backend)

    @property
    def weight_int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_linear(
            x, self.qweight, self.scales, self.zeros, self.in_features, self.group_size, self.bias, self.backend
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Take the checkpoint's scale/bias dtype rather than casting into ours: an fp16 shell
        # must not round bf16 or fp32 scales (a bf16 scale of 1e5 would become inf). Only for
        # tensors of the right shape: a mismatched load must fail with this layer unchanged.
        for name in ("scales", "bias"):
            mine, theirs = getattr(self, name), state_dict.get(prefix + name)
            if (mine is not None and isinstance(theirs, torch.Tensor) and theirs.dtype != mine.dtype
                    and theirs.shape == mine.shape):
                setattr(self, name, torch.empty_like(mine, dtype=theirs.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A sharded checkpoint fills the buffers over several calls: check once all are real.
        if all(b.device.type != "meta" for b in self.buffers()):
            validate(self.qweight, self.scales, self.zeros, self.in_features, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits=4, group_size={self.group_size}, sym={self.sym}, scales={str(self.scales.dtype)[6:]}, "
            f"bytes={self.nbytes}, backend={self.backend}"
        )


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or Hugging Face's GPT-2 ``Conv1D`` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out_features, in_features] weight of an nn.Linear or a GPT-2 style Conv1D."""
    if not is_linear_like(module):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()  # Conv1D: [in, out]
