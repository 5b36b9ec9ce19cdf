// int4ops CUDA library: a plain C ABI over the packed INT4 format of int4ops/format.py.
//
// No torch, no Python: every function takes raw device pointers, sizes, dtype codes and a
// cudaStream_t passed as void*. Python loads it with ctypes (int4ops/kernels/cuda.py).
// Functions return 0 on success, otherwise a nonzero code; int4ops_cuda_last_error() then
// returns a message for this thread naming the kernel, the shapes and the CUDA error.
//
// Layout reminder (see int4ops/format.py): qweight int32 [K_pad/8, N], 8 codes along K per
// word, lowest nibble = lowest k; scales [G, N]; zeros uint8 [G, N] or NULL (symmetric: 8);
// W[n, k] = (q - z[g, n]) * s[g, n] with g = k / group_size (group_size = K_pad per channel).
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INT4OPS_API __attribute__((visibility("default")))

// dtype codes shared with Python
enum { INT4OPS_F16 = 0, INT4OPS_BF16 = 1, INT4OPS_F32 = 2 };
// error codes that are not CUDA errors (CUDA errors are returned as their cudaError_t value)
enum { INT4OPS_ERR_ARGS = -1 };

// Largest M the decode (GEMV) kernel is instantiated for.
#define INT4OPS_GEMV_MAX_M 8

// Plan a decode call: returns the split-K count for this shape and sm_count SMs, and writes
// the fp32 workspace it needs (in bytes, 0 when splits == 1) to *workspace_bytes. Host only.
INT4OPS_API int int4ops_w4a16_gemv_plan(int M, int N, int K_rows, int sm_count, size_t* workspace_bytes);

// out[M, N] = x[M, K] @ W^T for 1 <= M <= INT4OPS_GEMV_MAX_M.
//   x       [M, K] act_dtype (fp16/bf16), row stride K
//   qweight [K_rows, N] int32 (K_rows = K_pad / 8), scales/zeros [G, N], row stride N
//   out     [M, N] act_dtype, row stride N
//   splits  from int4ops_w4a16_gemv_plan (or any 1 <= splits); workspace >= splits*M*N fp32
//           when splits > 1 (NULL otherwise)
//   group_size: the effective group size (K_pad for per-channel), a multiple of 32 or K_pad
INT4OPS_API int int4ops_w4a16_gemv(const void* x, const void* qweight, const void* scales, const void* zeros,
                                   void* out, void* workspace, int M, int N, int K, int K_rows, int group_size,
                                   int act_dtype, int scale_dtype, int splits, int device, void* stream);

// Largest M the tensor-core decode kernel takes.
#define INT4OPS_MMA_MAX_M 16

// Tensor-core decode (csrc/w4a16_mma.cu): same contract as int4ops_w4a16_gemv_plan /
// int4ops_w4a16_gemv, for 1 <= M <= INT4OPS_MMA_MAX_M. Needs sm_80 or newer. At M <= 8 with
// N % 8 == 0, K % 8 == 0, 16-byte aligned x/qweight/scales and fp16/bf16 scales it runs the
// streaming kernel (csrc/w4a16_mma_stream.cu), whose split-K reduce is launched with
// programmatic dependent launch on sm_90+ unless the environment sets INT4OPS_PDL=0.
INT4OPS_API int int4ops_w4a16_mma_plan(int M, int N, int K_rows, int sm_count, size_t* workspace_bytes);
INT4OPS_API int int4ops_w4a16_mma(const void* x, const void* qweight, const void* scales, const void* zeros,
                                  void* out, void* workspace, int M, int N, int K, int K_rows, int group_size,
                                  int act_dtype, int scale_dtype, int splits, int device, void* stream);

// Fused large-M GEMM on sm_90 (csrc/w4a16_gemm_sm90.cu): out[M, N] = x[M, K] @ W^T for any
// M >= 1 with wgmma tensor cores, fp32 accumulation, W rounded to the activation dtype once (as
// dequantize + cuBLAS would). Needs a library built with sm_90a code (any build whose arch list
// has 90), an sm_90 GPU, N % 8 == 0 (N % 16 == 0 with zero points), K % 8 == 0, 16-byte aligned
// x, qweight, scales, zeros, workspace and out; otherwise it returns INT4OPS_ERR_ARGS with a
// message saying which.
// int4ops_w4a16_gemm_sm90_plan: how many parts K is split into for this shape on a GPU with
// sm_count SMs (>= 1; an error code < 1 otherwise), and the workspace that needs (0: none):
// scratch memory for the parts' fp32 sums and per-tile counters, which the call zeroes itself,
// used until the call's kernels finish on its stream (2 parts: a stream-K launch, where a tile
// cut by a block edge has two). INT4OPS_GEMM_SPLIT_K=0 in the environment turns splitting off,
// INT4OPS_GEMM_STREAM_K=0|1 forces stream-K off or on wherever the last wave is not full,
// INT4OPS_GEMM_PAIRS=0 runs a half-empty last wave as 128-token tiles instead of clusters of two
// K parts, and INT4OPS_GEMM_TILE_TOKENS=128|256 forces a tile (all read by plan and call); the
// call alone reads INT4OPS_GEMM_PERSISTENT=0 (one block per tile instead of persistent grids) and
// INT4OPS_PDL=0 (a call's second launch starts after its first, not as its blocks leave).
// int4ops_w4a16_gemm_sm90_supported(device): 1 if this library and that GPU can run it, else 0
// (and int4ops_cuda_last_error says why).
INT4OPS_API int int4ops_w4a16_gemm_sm90_plan(int M, int N, int K_rows, int sm_count, size_t* workspace_bytes);
INT4OPS_API int int4ops_w4a16_gemm_sm90(const void* x, const void* qweight, const void* scales, const void* zeros,
                                        void* out, void* workspace, size_t workspace_bytes, int M, int N, int K,
                                        int K_rows, int group_size, int act_dtype, int scale_dtype, int device,
                                        void* stream);
INT4OPS_API int int4ops_w4a16_gemm_sm90_supported(int device);

// Dense dequantized weight, transposed: out[K, N] (row stride N) = W^T in out_dtype (fp16/bf16/fp32).
// Reads columns [0, N) of a packed weight whose rows are ld columns apart (ld >= N), so a
// caller can dequantize a column slice by offsetting the pointers.
INT4OPS_API int int4ops_dequantize(const void* qweight, const void* scales, const void* zeros, void* out, int N,
                                   int ld, int K, int K_rows, int group_size, int out_dtype, int scale_dtype,
                                   int device, void* stream);

// The message of the last failure on this thread ("" if none).
INT4OPS_API const char* int4ops_cuda_last_error(void);
// Comma-separated CMAKE_CUDA_ARCHITECTURES the library was built with, e.g. "80-real,86-real,89-real,90".
INT4OPS_API const char* int4ops_cuda_archs(void);
// CUDA runtime version the library was built against (e.g. 13000) and the driver's (0 if none).
INT4OPS_API int int4ops_cuda_versions(int* runtime_version, int* driver_version);
// 0 if the kernels can run on `device`; otherwise an error code and a message
// (no device, driver too old, no kernel image for this GPU's arch...). Does not sync.
INT4OPS_API int int4ops_cuda_probe(int device);

#ifdef __cplusplus
}
#endif
