// Fused W4A16 GEMM for large M on sm_90 (H100/H200): out[M, N] = x[M, K] @ W^T with wgmma.
//
// Why a fused kernel: at M >= ~128 the product is compute-bound, and dequantize + cuBLAS pays a
// dense write (and re-read) of the whole weight in 16 bits on top of cuBLAS's time: ~25% at
// M = 1024 (notes/cuda_backend.md). Here the weight goes from its 4-bit words straight into the
// tensor cores' operand registers, and the GEMM runs on wgmma (Hopper's warpgroup MMA, the only
// path to full tensor-core rate on sm_90: mma.sync tops out near 2/3 of it).
//
// Operands are swapped: the kernel computes out^T = W x^T. W is wgmma's A operand, which may
// come from registers (the "RS" form), so the codes are unpacked in registers and never stored
// in 16 bits anywhere; x is the B operand, read by wgmma from shared memory as TMA put it there.
//
// Block: 3 warpgroups on 128 channels x BT tokens (BT = 256, or 128 for small M).
//   * Warpgroup 0 is the producer: one thread issues TMA tensor copies of each K stage (64 k)
//     into a ring of kStages slots: x[BT tokens, 64 k] with the 128-byte swizzle wgmma reads
//     (make_desc), W[8 packed rows, 128 channels] (4 KB), and the scale and zero-point rows the
//     stage needs. The copy engine zero-fills past the tensors' edges (tokens past M, k past K,
//     rows past K_pad, channels past N), so nothing checks bounds. Per slot, a "full" mbarrier
//     counts the bytes in and an "empty" one the consumer warps done with it.
//   * Warpgroups 1 and 2 compute channels 0..63 and 64..127 of the block: per stage they unpack
//     their W words into wgmma A fragments and issue 4 m64nBTk16 wgmmas, waiting only for the
//     previous stage's (wgmma.wait_group 1), so the tensor cores run stage s while the warps
//     unpack stage s + 1. The A registers of the group in flight stay untouched: the main loop
//     alternates two register sets (unrolled by 2).
//   * setmaxnreg moves registers from the producer (40) to the consumers (232).
//   * Where tiles are fewer than SMs, blocks split K (reduce_parts); where a last wave would
//     leave SMs idle long enough, a stream-K launch shares the stages out evenly and a block
//     may run up to three segments of different tiles (BlockWork, hand_over); a half-empty last
//     wave runs as a second launch of tiles whose K is cut in two, the two blocks of a tile a
//     cluster that adds up through distributed shared memory (swap_halves). More whole tiles
//     than SMs run on a persistent grid, one block per SM looping over tiles (TileWork).
//     gemm_sm90_plan picks. The ring and its barriers run on across segments and tiles.
// No block-wide barrier after setup. Every step, measured on an H100 (notes, session 7): the
// first version with cp.async and __syncthreads ran at 0.35-0.55x of cuBLAS; TMA, the producer
// warpgroup and integer-only scale handling brought it to 0.9-1.05x at M >= 1024.
//
// A fragment (the layout of mma.sync's A, per warp 16 rows = 16 channels): lane 4g + q of
// consumer warp w (0..7) owns A rows g and g + 8, which are the adjacent channels
// c = 16w + 2g and c + 1 of the block (one 8-byte shared load reads both words; the epilogue
// stores both outputs of a token with one 4-byte store). For k16 step j it needs k 2q, 2q+1 and
// 2q+8, 2q+9 of those channels: byte q of packed rows 2j and 2j+1. No k permutation, so x needs
// none either, and TMA copies it as it is. Per byte (two codes c, c'): a PRMT and a LOP3 make
// {magic + c, magic + c'}, exact (1024 + q in fp16, 128 + q in bf16); one HFMA2/HADD2 takes off
// magic + z exactly; one HMUL2 by {s, s} is the only rounding (dequant_pair). So W is rounded to
// x's dtype once, as dequantize + cuBLAS does; the sum is fp32 in the MMA.
//
// Requirements (int4ops_w4a16_gemm_sm90 checks them and the Python side falls back to
// dequantize + cuBLAS otherwise): an sm_90 GPU and a library built with sm_90a code, N % 8 == 0
// (N % 16 == 0 with zero points: TMA row strides are multiples of 16 bytes), K % 8 == 0,
// 16-byte aligned x, qweight, scales and zeros, fp16/bf16/fp32 scales, group size a multiple of
// 32 or one group per channel.
#include <cuda.h>  // CUtensorMap (types only; the driver function is looked up at run time)
#include <cudaTypedefs.h>

#include <algorithm>
#include <climits>

#include "mma_fragments.cuh"
#include "wgmma_sm90.cuh"

namespace int4ops {
namespace {

constexpr int kConsumers = 256;               // two warpgroups of math
constexpr int kThreads = 128 + kConsumers;    // + a producer warpgroup, one lane of which issues the copies
// Registers per thread after setmaxnreg: the producer gives most of its share to the consumers
// (128 x 40 + 256 x 232 <= 64K); without it each thread could have 168, and the BT = 256 consumer
// needs ~200.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
constexpr int kBN = 128;                      // channels per block (64 per warpgroup)
constexpr int kBK = 64;                       // k per stage: one 128-byte swizzle row of x per token
constexpr int kWRows = kBK / 8;               // packed rows per stage
constexpr int kWRowBytes = kBN * 4;           // 512
constexpr int kWStageBytes = kWRows * kWRowBytes;  // 4 KB
constexpr int kSStageBytes = 2 * kBN * 4;           // 2 scale rows of 128 channels (fp32 at most)
constexpr int kZStageBytes = 2 * kBN;               // 2 zero-point rows

template <int BT> struct Tile {
  // ~214 KB / ~203 KB of shared memory with the output staging. 4 stages at BT = 256 were faster
  // than 5 even before the staging needed the room (H100, notes, session 12).
  static constexpr int kStages = BT == 256 ? 4 : 8;
  static constexpr int kXStageBytes = BT * 128;
  // The tile's output on its way to TMA stores (store_tile): per consumer warpgroup (64 channels,
  // 128 bytes a token) two boxes of BT / 2 tokens, with the 128-byte swizzle.
  static constexpr int kOutBoxBytes = BT / 2 * 128;
  static constexpr int kOutBytes = 4 * kOutBoxBytes;
  static constexpr int kSmemBytes = kStages * (kXStageBytes + kWStageBytes + kSStageBytes + kZStageBytes + 16) +
                                    kOutBytes + 16 + 1024;  // + mbarriers, alignment slack
  static constexpr int kHalfBytes = BT / 2 * kBN * 4;  // half a tile's tokens in fp32 (swap_halves)
  static constexpr int kAcc = BT / 2;  // fp32 accumulators per thread
};

struct GemmArgs {
  const void* x;
  const uint32_t* qweight;
  const void* scales;
  const uint8_t* zeros;  // nullptr: symmetric (zero point 8)
  void* out;
  int M, N, K, K_rows, group_size, groups, scale_dtype;
  int scale_bytes;  // 2 or 4
  int ld;  // row stride (elements) of qweight, scales, zeros and out; N is the channels of this launch
  bool channels_fastest;  // tile order: see launch()
  int tiles, tiles_x;     // tiles of this launch; tile t sits at (t % tiles_x, t / tiles_x) (launch())
  int tile_stages;        // 64-k stages of a whole tile (all of K)
  // Split K (reduce_parts): blockIdx.z takes stages [z * split_stages, (z + 1) * split_stages).
  int splits = 1, split_stages = 1 << 30;
  // Programmatic dependent launch (launch_grid): the next launch of this call may start early /
  // this launch started early.
  bool next_early = false, early = false;
  // Stream-K (BlockWork, hand_over): the stages of tiles [sk_tile0, tiles) are shared out evenly
  // over the blocks. -1: one tile (or K part) per block.
  int sk_tile0 = -1;
  float* partials = nullptr;  // split K: [tiles][splits][BT * kBN]; stream-K: [blocks + 1][2][BT * kBN] (fp32)
  int* tickets = nullptr;     // split K: [tiles], stream-K: [blocks + 1]; zeroed by gemm_sm90_launch before the launch
};

template <typename T> struct Pair;
template <> struct Pair<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // {1024, 1024}
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) { return as_u32(__floats2half2_rn(lo, hi)); }
};
template <> struct Pair<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // {128, 128}
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) { return as_u32(__floats2bfloat162_rn(lo, hi)); }
};

