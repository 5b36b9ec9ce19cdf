"""Compile int4ops' Gluon kernels for sm_90 without a GPU and print their SASS statistics as JSON.

    python tests/sm90_sass.py float16|bfloat16 GROUP_SIZE BM [SPLIT_K [SCALES_TMA]]   (gemm_sm90)
    python tests/sm90_sass.py gemv float16|bfloat16 HAS_ZEROS REP WK                  (gemv_mma)

Run by tests/test_triton_kernels.py in a child process: the Triton interpreter, which the CPU suite
runs in-process, patches the language and leaves Gluon's compiler unable to build layouts there.
Exit status 3 with a reason on stderr: this Triton cannot compile Gluon for sm_90 (old API, no ptxas).
"""
import json
import os
import subprocess
import sys
import tempfile

import torch


def compile_sm90(dtype: torch.dtype, group_size: int, bm: int, split_k: bool = False,
                 scales_tma: bool = True) -> tuple[str, int]:
    """(SASS, shared-memory bytes) of gemm_sm90's kernel compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from int4ops.kernels import gluon_sm90 as m

    gdt = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]
    x, qw = torch.empty(1024, 4096, dtype=dtype), torch.empty(512, 4096, dtype=torch.int32)
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, m.BK],
                              gl.NVMMASharedLayout.get_default_for([bm, m.BK], gdt))
    w_desc = TensorDescriptor(qw, list(qw.shape), list(qw.stride()), [m.BK // 8, m.BN], gl.NVMMASharedLayout(0, 32, 2))
    s_desc = z_desc = w_desc
    if scales_tma:  # the launcher's descriptors of the scale and zero-point rows
        s_desc = m._rows_desc(torch.empty(4096 // group_size, 4096, dtype=dtype), group_size)
        z_desc = m._rows_desc(torch.empty(4096 // group_size, 4096, dtype=torch.uint8), group_size)
    ptr = "*fp16" if dtype == torch.float16 else "*bf16"
    sig = {"x_desc": x_desc.__mangle__(), "w_desc": w_desc.__mangle__(), "s_desc": s_desc.__mangle__(),
           "z_desc": z_desc.__mangle__(), "s_ptr": ptr, "z_ptr": "*u8", "out_ptr": ptr,
           "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           **{a: "i32" for a in ("M", "N", "G", "stride_om", "num_tiles", "n_tile0", "num_k", "split", "k_per_split")}}
    consts = dict(GROUP=group_size, HAS_ZEROS=True, SCALES_TMA=scales_tma, BN=m.BN, BM=bm, BK=m.BK,
                  STAGES=m._stages(bm), TOKENS_FAST=True, SPLIT_K=split_k, PRODUCER_REGS=m.PRODUCER_REGS)
    sig.update({a: "constexpr" for a in consts})
    fn = m.w4a16_gemm_sm90_kernel
    src = GluonASTSource(fn, sig, {(fn.arg_names.index(a),): v for a, v in consts.items()}, {})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 8, "maxnreg": m.MAXNREG})
    return _sass(k.asm["cubin"]), k.metadata.shared


def compile_gemv(dtype: torch.dtype, has_zeros: bool, rep: int, wk: int) -> str:
    """SASS of gemv_mma's kernel compiled for sm_90 (EVEN_N / EVEN_K, PDL on: the real layers' variant)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from int4ops.kernels import gluon_gemv as m

    ptr = "*fp16" if dtype == torch.float16 else "*bf16"
    sig = {"x_ptr": "*i32", "qweight_ptr": "*i32", "scales_ptr": ptr, "zeros_ptr": "*u8", "out_ptr": "*fp32",
           **{a: "i32" for a in ("M", "N", "K_ROWS", "stride_x", "stride_split", "rows_per_split", "group_shift")}}
    consts = dict(HAS_ZEROS=has_zeros, IS_F16=dtype == torch.float16, REP=rep, WK=wk, EVEN_N=True, EVEN_K=True,
                  PDL_WAIT=True, PDL_TRIGGER=True)
    sig.update({a: "constexpr" for a in consts})
    fn = m.w4a16_gemv_mma_kernel
    # the arguments Triton specialises as 16-divisible on the real layers
    aligned = ("x_ptr", "qweight_ptr", "scales_ptr", "zeros_ptr", "out_ptr", "N", "stride_x")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(fn, sig, {(fn.arg_names.index(a),): v for a, v in consts.items()}, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": wk})
    return _sass(k.asm["cubin"])


def _sass(cubin: bytes) -> str:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


if __name__ == "__main__":
    if sys.argv[1] == "gemv":
        try:
            sass = compile_gemv(getattr(torch, sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5]))
        except (ImportError, AttributeError, FileNotFoundError) as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(3)
        ops = ("HMMA.16816.F32", "LDG.E.128", "STL", "LDL", "PRMT", "LOP3.LUT")
        print(json.dumps({op: sass.count(op) for op in ops}))
        sys.exit(0)
    try:
        sass, shared = compile_sm90(getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                   len(sys.argv) > 4 and sys.argv[4] == "1", len(sys.argv) <= 5 or sys.argv[5] == "1")
    except (ImportError, AttributeError, FileNotFoundError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    ops = ("HGMMA.", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "STL", "HFMA2", "HMUL2")
    print(json.dumps({"shared": shared, **{op: sass.count(op) for op in ops}}))
