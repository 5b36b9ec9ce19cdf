// Tensor-core decode W4A16 matmul for small M (1..16): out[M, N] = x[M, K] @ W^T.
//
// Why tensor cores at M = 1: the scalar decode kernel (w4a16_gemv.cu) spends ~3 instructions
// per 4-bit code on fp32 math (unpack, convert, FMA per row of x), and an H100/H200 can only
// issue ~3-4 instructions per code at full HBM speed. Here the codes are unpacked two at a time
// into fp16x2/bf16x2 registers (~1.1 instructions per code) and the multiply-add runs on the
// tensor cores (one mma.sync per 256 codes of a warp), so the kernel stays memory-bound even
// though at M = 1 seven eighths of every MMA multiply zeros. fp32 accumulation, and q - z stays
// exact in 16 bits, so the only rounding is the MMA's fp32 sum (like the reference).
//
// The stored format is read as is (int4ops/format.py: qweight int32 [K_pad/8, N], 8 k per word).
// The trick that avoids any repacking: an MMA sums over k, so the k order inside one MMA is
// free as long as A (weights) and B (activations) use the same one. Per warp and k32 step:
//
//   lane t = 4g + q (g = 0..7, q = 0..3) loads packed row kw = k0/8 + q (k0+8q .. k0+8q+7) for
//   channels n0 + 8g .. n0 + 8g + 7: two 16-byte loads; the 4 q-lanes read 4 rows, so a warp
//   reads 4 x 256 contiguous bytes. Word c (channel n0+8g+c) becomes row g (c even) or g+8 (c odd)
//   of m16 tile c/2: 4 tiles of 16 channels = the warp's 64 channels.
//
//   A word w = codes c0..c7 (4 bits each, c0 lowest) unpacks with one LOP3 per pair into
//     P0 = {c0, c4}, P1 = {c1, c5}, P2 = {c2, c6}, P3 = {c3, c7}    (16-bit halves, minus z)
//   m16n8k16 A fragment of lane (g, q): regs {row g, k 2q..2q+1}, {row g+8, same k},
//   {row g, k 2q+8..2q+9}, {row g+8, same}. MMA 0 of the step takes {P0, P1} of the row-g and
//   row-(g+8) words, MMA 1 takes {P2, P3}. So MMA-k 2q, 2q+1, 2q+8, 2q+9 mean real k
//   k0+8q + {0, 4, 1, 5} in MMA 0 and {2, 6, 3, 7} in MMA 1, and the B fragment (lane holds
//   k 2q..2q+1 and 2q+8..2q+9 of column g = row m of x) is x[m, k0+8q .. +7] permuted the same
//   way: one 16-byte load and 4 byte-permutes (PRMT) per step and M-tile.
//
// Unpacking exactly: OR a nibble into the low mantissa of 1024.0 (fp16, ulp 1 in [1024, 2048))
// or 128.0 (bf16, ulp 1 in [128, 256)) and subtract (1024 + z) / (128 + z): the result q - z is
// a small integer, exact in either type. fp16 gets codes c1/c5 without a shift by reading them
// at 16x (1024 + 16q is still exact) and scaling by 1/16 in the same HFMA2.
//
// Scales: a k32 step never straddles a group (group sizes are multiples of 32, or one group per
// channel), so each group is accumulated on its own (fp32 MMA accumulators) and folded into the
// running sum with one FMA per accumulator by the fp32 scale of its row.
//
// Work split: a block is 4 warps on the same 64 channels, each taking a contiguous quarter of
// the block's K range (summed through shared memory at the end); blocks split K further
// (gridDim.y) when the channel tiles alone cannot fill the GPU, writing fp32 partials that
// splitk_reduce_kernel sums in split order (deterministic, no atomics).
//
// This is the general kernel (any alignment, fp32 scales, M up to 16). int4ops_w4a16_mma runs
// the streaming kernel of w4a16_mma_stream.cu instead for M <= 8 on aligned inputs (every model
// layer): same mapping, about twice as fast on the H100 (its header says why).
#include <algorithm>

