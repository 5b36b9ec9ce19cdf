// Tensor-core decode, streaming fast path: out[M, N] = x[M, K] @ W^T for M <= 8 on aligned inputs.
//
// Same math and fragment mapping as w4a16_mma.cu (read its header first): lane (g, q) of a warp
// owns packed row 4s + q of 8 adjacent channels at step s (32 k), a word's codes pair up as
// {c0,c4} {c1,c5} {c2,c6} {c3,c7}, x is permuted the same way with 4 PRMTs, and each group is
// accumulated on its own in fp32. A block is 4 warps on 64 channels, each warp a contiguous
// quarter of the block's K range. What this kernel does differently, each measured on an H100
// (notes/cuda_backend.md, "Session 6"), 28672x4096 M=1: 58 us -> 28 us:
//
//  * Loads stay in flight in registers, not in a cp.async ring. Each lane keeps the next
//    kDepth steps' weight (2 x 16 B) and x (16 B) loads in flight and refills a slot as soon as
//    the step in it has been consumed. A cp.async ring of the same access pattern tops out at
//    ~1.5 TB/s on an H100 whatever its depth (pure-read test); plain ld.global reaches 2.3-2.8.
//  * Fewer instructions per code. The MMA takes the codes as magic + q (1024 + q in fp16, 128 + q
//    in bf16: one LOP3 per pair, exact) and nothing subtracts the zero point per pair. The offset
//    and the zero point are taken out once per group in fp32:
//        sum_k x (q - z) = sum_k x (magic + q) - (magic + z) * sum_k x
//    and sum_k x comes from one more MMA per k16 with A = ones. fp16 reads codes 1/5 at 16x and
//    rescales with one HFMA2 (x 1/16 + 960 = 1024 + q). ~7 instructions per word instead of 9-13,
//    and no per-channel bias registers: with the shorter loop the kernel fits 4 blocks per SM.
//    Products are exact in the MMA's fp32; the offset costs ~1e-4 relative error per group.
//  * No bounds checks in the loop: steps whose 4 rows and 32 k all exist run unchecked, with
//    pointer bumps instead of index math; only the K tail (the last step when K % 32 != 0, or
//    K_pad / 8 not a multiple of 4) checks. Lanes past N read the last 8 channels (valid memory)
//    and store nothing.
//
// Requirements, checked by mma_stream_fits (w4a16_mma.cu falls back to its general kernel
// otherwise): M <= 8, N % 8 == 0, K % 8 == 0, 16-byte aligned x / qweight / scales, 8-byte
// aligned zeros, fp16/bf16 scales, group size a multiple of 32 or one group per channel.
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "mma_fragments.cuh"