// Which group each k32 half-stage falls in, walked along K without divisions (a k32 never
// straddles a group; past K_pad it stays on the last group).
struct GroupWalker {
  int g, left;
  // Starting at k0 (a multiple of 64, below K_pad): its group, clamped to the last one (one group
  // per channel may be shorter than K_pad), and the k left in it.
  __device__ __forceinline__ GroupWalker(const GemmArgs& a, int k0)
      : g(min(k0 / a.group_size, a.groups - 1)), left(a.group_size - k0 % a.group_size) {}
  __device__ __forceinline__ int next(const GemmArgs& a) {
    const int cur = g;
    left -= 32;
    if (left <= 0 && g + 1 < a.groups) left += a.group_size, ++g;
    return cur;
  }
};

// Per channel and group: the pair {-(magic + z)} and the scale pair {s, s} the unpacking uses.
struct ChannelConsts {
  uint32_t bias, scale;
};

// The scales and zero points of the two channels for the two k32 halves of a stage, read from
// the stage's copy of scale rows [g0, g0 + 2), as the unpacking's constants. Integer math on the
// 16-bit patterns, because this runs every stage (it was ~100 of ~240 instructions in float):
//   bias: -(magic + z) is -magic's pattern plus z ulps (ulp 1 at 1024 in fp16, at 128 in bf16);
//         fp16's second code is read at 16x, its bias -(64 + z) is 0xD400 plus 16 z ulps.
//   scale: a scale stored in x's dtype is duplicated into both halves with one PRMT; other scale
//         dtypes (fp32, or bf16 scales with fp16 x) go through float.
template <typename T>
__device__ __forceinline__ void stage_consts(const GemmArgs& a, const uint8_t* s_stage, const uint8_t* z_stage, int ch,
                                             int row1, ChannelConsts (&c)[2][2]) {
  constexpr bool kF16 = std::is_same<T, __half>::value;
  constexpr int kNative = kF16 ? INT4OPS_F16 : INT4OPS_BF16;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = h ? row1 : 0;
    uint32_t sc[2];
    if (a.scale_dtype == kNative) {
      const uint32_t v = *reinterpret_cast<const uint32_t*>(s_stage + (row * kBN + ch) * 2);
      sc[0] = __byte_perm(v, 0, 0x1010);
      sc[1] = __byte_perm(v, 0, 0x3232);
    } else {
      float2 f;
      if (a.scale_dtype == INT4OPS_F32)
        f = *reinterpret_cast<const float2*>(s_stage + (row * kBN + ch) * 4);
      else  // the other 16-bit dtype
        f = kF16 ? __bfloat1622float2(as_pair<__nv_bfloat162>(*reinterpret_cast<const uint32_t*>(s_stage + (row * kBN + ch) * 2)))
                 : __half22float2(as_pair<__half2>(*reinterpret_cast<const uint32_t*>(s_stage + (row * kBN + ch) * 2)));
      sc[0] = Pair<T>::pack(f.x, f.x);
      sc[1] = Pair<T>::pack(f.y, f.y);
    }
    const uint32_t z = a.zeros ? *reinterpret_cast<const unsigned short*>(z_stage + row * kBN + ch) : 0x0808u;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t zi = (z >> (8 * i)) & 0xFF;
      c[h][i] = {kF16 ? 0xD400E400u + zi * 0x00100001u : 0xC300C300u + zi * 0x00010001u, sc[i]};
    }
  }
}

// Two codes of byte q of word w (see the header): {(c - z) s, (c' - z) s} in x's dtype.
//   bf16: SHF + PRMT put c at bits 0..3 and c' at bits 16..19; one LOP3 adds the magic 128; HADD2
//         takes off 128 + z; HMUL2 scales.
//   fp16 saves the shift: PRMT copies byte q to bytes 0 and 2, so c' sits at bits 20..23 and the
//         LOP3 makes 1024 + 16 c' (still exact); one HFMA2 with {1, 1/16} and {-(1024 + z), -(64 + z)}
//         gives both c - z exactly.
template <typename T> __device__ __forceinline__ uint32_t dequant_pair(uint32_t w, uint32_t q, const ChannelConsts& cc);
template <>
__device__ __forceinline__ uint32_t dequant_pair<__half>(uint32_t w, uint32_t q, const ChannelConsts& cc) {
  const uint32_t v = __byte_perm(w, 0, q | (q << 8));
  uint32_t t;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(t) : "r"(v), "r"(0x00F0000Fu), "r"(Pair<__half>::kMagic));  // (v & m) | magic
  const __half2 d = __hfma2(as_pair<__half2>(t), as_pair<__half2>(0x2C003C00u), as_pair<__half2>(cc.bias));  // {1, 1/16}
  return as_u32(__hmul2(d, as_pair<__half2>(cc.scale)));
}
template <>
__device__ __forceinline__ uint32_t dequant_pair<__nv_bfloat16>(uint32_t w, uint32_t q, const ChannelConsts& cc) {
  const uint32_t v = __byte_perm(w, w >> 4, q | ((q + 4) << 8));
  uint32_t t;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(t) : "r"(v), "r"(0x000F000Fu), "r"(Pair<__nv_bfloat16>::kMagic));
  const __nv_bfloat162 d = __hadd2(as_pair<__nv_bfloat162>(t), as_pair<__nv_bfloat162>(cc.bias));
  return as_u32(__hmul2(d, as_pair<__nv_bfloat162>(cc.scale)));
}

// Shared-memory matrix descriptor of a K-major B tile with the 128-byte swizzle: rows of 128
// bytes, 8-row (1024-byte) swizzle atoms stacked along N (stride 1024), start 1024-aligned plus
// 32 bytes per k16 step inside the row.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr) {
  uint64_t d = 0;
  d |= (uint64_t)((smem_addr & 0x3FFFF) >> 4);  // start address
  d |= (uint64_t)1 << 16;                       // leading-dimension byte offset (unused by K-major swizzled)
  d |= (uint64_t)(1024 >> 4) << 32;             // stride byte offset: next 8 rows
  d |= (uint64_t)1 << 62;                       // 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keep the compiler from moving accumulator reads/writes across the asynchronous MMAs.