#include "mma_fragments.cuh"

namespace int4ops {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBN = 64;           // channels per block (= per warp)
constexpr int kTiles = kBN / 16;  // m16 tiles per warp
constexpr int kStepRows = 4;      // packed rows per step (32 k)
constexpr int kStages = 3;        // steps in flight per warp (cp.async ring in shared memory)

struct MmaArgs : DecodeArgs {
  int steps_per_split;
  int steps_per_group;  // group_size / 32, or every step for one group per channel
  bool g_vec;  // N % 8 == 0 and scales/zeros aligned: vector loads of a lane's 8 scales/zeros
};

// Per-channel constants of the unpacking for zero point z (see the header comment).
template <typename T> struct Bias {
  uint32_t lo;  // pair of (magic + z)
  uint32_t hi;  // fp16: pair of -(magic/16 + z) for the 16x-read codes; bf16: unused
};
template <typename T> __device__ __forceinline__ Bias<T> make_bias(float z);
template <> __device__ __forceinline__ Bias<__half> make_bias<__half>(float z) {
  return {as_u32(__half2half2(__float2half_rn(1024.0f + z))), as_u32(__half2half2(__float2half_rn(-64.0f - z)))};
}
template <> __device__ __forceinline__ Bias<__nv_bfloat16> make_bias<__nv_bfloat16>(float z) {
  return {as_u32(__bfloat162bfloat162(__float2bfloat16_rn(128.0f + z))), 0u};
}

// The 8 codes of word w minus z as 4 pairs {c0,c4}, {c1,c5}, {c2,c6}, {c3,c7}.
template <typename T> __device__ __forceinline__ void unpack8(uint32_t w, Bias<T> b, uint32_t (&p)[4]);
template <> __device__ __forceinline__ void unpack8<__half>(uint32_t w, Bias<__half> b, uint32_t (&p)[4]) {
  const uint32_t w8 = w >> 8;
  const __half2 bias = as_pair<__half2>(b.lo), bias16 = as_pair<__half2>(b.hi);
  const __half2 sixteenth = __half2half2(__float2half_rn(0.0625f));
  p[0] = as_u32(__hsub2(as_pair<__half2>((w & 0x000F000Fu) | 0x64006400u), bias));
  p[1] = as_u32(__hfma2(as_pair<__half2>((w & 0x00F000F0u) | 0x64006400u), sixteenth, bias16));
  p[2] = as_u32(__hsub2(as_pair<__half2>((w8 & 0x000F000Fu) | 0x64006400u), bias));
  p[3] = as_u32(__hfma2(as_pair<__half2>((w8 & 0x00F000F0u) | 0x64006400u), sixteenth, bias16));
}
template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(uint32_t w, Bias<__nv_bfloat16> b, uint32_t (&p)[4]) {
  // bf16 has 7 mantissa bits: a nibble at bits 4..7 would reach the exponent, so shift instead.
  const __nv_bfloat162 bias = as_pair<__nv_bfloat162>(b.lo);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    p[j] = as_u32(__hsub2(as_pair<__nv_bfloat162>(((w >> (4 * j)) & 0x000F000Fu) | 0x43004300u), bias));
}

// cp.async: 16 bytes global -> shared without passing through registers, so a warp can keep
// several steps of loads in flight while it does the math of the current one. src-size 0
// zero-fills (rows past K_pad, rows of x past M) without touching memory.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The 8 words of this lane's channels n .. n+7 in packed row `row` (0 past K_pad or N).
__device__ __forceinline__ void load_words(const MmaArgs& a, int row, int n, uint32_t (&w)[8]) {
  if (row < a.K_rows && a.w_vec && n + 7 < a.N) {
    const uint4* p = reinterpret_cast<const uint4*>(a.qweight + (size_t)row * a.N + n);
    const uint4 v0 = __ldg(p), v1 = __ldg(p + 1);
    w[0] = v0.x; w[1] = v0.y; w[2] = v0.z; w[3] = v0.w;
    w[4] = v1.x; w[5] = v1.y; w[6] = v1.z; w[7] = v1.w;
  } else {
#pragma unroll
    for (int c = 0; c < 8; ++c) w[c] = (row < a.K_rows && n + c < a.N) ? __ldg(a.qweight + (size_t)row * a.N + n + c) : 0u;
  }
}

// Scales and zero points of one group for a lane's 8 channels, as loaded (not yet decoded), so
// the next group's can be in flight while the current group's math runs. sraw holds 8 fp16/bf16
// (first 4 words) or 8 fp32; zraw holds 8 uint8 zero points.
struct GroupRaw {
  uint32_t sraw[8];
  uint32_t zraw[2];
};

__device__ __forceinline__ void load_group(const MmaArgs& a, int group, int n, GroupRaw& r) {
  const size_t gi = (size_t)group * a.N + n;
  const bool fp32 = a.scale_dtype == INT4OPS_F32;
  if (a.g_vec && n + 7 < a.N) {  // N % 8 == 0: 16/32-byte scale and 8-byte zero loads
    const uint4* sp = reinterpret_cast<const uint4*>(static_cast<const char*>(a.scales) + gi * (fp32 ? 4 : 2));
    const uint4 v0 = __ldg(sp);
    r.sraw[0] = v0.x; r.sraw[1] = v0.y; r.sraw[2] = v0.z; r.sraw[3] = v0.w;
    if (fp32) {
      const uint4 v1 = __ldg(sp + 1);
      r.sraw[4] = v1.x; r.sraw[5] = v1.y; r.sraw[6] = v1.z; r.sraw[7] = v1.w;
    }
    const uint2 z = a.zeros ? __ldg(reinterpret_cast<const uint2*>(a.zeros + gi)) : make_uint2(0x08080808u, 0x08080808u);
    r.zraw[0] = z.x; r.zraw[1] = z.y;
  } else {  // edge or unaligned: element by element; channels past N get scale 0
#pragma unroll
    for (int c = 0; c < 8; ++c) r.sraw[c] = 0u;
    r.zraw[0] = r.zraw[1] = 0x08080808u;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (n + c >= a.N) continue;
      if (fp32) {
        r.sraw[c] = __ldg(static_cast<const uint32_t*>(a.scales) + gi + c);
      } else {
        const uint32_t h = __ldg(static_cast<const unsigned short*>(a.scales) + gi + c);
        r.sraw[c / 2] |= h << (16 * (c % 2));
      }
      if (a.zeros) r.zraw[c / 4] = (r.zraw[c / 4] & ~(0xFFu << (8 * (c % 4)))) | ((uint32_t)__ldg(a.zeros + gi + c) << (8 * (c % 4)));
    }
  }
}