namespace int4ops {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBN = 64;          // channels per block (= per warp; 8 per lane group g)
constexpr int kTiles = kBN / 16;  // m16 tiles per warp
constexpr int kDepth = 2;        // steps in flight per lane (2 was best of 2..6 on the H100)
constexpr int kBlocksPerSM = 4;  // ptxas fits the kernel in 128 registers for this

struct StreamArgs : DecodeArgs {
  int steps_per_split;
  int steps_per_group;
};

template <typename T> constexpr float magic() { return std::is_same<T, __half>::value ? 1024.0f : 128.0f; }
template <typename T> constexpr uint32_t ones() { return std::is_same<T, __half>::value ? 0x3C003C00u : 0x3F803F80u; }

// (a & mask) | magic in one LOP3 (C++ would spend two: LOP3 takes one immediate).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

// Word -> pairs {c0,c4} {c1,c5} {c2,c6} {c3,c7}, each code as magic + q.
template <typename T> __device__ __forceinline__ void unpack(uint32_t w, uint32_t (&p)[4]);
template <> __device__ __forceinline__ void unpack<__half>(uint32_t w, uint32_t (&p)[4]) {
  const uint32_t lo = 0x000F000Fu, hi = 0x00F000F0u, magic = 0x64006400u;  // 1024.0 in both halves
  const __half2 sixteenth = __half2half2(__ushort_as_half(0x2C00));       // 1/16
  const __half2 offset = __half2half2(__ushort_as_half(0x6380));          // 960
  const uint32_t w8 = w >> 8;
  p[0] = and_or(w, lo, magic);
  p[1] = as_u32(__hfma2(as_pair<__half2>(and_or(w, hi, magic)), sixteenth, offset));  // (1024 + 16q) / 16 + 960
  p[2] = and_or(w8, lo, magic);
  p[3] = as_u32(__hfma2(as_pair<__half2>(and_or(w8, hi, magic)), sixteenth, offset));
}
template <> __device__ __forceinline__ void unpack<__nv_bfloat16>(uint32_t w, uint32_t (&p)[4]) {
  // bf16 has 7 mantissa bits: a nibble at bits 4..7 would reach the exponent, so shift instead.
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = and_or(w >> (4 * j), 0x000F000Fu, 0x43004300u);  // 128.0 pairs
}

// Raw scales (8 x 16 bit) and zero points (8 x 8 bit) of a lane's 8 channels for one group.
struct GroupRaw {
  uint32_t s[4];
  uint32_t z[2];
};
__device__ __forceinline__ void load_group(const StreamArgs& a, int group, int n, GroupRaw& r) {
  const size_t gi = (size_t)group * a.N + n;
  const uint4 s = __ldg(reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(a.scales) + gi));
  r.s[0] = s.x; r.s[1] = s.y; r.s[2] = s.z; r.s[3] = s.w;
  const uint2 z = a.zeros ? __ldg(reinterpret_cast<const uint2*>(a.zeros + gi)) : make_uint2(0x08080808u, 0x08080808u);
  r.z[0] = z.x; r.z[1] = z.y;
}

__device__ __forceinline__ uint4 load_stream(const uint32_t* p) {  // weights are read once: keep them out of L1
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) w4a16_mma_stream_kernel(StreamArgs a) {
#if __CUDA_ARCH__ >= 900
  // Let the split-K reduce kernel, launched with PDL, become resident now: it waits in
  // griddepcontrol.wait for this grid to finish, so its launch gap overlaps this kernel.
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int n_lane = min((int)blockIdx.x * kBN + 8 * g, a.N - 8);  // past N: re-read the last 8
  const int steps = (a.K_rows + 3) / 4;
  const int s_block = blockIdx.y * a.steps_per_split;
  const int s_block_end = min(s_block + a.steps_per_split, steps);
  const int per_warp = (s_block_end - s_block + kWarps - 1) / kWarps;
  const int s_begin = s_block + warp * per_warp;
  const int s_end = min(s_begin + per_warp, s_block_end);
  const int s_full = min(s_end, min(a.K_rows / 4, a.K / 32));  // steps that need no checks
  const bool x_row = g < a.M;                                   // this lane's row of x (B column)
  const bool bf16_scales = a.scale_dtype == INT4OPS_BF16;

  float acc[kTiles][4], grp[kTiles][4], xsum[4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = grp[j][i] = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) xsum[i] = 0.0f;

  // Group bookkeeping by counting steps (no division in the loop); the next group's scales and
  // zero points are loaded one group ahead.
  const int spg = a.steps_per_group;
  int group = s_begin / spg;
  int left = (group + 1) * spg - s_begin;  // steps left in the current group
  GroupRaw next;
  float scale[8], zb[8];  // current group: scale, magic + zero point
  auto start_group = [&]() {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint32_t h = (next.s[c / 2] >> (16 * (c % 2))) & 0xFFFFu;
      scale[c] = bf16_scales ? __uint_as_float(h << 16) : __half2float(__ushort_as_half((unsigned short)h));
      zb[c] = (float)((next.z[c / 4] >> (8 * (c % 4))) & 0xFFu) + magic<T>();
    }
    if ((group + 1) * spg < s_end) load_group(a, group + 1, n_lane, next);
  };
  if (s_begin < s_end) {
    load_group(a, group, n_lane, next);
    start_group();
  }
  // C fragment element i of tile j: channel 2j + i/2 of the lane's 8, row m = 2q + i%2 of x; the
  // ones-MMA's xsum[i] holds sum_k x for that same m in every row.
  auto flush = [&]() {
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = 2 * j + i / 2;
        acc[j][i] = fmaf(scale[c], fmaf(-zb[c], xsum[i], grp[j][i]), acc[j][i]);
        grp[j][i] = 0.0f;
      }
