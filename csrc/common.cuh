// Shared helpers of the int4ops CUDA kernels: dtype conversion, error reporting.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "int4ops_cuda.h"

namespace int4ops {

// Record a failure message for this thread (printf-style) and return `code`.
int set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// The argument checks both decode entry points share (api.cu). Writes the message prefix
// "<kernel> failed for M=.., N=.., K=.. (...)" into `prefix` for the caller's later errors and
// returns 0, or records the first problem and returns INT4OPS_ERR_ARGS. Group sizes must be a
// multiple of 32 (a kernel step of 32 k never straddles a group) or K_pad (one per channel).
int check_decode_args(char (&prefix)[256], const char* kernel, int max_m, const void* x, const void* qweight,
                      const void* scales, const void* out, const void* workspace, int M, int N, int K, int K_rows,
                      int group_size, int act_dtype, int scale_dtype, int splits);

inline const char* dtype_name(int code) {
  switch (code) {
    case INT4OPS_F16: return "fp16";
    case INT4OPS_BF16: return "bf16";
    case INT4OPS_F32: return "fp32";
    default: return "?";
  }
}

// Bytes per element of a dtype code.
inline int dtype_bytes(int code) { return code == INT4OPS_F32 ? 4 : 2; }

// Programmatic dependent launch unless INT4OPS_PDL=0 (the switch the Triton path reads too).
inline bool pdl_env_allows() {
  const char* env = getenv("INT4OPS_PDL");
  return !(env && strcmp(env, "0") == 0);
}

// How the sm_90 GEMM (w4a16_gemm_sm90.cu) runs one call: gemm_sm90_plan chooses it from the
// shape, api.cu sizes the workspace with it and gemm_sm90_launch follows it.
struct GemmPlan {
  int tile_tokens = 256;       // 128 or 256
  int ch_tiles1 = 0;           // > 0: channel tiles [0, ch_tiles1) in one launch, the rest in a second of 128-token tiles
  bool tail_pairs = false;     // ch_tiles1: the second launch's tiles are 256 tokens, K in 2 parts of split_stages per cluster of 2 blocks
  int splits = 1;              // K parts per tile (1: no split, no workspace)
  int split_stages = 1 << 30;  // 64-k stages per part
  int sk_blocks = 0;           // > 0: stream-K, one launch of this many blocks (splits = 2: a tile has at most 2 parts)
  int sk_tile0 = -1;           // stream-K: tiles below this one run first, whole, one per block, in a launch of their own
  bool pdl = true;             // a second launch (ch_tiles1, sk_tile0) starts as the first one's blocks leave (INT4OPS_PDL=0: after it)
  int persistent_blocks = 0;   // > 0: a launch of more whole tiles than this runs a persistent grid of this many blocks
  size_t partials_bytes = 0, workspace_bytes = 0;
};

// Make `device` current for this call and put the previous device back afterwards. The library
// has its own (static) CUDA runtime; the device and stream handles it gets from torch name the
// same driver objects, so this only matters when the caller's thread sits on another device.
struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

// Scalar <-> float for the three storage dtypes.
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

// Load scale s[g, n] stored as `scale_dtype` (a runtime code: the branch is uniform across the
// grid, so it costs a predicate, and it saves compiling every kernel three times).
__device__ __forceinline__ float load_scale(const void* scales, size_t idx, int scale_dtype) {
  if (scale_dtype == INT4OPS_F16) return __half2float(__ldg(static_cast<const __half*>(scales) + idx));
  if (scale_dtype == INT4OPS_BF16) return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(scales) + idx));
  return __ldg(static_cast<const float*>(scales) + idx);
}

// The 8 codes of a packed word minus 8, as exact floats, in 2 ops per code (a LOP3 and an
// FFMA) instead of shift + mask + slow int->float conversion + subtract:
//   * OR-ing the nibble, left where it sits at bits 4j..4j+3 (j <= 3), into the mantissa of
//     the float 2^23 (bits 0x4B000000) gives exactly v = 2^23 + q * 16^j.
//   * fma(v, 16^-j, -(2^23 * 16^-j + 8)) = q - 8 exactly: v * 16^-j is exact (a power of
//     two), and the FMA rounds once a result that is a small integer. Both constants are
//     compile-time immediates after unrolling.
// Codes 4..7 take the same path on word >> 16 (one shift shared by the four of them).
// Why q - 8: that is the symmetric zero point, so symmetric weights need nothing more; an
// asymmetric zero point z is applied per group as -(z - 8) * sum(x) (see the kernels).
__device__ __forceinline__ void codes_minus_8(uint32_t word, float (&w)[8]) {
  const uint32_t hi = word >> 16;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float inv = 1.0f / (float)(1 << (4 * j));
    const float bias = 8388608.0f * inv + 8.0f;
    w[j] = fmaf(__uint_as_float((word & (0xFu << (4 * j))) | 0x4B000000u), inv, -bias);
    w[j + 4] = fmaf(__uint_as_float((hi & (0xFu << (4 * j))) | 0x4B000000u), inv, -bias);
  }
}