template <typename T>
__device__ __forceinline__ void decode_group(const GroupRaw& r, int scale_dtype, float (&scale)[8], Bias<T> (&bias)[8]) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const uint32_t h = (r.sraw[c / 2] >> (16 * (c % 2))) & 0xFFFFu;
    if (scale_dtype == INT4OPS_F16) scale[c] = __half2float(__ushort_as_half((unsigned short)h));
    else if (scale_dtype == INT4OPS_BF16) scale[c] = __uint_as_float(h << 16);
    else scale[c] = __uint_as_float(r.sraw[c]);
    bias[c] = make_bias<T>((float)((r.zraw[c / 4] >> (8 * (c % 4))) & 0xFFu));
  }
}

// B fragments of one step for x row m: {x0,x4}, {x1,x5} (MMA 0) and {x2,x6}, {x3,x7} (MMA 1)
// of x[m, k .. k+7]; zeros past M or K (the weights there are finite, so 0 * w adds nothing).
template <typename T>
__device__ __forceinline__ void load_b(const MmaArgs& a, int m, int k, uint32_t (&b)[4]) {
  uint32_t u[4] = {0u, 0u, 0u, 0u};  // x pairs {x0,x1}, {x2,x3}, {x4,x5}, {x6,x7}
  const T* row = static_cast<const T*>(a.x) + (size_t)m * a.K;
  if (m < a.M && k < a.K) {
    if (a.x_vec) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + k));
      u[0] = v.x; u[1] = v.y; u[2] = v.z; u[3] = v.w;
    } else {
      const unsigned short* h = reinterpret_cast<const unsigned short*>(row);
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (k + j < a.K) u[j / 2] |= (uint32_t)h[k + j] << (16 * (j % 2));
    }
  }
  permute_b(u, b);
}