#pragma unroll
    for (int i = 0; i < 4; ++i) xsum[i] = 0.0f;
  };
  auto step = [&](const uint4 (&w)[2], uint4 xv) {
    uint32_t b[4];
    const uint32_t u[4] = {xv.x, xv.y, xv.z, xv.w};
    permute_b(u, b);
    constexpr uint32_t one = ones<T>();
    mma16816<T>(xsum, one, one, one, one, b[0], b[1]);
    mma16816<T>(xsum, one, one, one, one, b[2], b[3]);
    const uint32_t words[8] = {w[0].x, w[0].y, w[0].z, w[0].w, w[1].x, w[1].y, w[1].z, w[1].w};
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {  // word 2j is row g of tile j, word 2j+1 row g+8
      uint32_t lo[4], hi[4];
      unpack<T>(words[2 * j], lo);
      unpack<T>(words[2 * j + 1], hi);
      mma16816<T>(grp[j], lo[0], hi[0], lo[1], hi[1], b[0], b[1]);
      mma16816<T>(grp[j], lo[2], hi[2], lo[3], hi[3], b[2], b[3]);
    }
    if (--left == 0) {
      flush();
      ++group;
      left = spg;
      start_group();
    }
  };

  // The unchecked steps, kDepth in flight: a slot is refilled right after its step is read out.
  const T* x = static_cast<const T*>(a.x);
  const size_t step_words = (size_t)4 * a.N;
  const uint32_t* wp = a.qweight + (size_t)(4 * s_begin + q) * a.N + n_lane;
  const T* xp = x + (size_t)min(g, a.M - 1) * a.K + 32 * s_begin + 8 * q;
  auto load = [&](uint4 (&w)[2], uint4& xv) {
    w[0] = load_stream(wp);
    w[1] = load_stream(wp + 4);
    xv = x_row ? __ldg(reinterpret_cast<const uint4*>(xp)) : make_uint4(0, 0, 0, 0);
    wp += step_words;
    xp += 32;
  };
  const int n_full = max(0, s_full - s_begin);
  {
    uint4 wbuf[kDepth][2], xbuf[kDepth];
#pragma unroll
    for (int i = 0; i < kDepth; ++i)
      if (i < n_full) load(wbuf[i], xbuf[i]);
    for (int base = 0; base < n_full; base += kDepth) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        if (base + i < n_full) {
          const uint4 w[2] = {wbuf[i][0], wbuf[i][1]};
          const uint4 xv = xbuf[i];
          if (base + i + kDepth < n_full) load(wbuf[i], xbuf[i]);
          step(w, xv);
        }
      }
    }
  }
  // The K tail: rows past K_pad and x past K read as 0.
  for (int s = s_begin + n_full; s < s_end; ++s) {
    uint4 w[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)}, xv = make_uint4(0, 0, 0, 0);
    const int row = 4 * s + q, k = 32 * s + 8 * q;
    if (row < a.K_rows) {
      w[0] = __ldg(reinterpret_cast<const uint4*>(a.qweight + (size_t)row * a.N + n_lane));
      w[1] = __ldg(reinterpret_cast<const uint4*>(a.qweight + (size_t)row * a.N + n_lane) + 1);
    }
    if (x_row && k < a.K) xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)g * a.K + k));
    step(w, xv);
  }
  if (s_begin < s_end && left != spg) flush();  // a group cut by the end of the range

  // Sum the 4 warps' partials; then store, or write this split's fp32 partial.
  __shared__ float red[kWarps][8][kBN];
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][2 * q + i % 2][8 * g + 2 * j + i / 2] = acc[j][i];
  __syncthreads();
  const int n0 = blockIdx.x * kBN;
  for (int idx = threadIdx.x; idx < a.M * kBN; idx += kThreads) {
    const int m = idx / kBN, col = idx % kBN;
    float sum = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += red[wi][m][col];
    if (n0 + col < a.N) {
      if (gridDim.y == 1)
        static_cast<T*>(a.out)[(size_t)m * a.N + n0 + col] = from_float<T>(sum);
      else
        a.workspace[((size_t)blockIdx.y * a.M + m) * a.N + n0 + col] = sum;
    }
  }
}

}  // namespace

