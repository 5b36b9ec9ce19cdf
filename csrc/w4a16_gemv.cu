// Decode (small-M) W4A16 matmul: out[M, N] = x[M, K] @ W^T, W in the packed INT4 format.
//
// At M <= 8 the op is a stream over the packed weight (N*K/2 bytes), so the kernel is built
// to keep HBM busy:
//   * Each thread owns 4 adjacent output columns and reads one 16-byte vector of qweight per
//     packed row (4 words = 4 columns x 8 k). 16 threads cover 64 columns, so a half-warp
//     reads 256 contiguous bytes of a row: fully coalesced.
//   * K is cut into "units" of 4 packed rows (32 k). 32 divides every group size, so a unit
//     lies in one group and needs one scale/zero load per column. A thread issues the 4 row
//     loads of a unit before using any of them (4 x 16 B in flight per thread).
//   * A block is 16 (columns) x 16 (K slices) threads; the 16 slices of a block take
//     interleaved units of the block's K range and are summed through shared memory.
//   * Split-K over blocks (gridDim.y) gives enough blocks to fill every SM even when N is
//     small (N = 4096 has only 64 column tiles). Splits write fp32 partials to a workspace
//     that a second tiny kernel sums and converts; with one split the kernel writes `out`.
// Math: fp32 throughout (dequantized codes are exact, products and sums fp32). Per unit a
// thread accumulates sum_k x * (q - 8) and applies the group's zero point and scale once.
#include "common.cuh"

namespace int4ops {
namespace {

constexpr int kTX = 16;               // threads along N (4 columns each)
constexpr int kTY = 16;               // K slices per block
constexpr int kThreads = kTX * kTY;   // 256
constexpr int kBN = 4 * kTX;          // 64 output columns per block
constexpr int kUnitRows = 4;          // packed rows per unit (= 32 k)

struct GemvArgs : DecodeArgs {
  int units_per_split;
};

// 8 activations x[m, k0 .. k0+7] as float; positions >= K read as 0 (x has only K columns).
template <typename T>
__device__ __forceinline__ void load_x8(const T* row, int k0, int K, bool vec, float (&v)[8]) {
  if (vec) {  // K % 8 == 0 and k0 < K, so all 8 are in range
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + k0));
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_float(h[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (k0 + j < K) ? to_float(row[k0 + j]) : 0.0f;
  }
}

// Blocks per SM to ask ptxas for (it caps registers at 65536 / (256 * blocks)); checked with
// -Xptxas -v on sm_90: M = 1 fits 64 registers (4 blocks), M = 2..4 fit 128 (2 blocks)
// without spilling. M >= 5 needs ~170-210 and spills under a 128 cap, so it runs 1 block
// (8 warps) per SM; at M >= 5 the kernel is bound by FMA issue more than by memory anyway.
template <int M> constexpr int min_blocks() { return M == 1 ? 4 : (M <= 4 ? 2 : 1); }

template <typename T, int M>
__global__ void __launch_bounds__(kThreads, min_blocks<M>()) w4a16_gemv_kernel(GemvArgs a) {
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int n0 = blockIdx.x * kBN + 4 * tx;  // first of this thread's 4 columns
  const int N = a.N, K = a.K;
  const int units = (a.K_rows + kUnitRows - 1) / kUnitRows;
  const int u_begin = blockIdx.y * a.units_per_split;
  const int u_end = min(u_begin + a.units_per_split, units);
  const T* x = static_cast<const T*>(a.x);
  // With N % 4 == 0 a thread's 4 columns are all in range or all out; otherwise mask each.
  const bool cols_full = a.w_vec && n0 < N;
  const bool asym = a.zeros != nullptr;

  float acc[M][4];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.0f;

  if (n0 < N) {
    for (int u = u_begin + ty; u < u_end; u += kTY) {
      const int row0 = u * kUnitRows;
      // Issue all 4 row loads first so they are in flight together.
      uint32_t q[kUnitRows][4];
#pragma unroll
      for (int r = 0; r < kUnitRows; ++r) {
        const int row = row0 + r;
        const uint32_t* p = a.qweight + (size_t)row * N + n0;
        if (row >= a.K_rows) {
          q[r][0] = q[r][1] = q[r][2] = q[r][3] = 0;  // past K_pad (per-channel tail): unused
        } else if (cols_full) {
          uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
          q[r][0] = v.x; q[r][1] = v.y; q[r][2] = v.z; q[r][3] = v.w;
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c) q[r][c] = (n0 + c < N) ? __ldg(p + c) : 0u;
        }
      }
      // One group per unit: its scales and zero points for the 4 columns.
      const int g = row0 * 8 / a.group_size;
      float s[4], zm8[4];  // scale, zero point - 8
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool in = n0 + c < N;
        const size_t gi = (size_t)g * N + n0 + c;
        s[c] = in ? load_scale(a.scales, gi, a.scale_dtype) : 0.0f;
        zm8[c] = (asym && in) ? (float)__ldg(a.zeros + gi) - 8.0f : 0.0f;
      }

      // part = sum over the unit of x * (q - 8); xsum = sum of x (asymmetric only). Then
      // sum x * (q - z) * s = s * (part - (z - 8) * xsum): one scale multiply per unit, and
      // the zero point costs one add per activation instead of one per weight.
      float part[M][4], xsum[M];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        xsum[m] = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) part[m][c] = 0.0f;
      }

#pragma unroll
      for (int r = 0; r < kUnitRows; ++r) {
        const int k0 = (row0 + r) * 8;
        if (k0 >= K) break;  // padding rows: codes are the zero point and x is absent
        float w[4][8];
#pragma unroll
        for (int c = 0; c < 4; ++c) codes_minus_8(q[r][c], w[c]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xv[8];
          load_x8(x + (size_t)m * K, k0, K, a.x_vec, xv);
          if (asym) {
#pragma unroll
            for (int j = 0; j < 8; ++j) xsum[m] += xv[j];
          }
#pragma unroll
          for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int j = 0; j < 8; ++j) part[m][c] = fmaf(xv[j], w[c][j], part[m][c]);
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][c] = fmaf(fmaf(-zm8[c], xsum[m], part[m][c]), s[c], acc[m][c]);
    }
  }

  // Sum the kTY K slices of the block. Every thread reaches the barrier (no early return).
  __shared__ float4 red[kTY][M][kTX];