// Fold a finished group into acc, scaled per row (c0, c1 are row g = word 2j; c2, c3 row g+8).
template <int MT>
__device__ __forceinline__ void flush_group(float (&acc)[kTiles][MT][4], float (&grp)[kTiles][MT][4],
                                            const float (&scale)[8]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[j][mt][i] = fmaf(grp[j][mt][i], scale[2 * j + i / 2], acc[j][mt][i]);
        grp[j][mt][i] = 0.0f;
      }
}

// Resident blocks per SM that ptxas is asked to fit (registers: <= 128 at MT = 1, <= 168 at 2);
// the split plan sizes its waves with it.
constexpr int blocks_per_sm(int M) { return M <= 8 ? 4 : 3; }

template <typename T, int MT>  // MT: m8 tiles of x (M <= 8 * MT)
__global__ void __launch_bounds__(kThreads, blocks_per_sm(8 * MT)) w4a16_mma_kernel(MmaArgs a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q = lane % 4;
  const int n_lane = blockIdx.x * kBN + 8 * g;  // this lane's 8 channels: n_lane .. n_lane + 7
  const int steps = (a.K_rows + kStepRows - 1) / kStepRows;
  // The block's K range, cut into 4 contiguous warp ranges.
  const int s_block = blockIdx.y * a.steps_per_split;
  const int s_block_end = min(s_block + a.steps_per_split, steps);
  const int per_warp = (s_block_end - s_block + kWarps - 1) / kWarps;
  const int s_begin = s_block + warp * per_warp;
  const int s_end = min(s_begin + per_warp, s_block_end);

  float acc[kTiles][MT][4], grp[kTiles][MT][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[j][mt][i] = grp[j][mt][i] = 0.0f;

  float scale[8];
  Bias<T> bias[8];
  int group = -1;
  // The first group's parameters now; each group change decodes them and loads the next's.
  const int steps_per_group = a.steps_per_group;
  GroupRaw graw;
  if (s_begin < s_end) load_group(a, s_begin / steps_per_group, n_lane, graw);
  // Each lane copies its own 2 word vectors and MT x vectors per step into its own slots of a
  // kStages ring and reads only those back, so no barrier is needed: cp.async.wait_group
  // makes a lane's own copies visible to it. Lanes whose channels run past N (or unaligned
  // tensors) load synchronously instead.
  __shared__ uint4 ring[kStages][kWarps][32][2 + MT];
  const bool w_async = a.w_vec && n_lane + 7 < a.N;
  const bool x_async = a.x_vec;
  auto issue = [&](int s, int slot) {
    const int row = s * kStepRows + q;
    const bool row_in = row < a.K_rows;
    const uint32_t* src = a.qweight + (row_in ? (size_t)row * a.N + n_lane : 0);
    if (w_async) {
      cp_async16(&ring[slot][warp][lane][0], src, row_in);
      cp_async16(&ring[slot][warp][lane][1], src + 4, row_in);
    }
    if (x_async) {
      const int k = s * kStepRows * 8 + 8 * q;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = 8 * mt + g;
        const bool in = m < a.M && k < a.K;
        cp_async16(&ring[slot][warp][lane][2 + mt], static_cast<const T*>(a.x) + (in ? (size_t)m * a.K + k : 0), in);
      }
    }
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (s_begin + i < s_end) issue(s_begin + i, i);
    cp_async_commit();  // empty groups too: the wait count below assumes one group per step
  }
  for (int s = s_begin, it = 0; s < s_end; ++s, ++it) {
    // Refill the slot read in the previous iteration (its values are already in registers).
    if (s + kStages - 1 < s_end) issue(s + kStages - 1, (it + kStages - 1) % kStages);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // this step's group has landed
    const int slot = it % kStages;
    uint32_t w[8];
    if (w_async) {
      const uint4 v0 = ring[slot][warp][lane][0], v1 = ring[slot][warp][lane][1];
      w[0] = v0.x; w[1] = v0.y; w[2] = v0.z; w[3] = v0.w;
      w[4] = v1.x; w[5] = v1.y; w[6] = v1.z; w[7] = v1.w;
    } else {
      load_words(a, s * kStepRows + q, n_lane, w);
    }

    const int k0 = s * kStepRows * 8;
    const int gs = s / steps_per_group;  // uniform across the warp
    if (gs != group) {
      if (group >= 0) flush_group(acc, grp, scale);
      group = gs;
      decode_group<T>(graw, a.scale_dtype, scale, bias);
      if ((gs + 1) * steps_per_group < s_end) load_group(a, gs + 1, n_lane, graw);
    }

    uint32_t b[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (x_async) {
        const uint4 v = ring[slot][warp][lane][2 + mt];
        const uint32_t u[4] = {v.x, v.y, v.z, v.w};
        permute_b(u, b[mt]);
      } else {
        load_b<T>(a, 8 * mt + g, k0 + 8 * q, b[mt]);
      }
    }

#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      uint32_t lo[4], hi[4];  // row g (word 2j) and row g+8 (word 2j+1)
      unpack8<T>(w[2 * j], bias[2 * j], lo);
      unpack8<T>(w[2 * j + 1], bias[2 * j + 1], hi);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(grp[j][mt], lo[0], hi[0], lo[1], hi[1], b[mt][0], b[mt][1]);
        mma16816<T>(grp[j][mt], lo[2], hi[2], lo[3], hi[3], b[mt][2], b[mt][3]);
      }
    }
  }
  if (group >= 0) flush_group(acc, grp, scale);
  cp_async_wait<0>();  // only empty groups can be left; do not exit with copies pending

  // Sum the 4 warps' partials. C fragment: acc[j][mt][i] is channel 8g + 2j + i/2 of the
  // block, row m = 8mt + 2q + i%2 of x.
  __shared__ float red[kWarps][MT * 8][kBN];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][8 * mt + 2 * q + i % 2][8 * g + 2 * j + i / 2] = acc[j][mt][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < a.M * kBN; idx += kThreads) {
    const int m = idx / kBN, col = idx % kBN;
    const int n = blockIdx.x * kBN + col;
    float sum = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += red[wi][m][col];
    if (n < a.N) {
      if (gridDim.y == 1)
        static_cast<T*>(a.out)[(size_t)m * a.N + n] = from_float<T>(sum);
      else
        a.workspace[((size_t)blockIdx.y * a.M + m) * a.N + n] = sum;
    }
  }
}