bool mma_stream_fits(const DecodeArgs& a, int scale_dtype) {
  // check_decode_args has already required fp16/bf16 activations and a group size that is a
  // multiple of 32 or one group per channel.
  const bool aligned8 = !a.zeros || (reinterpret_cast<uintptr_t>(a.zeros) & 7u) == 0;
  return a.M <= 8 && a.N % 8 == 0 && a.K % 8 == 0 && aligned16(a.x) && aligned16(a.qweight) && aligned16(a.scales) &&
         aligned8 && (scale_dtype == INT4OPS_F16 || scale_dtype == INT4OPS_BF16);
}

int mma_stream_plan(int N, int K_rows, int sm_count) {
  // As many splits as fit one wave of resident blocks, each warp keeping at least kDepth steps.
  // More splits only add partials and a reduce kernel; a second wave of short blocks costs more
  // than the idle SMs of a partly filled first one. Measured on the H100 (M = 1): 4096x4096
  // 8 splits 8.0 us (16: 10.0), 6144x4096 5 splits 10.3 us (10: 12.6), 28672x4096 1 split
  // 28.7 us (7, the old wave-efficiency rule's pick: 36.6).
  const int col_tiles = (N + kBN - 1) / kBN;
  const int steps = (K_rows + 3) / 4;
  const int resident = kBlocksPerSM * (sm_count > 0 ? sm_count : 132);
  const int max_splits = std::max(1, steps / (kDepth * kWarps));
  const int splits = std::min(std::max(1, resident / col_tiles), max_splits);
  const int per = (steps + splits - 1) / splits;
  return (steps + per - 1) / per;  // no empty split
}

// Programmatic dependent launch of the split-K reduce: Hopper and later (griddepcontrol), and not
// with INT4OPS_PDL=0 (the switch the Triton path reads too). The launch gap it hides is ~1 us of a
// 4096x4096 M = 1 call.
static bool use_pdl(int device) {
  static int cc_major[64];  // 0 = not asked yet
  if (device < 0 || device >= 64) return false;
  if (cc_major[device] == 0 && cudaDeviceGetAttribute(&cc_major[device], cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return cc_major[device] >= 9 && pdl_env_allows();
}

cudaError_t mma_stream_launch(const DecodeArgs& d, int act_dtype, int steps_per_split, int steps_per_group, int splits,
                              int device, cudaStream_t stream) {
  StreamArgs a{d};
  a.steps_per_split = steps_per_split;
  a.steps_per_group = steps_per_group;
  const dim3 grid((d.N + kBN - 1) / kBN, splits);
  if (act_dtype == INT4OPS_F16)
    w4a16_mma_stream_kernel<__half><<<grid, kThreads, 0, stream>>>(a);
  else
    w4a16_mma_stream_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const bool pdl = use_pdl(device);
  const int MN = d.M * d.N;
  return act_dtype == INT4OPS_F16
             ? launch_splitk_reduce<__half>(d.workspace, static_cast<__half*>(d.out), MN, splits, pdl, stream)
             : launch_splitk_reduce<__nv_bfloat16>(d.workspace, static_cast<__nv_bfloat16*>(d.out), MN, splits, pdl, stream);
}

}  // namespace int4ops