// Split-K epilogue shared by the decode kernels: out[i] = sum over splits s of ws[s, i] (fp32
// partials, [splits, M*N]), added in split order so results are deterministic, then converted.
// Internal linkage: each .cu file gets its own copy instead of sharing one across modules.
namespace {
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ ws, T* __restrict__ out, int MN, int splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched early with programmatic dependent launch (w4a16_mma_stream.cu), this waits for the
  // kernel that writes the partials to finish; launched normally, it returns at once.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < MN; i += gridDim.x * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += ws[(size_t)s * MN + i];
    out[i] = from_float<T>(sum);
  }
}

// A cudaLaunchKernelEx configuration: `pdl` with programmatic dependent launch (sm_90+: the
// kernel may start before the one before it ends, and must griddepcontrol.wait for what it
// reads of it), `cluster_z` > 1 in thread-block clusters of that many blocks along z.
struct LaunchConfig {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  LaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl, int cluster_z = 1) {
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    if (pdl) {
      attr[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[cfg.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster_z > 1) {
      attr[cfg.numAttrs].id = cudaLaunchAttributeClusterDimension;
      attr[cfg.numAttrs].val.clusterDim.x = 1;
      attr[cfg.numAttrs].val.clusterDim.y = 1;
      attr[cfg.numAttrs++].val.clusterDim.z = cluster_z;
    }
  }
};

// Launch splitk_reduce_kernel over the [splits, MN] partials of `ws` into `out`. `pdl`: launch it
// early with programmatic dependent launch (sm_90+ only; the kernel before it must have called
// griddepcontrol.launch_dependents), else a plain launch.
template <typename T>
cudaError_t launch_splitk_reduce(const float* ws, T* out, int MN, int splits, bool pdl, cudaStream_t stream) {
  const int blocks = (MN + 255) / 256;
  LaunchConfig lc(dim3(blocks < 4096 ? blocks : 4096), dim3(256), 0, stream, pdl);
  return cudaLaunchKernelEx(&lc.cfg, splitk_reduce_kernel<T>, ws, out, MN, splits);
}
}  // namespace

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// What both decode kernels (w4a16_gemv.cu, w4a16_mma.cu) take; each extends it with its split plan.
struct DecodeArgs {
  const void* x;
  const uint32_t* qweight;
  const void* scales;
  const uint8_t* zeros;  // nullptr: symmetric (zero point 8)
  void* out;             // [M, N] act dtype (splits == 1)
  float* workspace;      // [splits, M, N] fp32 (splits > 1)
  int M, N, K, K_rows, group_size, scale_dtype;
  bool w_vec;  // N % 4 == 0 and qweight 16-byte aligned: vector loads of 4 words
  bool x_vec;  // K % 8 == 0 and x 16-byte aligned: vector loads of 8 activations
};

inline DecodeArgs decode_args(const void* x, const void* qweight, const void* scales, const void* zeros, void* out,
                              void* workspace, int M, int N, int K, int K_rows, int group_size, int scale_dtype) {
  DecodeArgs a;
  a.x = x;
  a.qweight = static_cast<const uint32_t*>(qweight);
  a.scales = scales;
  a.zeros = static_cast<const uint8_t*>(zeros);
  a.out = out;
  a.workspace = static_cast<float*>(workspace);
  a.M = M;
  a.N = N;
  a.K = K;
  a.K_rows = K_rows;
  a.group_size = group_size;
  a.scale_dtype = scale_dtype;
  a.w_vec = (N % 4 == 0) && aligned16(qweight);
  a.x_vec = (K % 8 == 0) && aligned16(x);
  return a;
}

// The streaming fast path of int4ops_w4a16_mma (w4a16_mma_stream.cu): M <= 8 on aligned inputs.
// The launch takes the caller's split plan: steps (32 k) per split and per group, and `splits`
// already trimmed so that no split is empty.
bool mma_stream_fits(const DecodeArgs& a, int scale_dtype);
int mma_stream_plan(int N, int K_rows, int sm_count);
cudaError_t mma_stream_launch(const DecodeArgs& a, int act_dtype, int steps_per_split, int steps_per_group, int splits,
                              int device, cudaStream_t stream);

}  // namespace int4ops