template <int N> __device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// --- TMA (the tensor memory accelerator) and mbarriers -------------------------------------
// One thread copies a whole stage with 3-4 bulk tensor copies; the copy engine zero-fills what
// lies outside the tensors (tokens past M, k past K, packed rows past K_pad, channels past N),
// so nothing here checks bounds. The copies signal the stage's mbarrier with their byte count.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spin on the phase `parity` of mbarrier `bar`; `try_wait` is the try_wait instruction, which
// says at what scope the wait acquires (.cta by default).
#define INT4OPS_MBAR_WAIT_LOOP(try_wait) \
  "{\n.reg .pred done;\nWAIT_%=:\n" try_wait " done, [%0], %1;\n@!done bra WAIT_%=;\n}\n"
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(INT4OPS_MBAR_WAIT_LOOP("mbarrier.try_wait.parity.shared::cta.b64") ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// TMA stores (store_tile): shared memory -> global, in bulk groups that this thread waits for.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, uint32_t src, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(src)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's bulk groups have read their shared memory (the writes to global may still be on
// their way; they are part of the kernel's, done when it is).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Makes this thread's shared-memory writes visible to the copy engine (the async proxy).
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The 128 threads of consumer warpgroup wg (named barriers 2 and 3; 1 is consumers_sync).
__device__ __forceinline__ void warpgroup_sync(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
}

// The tickets that say a part is in the workspace, with release / acquire semantics at GPU
// scope, taken by one consumer thread between two consumer barriers (the barrier orders the other
// threads' part stores before the release, and their part loads after the acquire). Not
// __threadfence(): that is MEMBAR.SC.GPU (sequentially consistent, waits for every store in the
// GPU's view) plus an L1 invalidate, which cost more than the parts' traffic itself.
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int fetch_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory"); }

// --- A tile's two K parts in a cluster of two blocks (LaunchKind::kPair) -------------------
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The address of shared-memory location `addr` in cluster block `rank`.
__device__ __forceinline__ uint32_t peer_addr(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_peer(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}
// As mbar_wait, acquiring at cluster scope: the arrivals come from the other block of a cluster.
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  asm volatile(INT4OPS_MBAR_WAIT_LOOP("mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64") ::"r"(bar),
               "r"(parity)
               : "memory");
}
// 16 bytes into the peer's shared memory, counted on the peer's mbarrier `bar` when they land.
__device__ __forceinline__ void st_async(uint32_t addr, float a, float b, float c, float d, uint32_t bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(addr),
               "f"(a), "f"(b), "f"(c), "f"(d), "r"(bar)
               : "memory");
}

// A tile's fp32 partial sum in the workspace (split K and stream-K alike): kPartVecs float4s,
// float4 j of consumer thread t at [j * kConsumers + t], so a warp's store is one contiguous
// 512-byte piece. Parts are read from L2 (__ldcg: not a stale L1 line).
template <int BT> constexpr int kPartVecs = BT * kBN / 4;
template <int BT> __device__ __forceinline__ void store_part(float4* part, int t, const float (&acc)[BT / 2]) {
#pragma unroll
  for (int j = 0; j < BT / 8; ++j)
    part[j * kConsumers + t] = make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
}
template <int BT> __device__ __forceinline__ void add_part(const float4* part, int t, float (&acc)[BT / 2]) {
#pragma unroll
  for (int j = 0; j < BT / 8; ++j) {
    const float4 v = __ldcg(part + j * kConsumers + t);
    acc[4 * j] += v.x, acc[4 * j + 1] += v.y, acc[4 * j + 2] += v.z, acc[4 * j + 3] += v.w;
  }
}

// Split K: the blocks of a tile (blockIdx.z = 0 .. splits - 1) each hold a partial sum of it.
// Each stores its part in fp32 to its own slot of the workspace and takes a ticket; the last to
// arrive adds the parts in slot order (the same order whoever arrives last, so the result is
// deterministic) and writes the output; the others are done. (It also sets the ticket back to 0;
// each call zeroes the tickets before its launch anyway.)
// No block waits for another, so nothing depends on which blocks run at the same time. Used for
// tiles that would otherwise leave SMs idle (gemm_sm90_launch): the parts cost one fp32 write of
// the tile each, and the last block reads them back from L2.
template <int BT> __device__ __forceinline__ bool reduce_parts(const GemmArgs& a, float (&acc)[BT / 2]) {
  __shared__ int ticket;
  const int t = threadIdx.x - 128;  // consumer thread 0..255
  const int tile = blockIdx.x;
  float4* slots = reinterpret_cast<float4*>(a.partials) + (size_t)tile * a.splits * kPartVecs<BT>;
  store_part<BT>(slots + (size_t)blockIdx.z * kPartVecs<BT>, t, acc);
  consumers_sync();  // consumers only: the producer has left
  if (t == 0) ticket = fetch_add_acq_rel(a.tickets + tile, 1);  // releases this part, acquires the others
  consumers_sync();
  if (ticket != a.splits - 1) return false;
  // Every part, this block's own too, added in slot order into acc (free again: it was stored
  // above). Parts outside, the tile's float4s inside: the loads of one part are independent and
  // overlap; the other order waits out the L2 latency once per load (128 loads in a row per
  // thread: it made the split calls ~10-20 us slower).
#pragma unroll
  for (int i = 0; i < BT / 2; ++i) acc[i] = 0.0f;
  for (int z = 0; z < a.splits; ++z) add_part<BT>(slots + (size_t)z * kPartVecs<BT>, t, acc);
  if (t == 0) a.tickets[tile] = 0;
  return true;
}

// A tile's K in two parts, one per block of a cluster of two (the last wave's tiles, where two
// parts per tile fit one wave; gemm_sm90_launch). Rank 0 writes the tile's first BT / 2 tokens
// (c < BT / 16 in the accumulator layout), rank 1 the rest. Each block sends the half it does
// not write straight into the other's x ring, free once both are done with the main loop:
//   1. each consumer warp, its wgmmas retired, tells the peer that this block's ring is free
//      (peer_free there counts 8 arrivals);
//   2. once the peer's ring is free, st.async copies the half (BT / 2 x 128 fp32, 64 KB at
//      BT = 256) into it, counted in bytes on the peer's data_in barrier (armed for that many at
//      setup, so it does not matter which comes first);
//   3. once the peer's half has landed here, it is added to the half this block writes.
// Thread t sends to thread t (same channels and tokens in both blocks), float4 j of the half at
// [j * kConsumers + t], so a warp's accesses are contiguous. No workspace, no L2 round trip, and
// neither block exits while the other may still write into it (each waits for its data_in).
// a + b == b + a in fp32, so both blocks' halves are what one block adding both parts would have.
template <int BT, int kGive, int kKeep>
__device__ __forceinline__ void swap_halves_at(float (&acc)[BT / 2], uint32_t xs, uint32_t peer_free, uint32_t data_in,
                                               uint32_t peer) {
  const int t = threadIdx.x - 128;
  mbar_wait_cluster(peer_free, 0);
  const uint32_t dst = peer_addr(xs, peer), bar = peer_addr(data_in, peer);
#pragma unroll
  for (int j = 0; j < BT / 16; ++j) {
    const int c = kGive + j;
    st_async(dst + (j * kConsumers + t) * 16, acc[4 * c], acc[4 * c + 1], acc[4 * c + 2], acc[4 * c + 3], bar);
  }
  mbar_wait_cluster(data_in, 0);
#pragma unroll
  for (int j = 0; j < BT / 16; ++j) {
    const int c = kKeep + j;
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(xs + (j * kConsumers + t) * 16)
                 : "memory");
    acc[4 * c] += v.x, acc[4 * c + 1] += v.y, acc[4 * c + 2] += v.z, acc[4 * c + 3] += v.w;
  }
}
template <int BT>
__device__ __forceinline__ void swap_halves(float (&acc)[BT / 2], uint32_t rank, uint32_t xs, uint32_t peer_free,
                                            uint32_t data_in, int lane) {
  if (lane == 0) mbar_arrive_peer(peer_addr(peer_free, rank ^ 1));  // step 1: this warp's wgmmas are done
  if (rank == 0)
    swap_halves_at<BT, BT / 16, 0>(acc, xs, peer_free, data_in, 1);
  else
    swap_halves_at<BT, 0, BT / 16>(acc, xs, peer_free, data_in, 0);
}