#pragma unroll
  for (int m = 0; m < M; ++m) red[ty][m][tx] = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
  __syncthreads();
  const float* redf = reinterpret_cast<const float*>(red);
  for (int i = threadIdx.x; i < M * kBN; i += kThreads) {
    const int m = i / kBN, col = i % kBN;
    const int n = blockIdx.x * kBN + col;
    float sum = 0.0f;
#pragma unroll
    for (int y = 0; y < kTY; ++y) sum += redf[(y * M + m) * kBN + col];
    if (n < N) {
      if (gridDim.y == 1)
        static_cast<T*>(a.out)[(size_t)m * N + n] = from_float<T>(sum);
      else
        a.workspace[((size_t)blockIdx.y * M + m) * N + n] = sum;
    }
  }
}

template <typename T, int M>
cudaError_t launch_m(const GemvArgs& a, int splits, cudaStream_t stream) {
  dim3 grid((a.N + kBN - 1) / kBN, splits);
  w4a16_gemv_kernel<T, M><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  return launch_splitk_reduce<T>(a.workspace, static_cast<T*>(a.out), M * a.N, splits, false, stream);
}

template <typename T>
cudaError_t launch(const GemvArgs& a, int M, int splits, cudaStream_t stream) {
  switch (M) {  // M is a template parameter so accumulators stay in registers
    case 1: return launch_m<T, 1>(a, splits, stream);
    case 2: return launch_m<T, 2>(a, splits, stream);
    case 3: return launch_m<T, 3>(a, splits, stream);
    case 4: return launch_m<T, 4>(a, splits, stream);
    case 5: return launch_m<T, 5>(a, splits, stream);
    case 6: return launch_m<T, 6>(a, splits, stream);
    case 7: return launch_m<T, 7>(a, splits, stream);
    case 8: return launch_m<T, 8>(a, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// Used by int4ops_cuda_probe: any kernel of the library tells whether its image fits the GPU.
const void* gemv_probe_kernel() { return reinterpret_cast<const void*>(&w4a16_gemv_kernel<__half, 1>); }

}  // namespace int4ops

using namespace int4ops;

extern "C" int int4ops_w4a16_gemv_plan(int M, int N, int K_rows, int sm_count, size_t* workspace_bytes) {
  if (workspace_bytes) *workspace_bytes = 0;
  if (M < 1 || N < 1 || K_rows < 1) return 1;
  const int col_tiles = (N + kBN - 1) / kBN;
  const int units = (K_rows + kUnitRows - 1) / kUnitRows;
  // Aim for ~4 blocks per SM (256 threads each) so every SM has loads in flight, but give each
  // K slice of a block at least one unit: more splits would only add partials to reduce.
  const int target_blocks = 4 * (sm_count > 0 ? sm_count : 132);
  int splits = (target_blocks + col_tiles - 1) / col_tiles;
  const int max_splits = (units + kTY - 1) / kTY;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  // Even out the ranges, then drop splits that would get no unit.
  const int per = (units + splits - 1) / splits;
  splits = (units + per - 1) / per;
  if (workspace_bytes && splits > 1) *workspace_bytes = (size_t)splits * M * N * sizeof(float);
  return splits;
}

extern "C" int int4ops_w4a16_gemv(const void* x, const void* qweight, const void* scales, const void* zeros,
                                  void* out, void* workspace, int M, int N, int K, int K_rows, int group_size,
                                  int act_dtype, int scale_dtype, int splits, int device, void* stream) {
  char prefix[256];
  // Per channel the group is K_pad (any multiple of 8, e.g. 8 for K <= 8): one unit's group.
  if (int rc = check_decode_args(prefix, "w4a16_gemv", INT4OPS_GEMV_MAX_M, x, qweight, scales, out, workspace, M, N, K,
                                 K_rows, group_size, act_dtype, scale_dtype, splits))
    return rc;

  DeviceGuard guard(device);
  if (guard.err != cudaSuccess)
    return set_error(guard.err, "%s: cudaSetDevice(%d): %s", prefix, device, cudaGetErrorString(guard.err));

  GemvArgs a{decode_args(x, qweight, scales, zeros, out, workspace, M, N, K, K_rows, group_size, scale_dtype)};
  const int units = (K_rows + kUnitRows - 1) / kUnitRows;
  a.units_per_split = (units + splits - 1) / splits;
  splits = (units + a.units_per_split - 1) / a.units_per_split;  // no empty split

  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = act_dtype == INT4OPS_F16 ? launch<__half>(a, M, splits, s) : launch<__nv_bfloat16>(a, M, splits, s);
  if (err != cudaSuccess) return set_error(err, "%s: %s", prefix, cudaGetErrorString(err));
  return 0;
}
