// Dequantize the packed INT4 weight to a dense, transposed matrix out[K, N] = W^T.
//
// Why [K, N] and not [N, K]: qweight is [K_pad/8, N], contiguous along N. Writing W^T keeps
// both sides coalesced: a thread reads one 16-byte vector (4 columns x 8 k) and writes 8 rows
// of 4 adjacent columns, so a warp writes 32 x 8 = 256 contiguous bytes per output row. For
// the large-M path cuBLAS takes W^T as is (x @ W^T needs no copy), and W itself is its .t() view.
#include <stdio.h>

#include "common.cuh"

namespace int4ops {
namespace {

struct DequantArgs {
  const uint32_t* qweight;
  const void* scales;
  const uint8_t* zeros;
  void* out;
  int N, ld, K, K_rows, group_size, scale_dtype;
  bool w_vec;    // qweight rows 16-byte aligned: one vector load per thread
  bool out_vec;  // out rows aligned for a 4-element vector store
};

template <typename T> struct Vec4;  // 4 elements of T stored with one instruction
template <> struct Vec4<__half> { using type = uint2; };
template <> struct Vec4<__nv_bfloat16> { using type = uint2; };
template <> struct Vec4<float> { using type = float4; };

template <typename T>
__global__ void __launch_bounds__(256) dequantize_kernel(DequantArgs a) {
  const int n0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (n0 >= a.N) return;
  const bool full = a.w_vec && n0 + 3 < a.N;
  T* out = static_cast<T*>(a.out);
  // Rows in a grid-stride loop: gridDim.y is capped at 65535.
  for (int row = blockIdx.y; row < a.K_rows; row += gridDim.y) {
    const uint32_t* p = a.qweight + (size_t)row * a.ld + n0;
    uint32_t q[4];
    if (full) {
      uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      q[0] = v.x; q[1] = v.y; q[2] = v.z; q[3] = v.w;
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) q[c] = (n0 + c < a.N) ? __ldg(p + c) : 0u;
    }
    const int g = row * 8 / a.group_size;  // the 8 codes of a word share a group
    float s[4], w[4][8];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool in = n0 + c < a.N;
      const size_t gi = (size_t)g * a.ld + n0 + c;
      s[c] = in ? load_scale(a.scales, gi, a.scale_dtype) : 0.0f;
      // (q - 8) - (z - 8) = q - z, exact in fp32 (symmetric: z = 8).
      const float zm8 = (a.zeros != nullptr && in) ? (float)__ldg(a.zeros + gi) - 8.0f : 0.0f;
      codes_minus_8(q[c], w[c]);
#pragma unroll
      for (int j = 0; j < 8; ++j) w[c][j] -= zm8;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int k = row * 8 + j;
      if (k >= a.K) break;  // out has exactly K rows; the padding codes are not written
      union {  // 4 values packed for one store; the union keeps the vector's alignment
        T e[4];
        typename Vec4<T>::type vec;
      } v;
#pragma unroll
      for (int c = 0; c < 4; ++c) v.e[c] = from_float<T>(w[c][j] * s[c]);
      T* o = out + (size_t)k * a.N + n0;
      if (full && a.out_vec) {
        *reinterpret_cast<typename Vec4<T>::type*>(o) = v.vec;
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (n0 + c < a.N) o[c] = v.e[c];
      }
    }
  }
}

}  // namespace
}  // namespace int4ops

using namespace int4ops;

extern "C" int int4ops_dequantize(const void* qweight, const void* scales, const void* zeros, void* out, int N,
                                  int ld, int K, int K_rows, int group_size, int out_dtype, int scale_dtype,
                                  int device, void* stream) {
  char prefix[256];
  snprintf(prefix, sizeof prefix, "dequantize failed for N=%d, K=%d (group_size=%d, out %s, scales %s)", N, K,
           group_size, dtype_name(out_dtype), dtype_name(scale_dtype));
  if (N < 1 || K < 1 || ld < N || K_rows * 8 < K) return set_error(INT4OPS_ERR_ARGS, "%s: bad sizes (ld=%d, K_rows=%d)", prefix, ld, K_rows);
  if (group_size < 8 || group_size % 8 != 0) return set_error(INT4OPS_ERR_ARGS, "%s: group_size must be a multiple of 8", prefix);
  if (out_dtype < INT4OPS_F16 || out_dtype > INT4OPS_F32 || scale_dtype < INT4OPS_F16 || scale_dtype > INT4OPS_F32)
    return set_error(INT4OPS_ERR_ARGS, "%s: bad dtype code", prefix);
  if (!qweight || !scales || !out) return set_error(INT4OPS_ERR_ARGS, "%s: null pointer", prefix);

  DeviceGuard guard(device);
  if (guard.err != cudaSuccess)
    return set_error(guard.err, "%s: cudaSetDevice(%d): %s", prefix, device, cudaGetErrorString(guard.err));

  DequantArgs a;
  a.qweight = static_cast<const uint32_t*>(qweight);
  a.scales = scales;
  a.zeros = static_cast<const uint8_t*>(zeros);
  a.out = out;
  a.N = N;
  a.ld = ld;
  a.K = K;
  a.K_rows = K_rows;
  a.group_size = group_size;
  a.scale_dtype = scale_dtype;
  a.w_vec = (ld % 4 == 0) && aligned16(qweight);
  const size_t esize = dtype_bytes(out_dtype);
  a.out_vec = (N % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % (4 * esize) == 0);

  const int threads = 256;
  dim3 grid(((N + 3) / 4 + threads - 1) / threads, K_rows < 65535 ? K_rows : 65535);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case INT4OPS_F16: dequantize_kernel<__half><<<grid, threads, 0, s>>>(a); break;
    case INT4OPS_BF16: dequantize_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(a); break;
    default: dequantize_kernel<float><<<grid, threads, 0, s>>>(a); break;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return set_error(err, "%s: %s", prefix, cudaGetErrorString(err));
  return 0;
}