// What a block computes: one to three segments, each some stages [kt0, kt1) of one tile, with its
// own accumulators and epilogue. Without stream-K a block has one: its tile blockIdx.x, whole or
// its K part blockIdx.z. A stream-K launch (gemm_sm90_plan) has one block per SM and shares out
// tiles [sk_tile0, tiles), fewer than two waves' worth: their stages, laid end to end, are cut into
// gridDim.x even ranges, one per block, and cut again at tile ends, so no SM idles in a last wave.
// 6144x4096 at M = 1024 on 132 SMs: 192 tiles of 64 stages, 93 per block: one whole tile and part
// of another, or the ends of two (hand_over adds the two parts of a tile cut by a block edge). A
// range is shorter than two tiles, so it touches at most three (kMaxSegments). The producer and the
// consumers walk the same list.
constexpr int kMaxSegments = 3;
struct Segment {
  int tile, kt0, kt1;
};
struct BlockWork {
  int u, u_end;  // stages [u, u_end) of the tiles laid end to end (tile t: [t, t + 1) * tile_stages)
  __device__ __forceinline__ explicit BlockWork(const GemmArgs& a) {
    const int ts = a.tile_stages;
    if (a.sk_tile0 >= 0) {
      // Even shares (they differ by at most one stage), each at least tile_stages long as there
      // are at least gridDim.x tiles: a tile is cut by at most one block edge, so hand_over never
      // sees more than two parts.
      const long long total = (long long)(a.tiles - a.sk_tile0) * ts;
      u = a.sk_tile0 * ts + (int)(blockIdx.x * total / gridDim.x);
      u_end = a.sk_tile0 * ts + (int)((blockIdx.x + 1) * total / gridDim.x);
    } else {
      const int tile = blockIdx.x;
      u = tile * ts + blockIdx.z * a.split_stages;
      u_end = min(tile * ts + ts, u + a.split_stages);
    }
  }
  __device__ __forceinline__ bool next(const GemmArgs& a, Segment& s) {
    if (u >= u_end) return false;
    const int ts = a.tile_stages;
    s.tile = u / ts;
    s.kt0 = u - s.tile * ts;
    s.kt1 = min(ts, u_end - s.tile * ts);
    u = s.tile * ts + s.kt1;
    return true;
  }
};

// A persistent launch (LaunchKind::kPersistent; one block per SM, fewer blocks than tiles): block b
// runs the whole tiles b, b + gridDim.x, b + 2 gridDim.x, ..., the order in which a plain launch's
// waves would run them. What it saves is the block turnover between tiles: a new block's setup,
// its first copies' latency and the ring's fill (the producer loads the next tile's first stages
// while the consumers finish the last ones and store the tile): 2-4% on 28672x4096 and
// 33792x4096 at M = 1024-4096 on an H100 (notes, session 12).
struct TileWork {
  int tile;
  __device__ __forceinline__ explicit TileWork(const GemmArgs&) : tile(blockIdx.x) {}
  __device__ __forceinline__ bool next(const GemmArgs& a, Segment& s) {
    if (tile >= a.tiles) return false;
    s = {tile, 0, a.tile_stages};
    tile += gridDim.x;
    return true;
  }
};

// Stream-K: a tile cut by the edge between blocks b - 1 and b has two parts, its first stages
// (side 0, block b - 1's last segment) and its last ones (side 1, block b's first segment, which
// usually finishes long before: block b starts with it). Whichever part finishes second writes
// the tile: if the other part is already in the workspace (ticket 1) it just adds it to its
// registers; else it stores its own part, takes the ticket, and adds the other's if that came
// in meanwhile (both store in the race, each to its own slot). So the common case costs one fp32
// write and one read of the tile through L2, and no block ever waits for another. Two fp32 sums
// in either order are the same bits, so the result does not depend on who finishes first.
// Returns whether this block writes the tile.
template <int BT> __device__ __forceinline__ bool hand_over(const GemmArgs& a, const Segment& s, float (&acc)[BT / 2]) {
  __shared__ int ticket;
  const int t = threadIdx.x - 128;  // consumer thread 0..255
  const int side = s.kt0 > 0;
  const int edge = blockIdx.x + 1 - side;
  float4* mine = reinterpret_cast<float4*>(a.partials) + (size_t)(2 * edge + side) * kPartVecs<BT>;
  const float4* other = reinterpret_cast<const float4*>(a.partials) + (size_t)(2 * edge + 1 - side) * kPartVecs<BT>;
  consumers_sync();  // everyone has read the last segment's ticket
  if (t == 0) ticket = ld_acquire(a.tickets + edge);
  consumers_sync();
  if (ticket == 0) {
    store_part<BT>(mine, t, acc);
    consumers_sync();
    if (t == 0) ticket = fetch_add_acq_rel(a.tickets + edge, 1);  // releases this part, acquires the other
    consumers_sync();
    if (ticket == 0) return false;  // the other part will add this one
  }
  add_part<BT>(other, t, acc);
  return true;
}

// The tile out, once this block holds its sum (or, kPair, half of it: tokens [rank BT / 2, +BT / 2)).
// Each consumer warpgroup rounds its 64 channels x BT tokens to T into its two staging boxes, and
// one of its threads hands them to TMA stores, which clip at M and N; the consumers go on to the
// next tile while the stores drain. Stores from registers straight to global memory (64 4-byte
// stores a thread, every SM at the same moment at the end of a wave) stalled the consumers:
// taking them out saved ~6% of the time at 28672x4096 and 6144x4096, M = 1024-4096 (H100, notes,
// session 12). Box layout (the 128-byte swizzle, as the map says): token r of the box at byte
// r * 128, 16-byte chunk j of its row at chunk j ^ (r % 8), so a warp's 32 stores of a token pair
// row hit 32 different banks.
template <typename T, int BT, bool kPair>
__device__ __forceinline__ void store_tile(const float (&acc)[BT / 2], uint32_t os, const CUtensorMap* map_out,
                                           int tok0, int n0, uint32_t rank, int warp, int g, int q) {
  using TT = Tile<BT>;
  const int wg = warp >> 2;
  const bool leader = (threadIdx.x & 127) == 0;
  const uint32_t box0 = os + 2 * wg * TT::kOutBoxBytes;
  if (leader) bulk_wait_read();  // the previous tile's stores have read the boxes
  warpgroup_sync(wg);
  const uint32_t b = 32 * (warp & 3) + 4 * g;  // channels ch, ch + 1: their byte in the box's 128-byte row
#pragma unroll
  for (int c = 0; c < BT / 8; ++c) {
    const int half = c / (BT / 16);  // d[4c + e] = (channel ch, token 8c + 2q + e), d[4c + 2 + e] = (ch + 1, same token)
    if (kPair && half != (int)rank) continue;  // the peer writes this half
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = 8 * (c % (BT / 16)) + 2 * q + e;  // the token's row in its box
      const uint32_t addr = box0 + half * TT::kOutBoxBytes + r * 128 + ((((b >> 4) ^ (r & 7)) << 4) | (b & 15));
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(Pair<T>::pack(acc[4 * c + e], acc[4 * c + 2 + e]))
                   : "memory");
    }
  }
  fence_async_shared();
  warpgroup_sync(wg);
  if (leader) {
#pragma unroll
    for (int half = 0; half < 2; ++half)
      if (!kPair || half == (int)rank)
        tma_store_2d(map_out, box0 + half * TT::kOutBoxBytes, n0 + 64 * wg, tok0 + half * BT / 2);
    bulk_commit();
  }
}