template <typename T, int MT>
cudaError_t launch_mt(const MmaArgs& a, int splits, cudaStream_t stream) {
  dim3 grid((a.N + kBN - 1) / kBN, splits);
  w4a16_mma_kernel<T, MT><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  return launch_splitk_reduce<T>(a.workspace, static_cast<T*>(a.out), a.M * a.N, splits, false, stream);
}

template <typename T>
cudaError_t launch(const MmaArgs& a, int splits, cudaStream_t stream) {
  return a.M <= 8 ? launch_mt<T, 1>(a, splits, stream) : launch_mt<T, 2>(a, splits, stream);
}

}  // namespace
}  // namespace int4ops

using namespace int4ops;

extern "C" int int4ops_w4a16_mma_plan(int M, int N, int K_rows, int sm_count, size_t* workspace_bytes) {
  if (workspace_bytes) *workspace_bytes = 0;
  if (M < 1 || N < 1 || K_rows < 1) return 1;
  if (M <= 8 && N % 8 == 0) {  // the shapes the streaming kernel takes (if the pointers are aligned too)
    const int splits = mma_stream_plan(N, K_rows, sm_count);
    if (workspace_bytes && splits > 1) *workspace_bytes = (size_t)splits * M * N * sizeof(float);
    return splits;
  }
  const int col_tiles = (N + kBN - 1) / kBN;
  const int steps = (K_rows + kStepRows - 1) / kStepRows;
  // Enough blocks to fill the GPU, each warp with at least kStages steps (fewer and the split-K
  // partials and pipeline fill cost more than they hide), and a grid that ends in nearly full
  // waves: with blocks of equal length, a last wave 30% full idles 70% of the GPU for its
  // duration. So take the smallest split count whose wave efficiency is >= 90%, or the best one
  // (fewer splits: longer warps, fewer partials; one split needs no reduce kernel at all).
  const int resident = blocks_per_sm(M) * (sm_count > 0 ? sm_count : 132);
  const int max_splits = std::max(1, steps / (kStages * kWarps));
  int splits = 1;
  double best = -1.0;
  for (int sp = 1; sp <= max_splits; ++sp) {
    const long blocks = (long)col_tiles * sp;
    const long waves = (blocks + resident - 1) / resident;
    const double eff = (double)blocks / (double)(waves * resident);
    if (eff > best + 1e-9) { best = eff; splits = sp; }
    if (eff >= 0.9) { splits = sp; break; }
  }
  const int per = (steps + splits - 1) / splits;
  splits = (steps + per - 1) / per;  // no empty split
  if (workspace_bytes && splits > 1) *workspace_bytes = (size_t)splits * M * N * sizeof(float);
  return splits;
}

