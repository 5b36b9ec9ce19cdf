"""int4ops: group-wise INT4 weight-only quantization (W4A16) kernels for PyTorch.

    import int4ops
    summary = int4ops.replace_linear(model, group_size=128)   # nn.Linear -> QuantLinear, in place
    int4ops.save_quantized(model, "out/")                     # safetensors + configs
    model = int4ops.load_quantized("out/", device="cuda")     # no fp16 weights materialised
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers torch.ops.int4ops.*)
from .format import Int4FormatError, Int4Weight, pack_int4, unpack_int4  # noqa: E402
from .models import (  # noqa: E402
    CheckpointError,
    ReplaceSummary,
    load_quantized,
    replace_linear,
    save_quantized,
)
from .nn import QuantLinear  # noqa: E402
from .quantize import quantize_rtn  # noqa: E402
from .reference import dequantize, w4a16_matmul_reference  # noqa: E402

__all__ = [
    "CheckpointError",
    "Int4FormatError",
    "Int4Weight",
    "QuantLinear",
    "ReplaceSummary",
    "dequantize",
    "load_quantized",
    "pack_int4",
    "quantize_rtn",
    "replace_linear",
    "save_quantized",
    "unpack_int4",
    "w4a16_matmul_reference",
]