// Which kind of launch an instantiation runs. Each has its own, so that the others carry none of
// its code (with the pair code in the one kernel, every other launch ran ~0.5 us a block slower on
// an H200):
//   kSegments:  one to kMaxSegments segments per block (one tile, a K part, stream-K's shares);
//   kPair:      clusters of a tile's two K parts (LaunchOptions::pair);
//   kPersistent: a persistent grid, any number of whole tiles per block (TileWork, whole_tiles).
enum class LaunchKind { kSegments, kPair, kPersistent };

template <typename T, int BT, LaunchKind kKind>
__global__ void __launch_bounds__(kThreads, 1)
    w4a16_gemm_sm90_kernel(const GemmArgs a, const __grid_constant__ CUtensorMap map_x,
                           const __grid_constant__ CUtensorMap map_w, const __grid_constant__ CUtensorMap map_s,
                           const __grid_constant__ CUtensorMap map_z, const __grid_constant__ CUtensorMap map_out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kPair = kKind == LaunchKind::kPair;
  using Work = std::conditional_t<kKind == LaunchKind::kPersistent, TileWork, BlockWork>;
  using TT = Tile<BT>;
  constexpr int S = TT::kStages;
  using Mma = WgmmaRS<BT, std::is_same<T, __nv_bfloat16>::value>;
  extern __shared__ uint8_t smem_raw[];
  // The swizzle pattern is defined on 1024-byte-aligned addresses.
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024 - (smem_base & 1023)) & 1023;
  const uint32_t xs = smem_base + pad;                  // x stages (shared addresses)
  const uint32_t os = xs + S * TT::kXStageBytes;        // output staging (store_tile)
  const uint32_t ws = os + TT::kOutBytes;               // W stages
  const uint32_t ss = ws + S * kWStageBytes;            // scale rows
  const uint32_t zs = ss + S * kSStageBytes;            // zero-point rows
  const uint32_t full = zs + S * kZStageBytes;          // per slot: its copies have landed
  const uint32_t empty = full + 8 * S;                  // per slot: every consumer warp is done with it
  const uint32_t peer_free = empty + 8 * S;             // kPair: the peer's x ring is free (swap_halves)
  const uint32_t data_in = peer_free + 8;               // kPair: the peer's half has landed in this x ring
  const uint8_t* ws_ptr = smem_raw + pad + S * TT::kXStageBytes + TT::kOutBytes;
  const uint8_t* ss_ptr = ws_ptr + S * kWStageBytes;
  const uint8_t* zs_ptr = ss_ptr + S * kSStageBytes;

  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) - 4;  // consumer warp 0..7 (the producer's are < 0)
  const int g = lane >> 2, q = lane & 3;
  const int ch = 64 * (warp >> 2) + 16 * (warp & 3) + 2 * g;  // A rows g, g+8 = channels ch, ch + 1 of the block
  const uint32_t rank = kPair ? cluster_rank() : 0;            // kPair: which half of the tile this block writes
  // Where tile t starts: its first token and channel.
  auto tile_origin = [&](int t, int& tok0, int& n0) {
    const int tx = t % a.tiles_x, ty = t / a.tiles_x;
    tok0 = (a.channels_fastest ? ty : tx) * BT;
    n0 = (a.channels_fastest ? tx : ty) * kBN;
  };

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      mbar_init(full + 8 * s, 1);                   // the producer's arrive (+ the copies' bytes)
      mbar_init(empty + 8 * s, kConsumers / 32);    // one arrive per consumer warp
    }
    if (kPair) {
      mbar_init(peer_free, kConsumers / 32);
      mbar_init(data_in, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    if (kPair) mbar_expect_tx(data_in, TT::kHalfBytes);
  }
  // The barriers are initialized before anyone uses them, the peer's too; no block-wide sync after this.
  if (kPair)
    cluster_sync();
  else
    __syncthreads();
  // A call's second launch (the last wave's tiles, or the stream-K blocks after whole
  // waves) reads nothing this one writes, so it is launched with programmatic dependent launch
  // and allowed to start now: its blocks take each SM as this launch's block there leaves,
  // instead of after the slowest block and a launch gap (launch_grid).
  if (a.next_early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    // Producer warpgroup, one thread: the block's i-th stage (k stage kt of some segment's tile)
    // goes to slot i % S once the consumers have released the slot's previous stage (i - S):
    // x[tok0 .. +BT, 64kt .. +64], W[8kt .. +8, n0 .. +128], and the scale / zero-point rows
    // [g, g + 2) of channels n0 .. +128, g the group of the stage's first k (its second k32 half
    // is in group g or g + 1). The ring runs on across segments, so the next segment's stages
    // load while the consumers finish the last one.
    if (threadIdx.x == 0) {
      const uint32_t bytes =
          TT::kXStageBytes + kWStageBytes + 2 * kBN * a.scale_bytes + (a.zeros ? kZStageBytes : 0);
      Work work(a);
      Segment seg;
      int i = 0;
      while (work.next(a, seg)) {
        int tok0, n0;
        tile_origin(seg.tile, tok0, n0);
        GroupWalker groups(a, seg.kt0 * kBK);
        for (int kt = seg.kt0; kt < seg.kt1; ++kt, ++i) {
          const int slot = i % S;
          if (i >= S) mbar_wait(empty + 8 * slot, (i / S - 1) & 1);
          const uint32_t bar = full + 8 * slot;
          const int grp = groups.next(a);
          groups.next(a);
          mbar_expect_tx(bar, bytes);
          tma_load_2d(xs + slot * TT::kXStageBytes, &map_x, kt * kBK, tok0, bar);
          tma_load_2d(ws + slot * kWStageBytes, &map_w, n0, kt * kWRows, bar);
          tma_load_2d(ss + slot * kSStageBytes, &map_s, n0, grp, bar);
          if (a.zeros) tma_load_2d(zs + slot * kZStageBytes, &map_z, n0, grp, bar);
        }
      }
      // Launched early, this block does not end before the previous launch has (and its stores
      // are visible), so the call is complete when its last launch is, for whatever the stream
      // runs next.
      if (a.early) asm volatile("griddepcontrol.wait;" ::: "memory");
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));

  float acc[TT::kAcc];
  uint32_t regs0[4][4], regs1[4][4];
  Work work(a);
  Segment seg;
  int i0 = 0;  // the block's stages before this segment (the ring position)
  // Per segment: its main loop, then its epilogue (the parts' hand-over, the output stores).
  // Unrolled, not a loop, where a block has at most kMaxSegments: in a loop around the main loop,
  // the epilogue's divergent branches (the hand-over ticket) made ptxas keep the stage counters
  // and wgmma descriptors in per-thread registers instead of uniform ones (R2UR moves, +9%
  // instructions in the main loop, 10% slower). Straight-line copies keep the single-tile SASS.
  // The persistent kernel, with no hand-over, loops.
  constexpr bool kLoop = kKind == LaunchKind::kPersistent;
#pragma unroll(kLoop ? 1 : kMaxSegments)
  for (int si = 0; kLoop || si < kMaxSegments; ++si) {
    if (!work.next(a, seg)) break;
#pragma unroll
    for (int i = 0; i < TT::kAcc; ++i) acc[i] = 0.0f;
    GroupWalker use_groups(a, seg.kt0 * kBK);
    // The block's stage i: wait for its copies, unpack, issue 4 wgmmas, release the previous
    // stage's slot (the previous segment's last one was released at its end).
    auto stage = [&](int i, uint32_t(&A)[4][4]) {
      const int g0 = use_groups.next(a), row1 = use_groups.next(a) - g0;  // scale row of each k32 half
      const int slot = i % S;
      mbar_wait(full + 8 * slot, (i / S) & 1);  // stage i has landed
      ChannelConsts c[2][2];
      stage_consts<T>(a, ss_ptr + slot * kSStageBytes, zs_ptr + slot * kZStageBytes, ch, row1, c);
      const uint8_t* wrow = ws_ptr + slot * kWStageBytes + ch * 4;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint2 w0 = *reinterpret_cast<const uint2*>(wrow + (2 * j) * kWRowBytes);      // k 16j .. 16j+7
        const uint2 w1 = *reinterpret_cast<const uint2*>(wrow + (2 * j + 1) * kWRowBytes);  // k 16j+8 .. 16j+15
        const int h = j >> 1;
        A[j][0] = dequant_pair<T>(w0.x, q, c[h][0]);  // row g,   k 2q, 2q+1
        A[j][1] = dequant_pair<T>(w0.y, q, c[h][1]);  // row g+8
        A[j][2] = dequant_pair<T>(w1.x, q, c[h][0]);  // row g,   k 2q+8, 2q+9
        A[j][3] = dequant_pair<T>(w1.y, q, c[h][1]);  // row g+8
      }
      // Every input of the 4 wgmmas is computed before the first: an instruction writing one of
      // them in between makes ptxas serialize the wgmmas (warning C7513).
      uint64_t desc[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // + 32 bytes per k16 step (the address field counts 16 B)
        desc[j] = make_desc(xs + slot * TT::kXStageBytes) + 2 * j;
        asm volatile("" : "+l"(desc[j]));
      }
      wgmma_fence();
      fence_acc(acc);
#pragma unroll
      for (int j = 0; j < 4; ++j) Mma::mma(acc, A[j], desc[j]);
      wgmma_commit();
      fence_acc(acc);
      wgmma_wait<1>();  // stage i - 1's group is done: its A registers and its slot are free
      if (i > i0 && lane == 0) mbar_arrive(empty + 8 * ((i - 1) % S));
    };

    // No condition between the two halves: ptxas must see that regs0 is only rewritten after the
    // wait that retires the group reading it.
    const int i1 = i0 + seg.kt1 - seg.kt0;
    int i = i0;
    for (; i + 1 < i1; i += 2) {
      stage(i, regs0);
      stage(i + 1, regs1);
    }
    if (i < i1) stage(i, regs0);
    wgmma_wait<0>();
    fence_acc(acc);
    if (lane == 0) mbar_arrive(empty + 8 * ((i1 - 1) % S));
    i0 = i1;

    // Whether this block writes the tile: a part of a split tile only if it is the last one in.
    bool write = true;
    if constexpr (kPair) {
      swap_halves<BT>(acc, rank, xs, peer_free, data_in, lane);
    } else if constexpr (kKind == LaunchKind::kSegments) {
      if (a.splits > 1)
        write = reduce_parts<BT>(a, acc);
      else if (seg.kt1 - seg.kt0 < a.tile_stages)
        write = hand_over<BT>(a, seg, acc);
    }

    if (write) {
      int tok0, n0;
      tile_origin(seg.tile, tok0, n0);
      store_tile<T, BT, kPair>(acc, os, &map_out, tok0, n0, rank, warp, g, q);
    }
  }
  // The staging boxes stay allocated until the last stores have read them.
  if ((threadIdx.x & 127) == 0) bulk_wait_read();
