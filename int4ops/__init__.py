"""int4ops: group-wise INT4 weight-only quantization (W4A16) kernels for PyTorch."""

from .format import Int4FormatError, Int4Weight, pack_int4, unpack_int4
from .quantize import quantize_rtn
from .reference import dequantize, w4a16_matmul_reference
from . import ops  # registers torch.ops.int4ops.*

__version__ = "0.1.0"