extern "C" int int4ops_w4a16_mma(const void* x, const void* qweight, const void* scales, const void* zeros, void* out,
                                 void* workspace, int M, int N, int K, int K_rows, int group_size, int act_dtype,
                                 int scale_dtype, int splits, int device, void* stream) {
  char prefix[256];
  // A step (32 k) must lie in one group: groups are multiples of 32, or one per channel (K_pad).
  if (int rc = check_decode_args(prefix, "w4a16_mma", INT4OPS_MMA_MAX_M, x, qweight, scales, out, workspace, M, N, K,
                                 K_rows, group_size, act_dtype, scale_dtype, splits))
    return rc;

  DeviceGuard guard(device);
  if (guard.err != cudaSuccess)
    return set_error(guard.err, "%s: cudaSetDevice(%d): %s", prefix, device, cudaGetErrorString(guard.err));

  MmaArgs a{decode_args(x, qweight, scales, zeros, out, workspace, M, N, K, K_rows, group_size, scale_dtype)};
  const int steps = (K_rows + kStepRows - 1) / kStepRows;
  a.steps_per_group = group_size >= K_rows * 8 ? steps : group_size / (kStepRows * 8);
  a.steps_per_split = (steps + splits - 1) / splits;
  splits = (steps + a.steps_per_split - 1) / a.steps_per_split;  // no empty split
  a.g_vec = (N % 8 == 0) && aligned16(scales) && (!zeros || (reinterpret_cast<uintptr_t>(zeros) & 7u) == 0);

  // Both kernels step 32 k at a time, so they share this split plan.
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (mma_stream_fits(a, scale_dtype))
    err = mma_stream_launch(a, act_dtype, a.steps_per_split, a.steps_per_group, splits, device, s);
  else
    err = act_dtype == INT4OPS_F16 ? launch<__half>(a, splits, s) : launch<__nv_bfloat16>(a, splits, s);
  if (err != cudaSuccess) return set_error(err, "%s: %s", prefix, cudaGetErrorString(err));
  return 0;
}