#endif
}

// cuTensorMapEncodeTiled from the driver, looked up once through the runtime (the library does
// not link libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      p = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A 2-D row-major tensor [rows, cols] (row stride ld elements), copied in boxes of box_rows x box_cols.
bool make_map(CUtensorMap* map, CUtensorMapDataType type, int elem_bytes, const void* ptr, int rows, int cols, int ld,
              int box_rows, int box_cols, CUtensorMapSwizzle swizzle) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)ld * elem_bytes};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, type, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

using GemmKernel = void (*)(GemmArgs, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap);
struct TensorMaps {
  CUtensorMap x, w, s, z, out;
};
// A launch's grid and the kernel instantiation that runs it.
struct LaunchShape {
  dim3 grid;
  LaunchKind kind;
};
template <typename T, int BT> GemmKernel kernel_for(LaunchKind kind) {
  if constexpr (BT == 256) {
    if (kind == LaunchKind::kPair) return w4a16_gemm_sm90_kernel<T, BT, LaunchKind::kPair>;
  }
  return kind == LaunchKind::kPersistent ? w4a16_gemm_sm90_kernel<T, BT, LaunchKind::kPersistent>
                                         : w4a16_gemm_sm90_kernel<T, BT, LaunchKind::kSegments>;
}

// One launch of the kernel. `early`: with programmatic dependent launch, so that its blocks take
// the SMs as the previous launch's blocks leave (the kernel's griddepcontrol says why that is
// safe); `next_early`: the next launch is an early one (it does not start before this one says
// so). kPair launches run in clusters of a tile's two K parts (grid z = 2, swap_halves).
template <typename T, int BT>
cudaError_t launch_grid(GemmArgs a, LaunchShape shape, bool early, bool next_early, const TensorMaps& m,
                        cudaStream_t stream) {
  a.early = early;
  a.next_early = next_early;
  const GemmKernel kernel = kernel_for<T, BT>(shape.kind);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<BT>::kSmemBytes);
  if (err != cudaSuccess) return err;
  LaunchConfig lc(shape.grid, dim3(kThreads), Tile<BT>::kSmemBytes, stream, early,
                  shape.kind == LaunchKind::kPair ? 2 : 1);
  return cudaLaunchKernelEx(&lc.cfg, kernel, a, m.x, m.w, m.s, m.z, m.out);
}

// How launch() runs a GemmArgs. Programmatic dependent launch (launch_grid) only links launches
// of one call.
struct LaunchOptions {
  int tile_tokens = 256;      // 128 or 256
  int sk_blocks = 0;          // > 0: a stream-K launch of that many blocks (GemmArgs::sk_tile0: where its shared tiles start)
  int persistent_blocks = 0;  // > 0: whole tiles, where they are more, run on a persistent grid of this many blocks
  bool pair = false;          // the K parts (splits = 2) of each tile are a cluster of 2 blocks that add up
                              // through distributed shared memory (swap_halves), not the workspace
  bool early = false;         // the first launch here starts early
  bool next_early = false;    // the launch after the last one here will
  bool pdl = false;           // the stream-K launch after whole waves here starts early
};

// A launch of whole tiles [0, tiles): one block per tile, or where they are more than
// `max_blocks` (the SMs), a persistent grid of that many blocks (TileWork).
LaunchShape whole_tiles(GemmArgs& a, int tiles, int max_blocks) {
  a.tiles = tiles;
  if (max_blocks > 0 && tiles > max_blocks) return {dim3(max_blocks), LaunchKind::kPersistent};
  return {dim3(tiles), LaunchKind::kSegments};
}

// How many clusters of two 256-token blocks the current GPU runs at once (a cluster's blocks share
// a GPC, and an SM holds one block): about half the SMs, fewer where a GPC has an odd count.
template <typename T> int pair_clusters() {
  static int cached[64];  // per device, + 1 (0: not asked yet)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (cached[dev] == 0) {
    auto kernel = w4a16_gemm_sm90_kernel<T, 256, LaunchKind::kPair>;
    int n = 0;
    LaunchConfig lc(dim3(1, 1, 2), dim3(kThreads), Tile<256>::kSmemBytes, nullptr, false, 2);
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<256>::kSmemBytes) != cudaSuccess ||
        cudaOccupancyMaxActiveClusters(&n, kernel, &lc.cfg) != cudaSuccess) {
      cudaGetLastError();  // not sticky: the tail just runs without clusters
      n = 0;
    }
    cached[dev] = n + 1;
  }
  return cached[dev] - 1;
}

template <typename T, int BT>
cudaError_t launch(GemmArgs a, LaunchOptions o, cudaStream_t stream) {
  TensorMaps m = {};
  if (!make_map(&m.x, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.x, a.M, a.K, a.K, BT, kBK, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&m.w, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, a.qweight, a.K_rows, a.N, a.ld, kWRows, kBN,
                CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !make_map(&m.s, a.scale_bytes == 4 ? CU_TENSOR_MAP_DATA_TYPE_UINT32 : CU_TENSOR_MAP_DATA_TYPE_UINT16,
                a.scale_bytes, a.scales, a.groups, a.N, a.ld, 2, kBN, CU_TENSOR_MAP_SWIZZLE_NONE) ||
      (a.zeros && !make_map(&m.z, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, a.zeros, a.groups, a.N, a.ld, 2, kBN,
                            CU_TENSOR_MAP_SWIZZLE_NONE)) ||
      !make_map(&m.out, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.out, a.M, a.N, a.ld, BT / 2, 64, CU_TENSOR_MAP_SWIZZLE_128B))
    return cudaErrorInvalidValue;
  // Tiles that run together should share the operand that does not fit in L2: with x larger
  // than W (4M > N), consecutive tiles are consecutive channel tiles of the same tokens, so a
  // wave reads a slab of x once and re-reads W (4096x4096, M = 4096: x is 32 MB, W 8 MB);
  // otherwise consecutive token tiles of the same channels.
  const int token_tiles = (a.M + BT - 1) / BT, ch_tiles = (a.N + kBN - 1) / kBN;
  a.tiles = token_tiles * ch_tiles;
  a.tiles_x = a.channels_fastest ? ch_tiles : token_tiles;
  a.tile_stages = (a.K_rows + kWRows - 1) / kWRows;
  // A stream-K launch has one block per SM; the tiles before a.sk_tile0 (whole waves) run first,
  // in a launch of their own.
  if (o.sk_blocks > 0) {
    if (a.sk_tile0 > 0) {
      GemmArgs whole = a;
      whole.sk_tile0 = -1;
      const LaunchShape shape = whole_tiles(whole, a.sk_tile0, o.persistent_blocks);
      const cudaError_t err = launch_grid<T, BT>(whole, shape, o.early, o.pdl, m, stream);
      if (err != cudaSuccess) return err;
      o.early = o.pdl;
    }
    return launch_grid<T, BT>(a, {dim3(o.sk_blocks), LaunchKind::kSegments}, o.early, o.next_early, m, stream);
  }
  // K parts (split K: grid z; a tile's pair: a cluster along z), or whole tiles.
  const LaunchShape shape = a.splits > 1
                                ? LaunchShape{dim3(a.tiles, 1, a.splits), o.pair ? LaunchKind::kPair : LaunchKind::kSegments}
                                : whole_tiles(a, a.tiles, o.persistent_blocks);
  return launch_grid<T, BT>(a, shape, o.early, o.next_early, m, stream);
}

template <typename T> cudaError_t launch_tiles(const GemmArgs& a, const LaunchOptions& o, cudaStream_t stream) {
  return o.tile_tokens == 256 ? launch<T, 256>(a, o, stream) : launch<T, 128>(a, o, stream);
}

// The channels [n0, n0 + N) of the GEMM: every pointer moves to channel n0, strides stay.
GemmArgs channel_slice(GemmArgs a, int n0, int N) {
  a.qweight += n0;
  a.scales = static_cast<const char*>(a.scales) + (size_t)n0 * a.scale_bytes;
  if (a.zeros) a.zeros += n0;
  a.out = static_cast<char*>(a.out) + (size_t)n0 * 2;
  a.N = N;
  return a;
}

}  // namespace

// How a call runs, from its shape alone (the workspace query and the launch agree by construction;
// a cluster / distributed-shared-memory version of the split, tried in session 8, is in the notes).
// One block per SM, so the number of tiles against the number of SMs decides:
//   * 256-token tiles (fewer x bytes per MMA), or 128-token ones for M <= 128 (a 256-token tile
//     would mostly multiply padding: 28672x4096 at M = 64, 124 -> 64 us) and where twice as many
//     still fit in one wave (4096x4096: M = 256 runs 64 blocks, not 32; M = 1024 keeps 128 of 256);
//   * fewer tiles than SMs (M <= 256 on 8B layers): each tile's K is cut into `splits` parts,
//     one block each (reduce_parts), keeping at least kMinSplitStages stages of 64 k per part so
//     the pipeline fill stays small next to it. 4096x14336 at M = 64 (32 tiles): 93 -> 35 us.
//   * a last wave at most half full (6144x4096 at M = 1024: 192 tiles of 256 tokens, 60 in the
//     second wave) costs a whole wave for little work: the channel tiles of that wave run as a
//     second launch with twice the blocks and half the work each, in one wave: 256-token tiles
//     with K in two parts, each tile a cluster of two blocks (swap_halves; K of at least
//     2 kMinSplitStages stages, and as many clusters as the GPU holds at once), else 128-token
//     tiles, whose unpacking costs twice as much per MMA (6144x4096 at M = 1024 on an H100:
//     79-80 against 82-85 us, session 11). The second launch starts with programmatic dependent
//     launch, as the first one's blocks leave (also after stream-K's whole waves).
//   * launches of more whole tiles than SMs run on a persistent grid (TileWork): one block per
//     SM, looping over tiles, so that a tile's end overlaps the next one's first copies instead
//     of a block's exit, a new block's setup and the ring's fill (INT4OPS_GEMM_PERSISTENT=0: one
//     block per tile; persistent_blocks, set by the caller).
//   * stream-K (BlockWork, hand_over) where the last wave would leave the SMs idle for at least
//     kMinStreamKIdle stages each and all tiles share one token tile: 28672x8192 at M <= 256,
//     224 tiles of 128 stages, 8-9% faster on an H200. Each cut tile costs a part's fp32 round
//     trip through L2 and each extra segment a pipeline drain (~20 stages in all, measured), and
//     with several token tiles the blocks, out of step along K, no longer share x and W in L2
//     (4096x14336 at M = 2048: 14% slower), so it is not the general rule.
// Measured on an H200 (notes/cuda_backend.md, session 8): splitting K in 2 through the workspace,
// for 6144x4096 at M = 256, was slower (34 vs 30 us): the parts' fp32 round trip through L2
// costs about what the split saves when it only doubles the blocks; stream-K tied with the
// last-wave split at 6144x4096, M = 1024 (session 9). In the last wave's clusters the two
// halves cross once, 64 KB each way, and the split pays (session 11).
// INT4OPS_GEMM_SPLIT_K=0, INT4OPS_GEMM_STREAM_K=0|1 and INT4OPS_GEMM_PAIRS=0 (read in api.cu)
// turn splitting off, force stream-K off or on (wherever the last wave is not full) and turn the
// clusters off; tile_tokens forces the tile.
constexpr int kMinSplitStages = 8, kMaxSplits = 8, kMinStreamKIdle = 32;

GemmPlan gemm_sm90_plan(int M, int N, int K_rows, int tile_tokens, bool split_k, int stream_k, bool pairs,
                        int sm_count) {
  GemmPlan p;
  const int ch_tiles = (N + kBN - 1) / kBN;
  const long tiles256 = (long)((M + 255) / 256) * ch_tiles;
  p.tile_tokens = tile_tokens ? tile_tokens : (M <= 128 || 2 * tiles256 <= sm_count ? 128 : 256);
  const int token_tiles = (M + p.tile_tokens - 1) / p.tile_tokens;
  const long tiles = (long)token_tiles * ch_tiles;
  const int stages = (K_rows + kWRows - 1) / kWRows;
  if (tiles >= sm_count) {
    const long rem = tiles % sm_count;
    // Stages each SM would sit idle in the last wave, on average.
    const long idle = rem > 0 ? (sm_count - rem) * stages / sm_count : 0;
    const bool sk = stream_k == 1 || (stream_k < 0 && token_tiles == 1 && idle >= kMinStreamKIdle);
    if (rem > 0 && sk && tiles * stages < INT_MAX / 2) {
      // Stream-K over the last wave and one full wave before it (BlockWork).
      p.sk_blocks = sm_count;  // the shared tiles are >= sm_count and < 2 * sm_count
      p.sk_tile0 = (int)(tiles - sm_count - rem);
      p.splits = 2;
      p.partials_bytes = (size_t)(sm_count + 1) * 2 * p.tile_tokens * kBN * sizeof(float);
      p.workspace_bytes = p.partials_bytes + (size_t)(sm_count + 1) * sizeof(int);
      return p;
    }
    if (p.tile_tokens == 256 && rem > 0 && 2 * rem <= sm_count) {
      const int c1 = (int)((tiles - rem) / token_tiles);  // channel tiles of the full waves
      const int c2 = ch_tiles - c1;
      if (c1 > 0 && c2 > 0) {
        if (pairs && 2L * c2 * token_tiles <= sm_count && stages >= 2 * kMinSplitStages)
          p.ch_tiles1 = c1, p.tail_pairs = true, p.split_stages = (stages + 1) / 2;
        else if ((long)c2 * ((M + 127) / 128) <= sm_count)
          p.ch_tiles1 = c1;
      }
    }
    return p;
  }
  const int splits = split_k ? (int)std::min<long>(std::min(kMaxSplits, stages / kMinSplitStages), sm_count / tiles) : 1;
  if (splits < 2) return p;
  p.split_stages = (stages + splits - 1) / splits;
  p.splits = (stages + p.split_stages - 1) / p.split_stages;  // no empty part
  p.partials_bytes = (size_t)tiles * p.splits * p.tile_tokens * kBN * sizeof(float);
  p.workspace_bytes = p.partials_bytes + (size_t)tiles * sizeof(int);
  return p;
}

cudaError_t gemm_sm90_launch(const GemmPlan& plan, const void* x, const void* qweight, const void* scales,
                             const void* zeros, void* out, void* workspace, int M, int N, int K, int K_rows,
                             int group_size, int act_dtype, int scale_dtype, cudaStream_t stream) {
  GemmArgs a;
  a.x = x;
  a.qweight = static_cast<const uint32_t*>(qweight);
  a.scales = scales;
  a.zeros = static_cast<const uint8_t*>(zeros);
  a.out = out;
  a.M = M;
  a.N = N;
  a.ld = N;
  a.K = K;
  a.K_rows = K_rows;
  a.group_size = group_size;
  a.groups = (K_rows * 8 + group_size - 1) / group_size;
  a.scale_dtype = scale_dtype;
  a.scale_bytes = dtype_bytes(scale_dtype);
  // Blocks that run together should share the operand that does not fit in L2 (launch()).
  a.channels_fastest = 4LL * M > N;
  auto run = act_dtype == INT4OPS_F16 ? launch_tiles<__half> : launch_tiles<__nv_bfloat16>;
  LaunchOptions o;
  o.tile_tokens = plan.tile_tokens;
  o.persistent_blocks = plan.persistent_blocks;
  if (plan.ch_tiles1) {
    const int n1 = plan.ch_tiles1 * kBN;
    GemmArgs tail = channel_slice(a, n1, N - n1);
    const long tail_tiles = (long)((N - n1 + kBN - 1) / kBN) * ((M + 255) / 256);
    const int max_pairs = !plan.tail_pairs              ? 0
                          : act_dtype == INT4OPS_F16 ? pair_clusters<__half>()
                                                     : pair_clusters<__nv_bfloat16>();
    LaunchOptions first = o, second = o;
    second.pair = tail_tiles <= max_pairs;
    if (second.pair) {
      tail.splits = 2;
      tail.split_stages = plan.split_stages;
    }
    first.tile_tokens = 256;
    first.next_early = second.early = plan.pdl;
    second.tile_tokens = second.pair ? 256 : 128;
    cudaError_t err = run(channel_slice(a, 0, n1), first, stream);
    if (err != cudaSuccess) return err;
    return run(tail, second, stream);
  }
  if (plan.splits > 1) {
    if (plan.sk_blocks) {
      a.sk_tile0 = plan.sk_tile0;  // the kernel's own split count stays 1: hand_over, not reduce_parts
    } else {
      a.splits = plan.splits;
      a.split_stages = plan.split_stages;
    }
    a.partials = static_cast<float*>(workspace);
    a.tickets = reinterpret_cast<int*>(static_cast<char*>(workspace) + plan.partials_bytes);
    cudaError_t err = cudaMemsetAsync(a.tickets, 0, plan.workspace_bytes - plan.partials_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  o.sk_blocks = plan.sk_blocks;
  o.pdl = plan.pdl;
  return run(a, o, stream);
}

}  // namespace int4ops
