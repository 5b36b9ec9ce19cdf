// Library-level C functions: last-error message, build info, device probe.
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.cuh"

#ifndef INT4OPS_ARCHS
#define INT4OPS_ARCHS "unknown"
#endif

namespace int4ops {

// One message per host thread, so concurrent callers do not overwrite each other's errors.
static thread_local char g_last_error[1024] = "";

int set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
  va_end(ap);
  return code;
}

int check_decode_args(char (&prefix)[256], const char* kernel, int max_m, const void* x, const void* qweight,
                      const void* scales, const void* out, const void* workspace, int M, int N, int K, int K_rows,
                      int group_size, int act_dtype, int scale_dtype, int splits) {
  snprintf(prefix, sizeof prefix, "%s failed for M=%d, N=%d, K=%d (group_size=%d, x %s, scales %s)", kernel, M, N, K,
           group_size, dtype_name(act_dtype), dtype_name(scale_dtype));
  if (M < 1 || M > max_m) return set_error(INT4OPS_ERR_ARGS, "%s: M must be 1..%d", prefix, max_m);
  if (N < 1 || K < 1 || K_rows * 8 < K || K_rows * 8 > K + 7 + (group_size > 0 ? group_size : 0))
    return set_error(INT4OPS_ERR_ARGS, "%s: bad sizes (K_rows=%d)", prefix, K_rows);
  if (group_size != K_rows * 8 && (group_size < 32 || group_size % 32 != 0))
    return set_error(INT4OPS_ERR_ARGS, "%s: group_size must be a multiple of 32 or K_pad", prefix);
  if (act_dtype != INT4OPS_F16 && act_dtype != INT4OPS_BF16)
    return set_error(INT4OPS_ERR_ARGS, "%s: activations must be fp16 or bf16", prefix);
  if (scale_dtype < INT4OPS_F16 || scale_dtype > INT4OPS_F32)
    return set_error(INT4OPS_ERR_ARGS, "%s: bad scale dtype code %d", prefix, scale_dtype);
  if (!x || !qweight || !scales || !out) return set_error(INT4OPS_ERR_ARGS, "%s: null pointer", prefix);
  if (splits < 1) return set_error(INT4OPS_ERR_ARGS, "%s: splits must be >= 1", prefix);
  if (splits > 1 && !workspace) return set_error(INT4OPS_ERR_ARGS, "%s: split-K needs a workspace", prefix);
  return 0;
}

const void* gemv_probe_kernel();  // w4a16_gemv.cu
#ifdef INT4OPS_HAS_SM90A
// w4a16_gemm_sm90.cu
GemmPlan gemm_sm90_plan(int M, int N, int K_rows, int tile_tokens, bool split_k, int stream_k, bool pairs,
                        int sm_count);
cudaError_t gemm_sm90_launch(const GemmPlan& plan, const void* x, const void* qweight, const void* scales,
                             const void* zeros, void* out, void* workspace, int M, int N, int K, int K_rows,
                             int group_size, int act_dtype, int scale_dtype, cudaStream_t stream);
#endif

}  // namespace int4ops

using namespace int4ops;

extern "C" const char* int4ops_cuda_last_error(void) { return g_last_error; }

extern "C" const char* int4ops_cuda_archs(void) { return INT4OPS_ARCHS; }

extern "C" int int4ops_cuda_versions(int* runtime_version, int* driver_version) {
  if (runtime_version) *runtime_version = CUDART_VERSION;  // static cudart: the build's version
  int drv = 0;
  cudaError_t err = cudaDriverGetVersion(&drv);  // 0 when no driver is installed
  if (driver_version) *driver_version = drv;
  if (err != cudaSuccess) return set_error(err, "cudaDriverGetVersion: %s", cudaGetErrorString(err));
  return 0;
}

extern "C" int int4ops_cuda_probe(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return set_error(err, "cudaGetDeviceCount: %s", cudaGetErrorString(err));
  if (device < 0 || device >= count) return set_error(INT4OPS_ERR_ARGS, "device %d out of range (%d devices)", device, count);
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return set_error(guard.err, "cudaSetDevice(%d): %s", device, cudaGetErrorString(guard.err));
  // Asking for a kernel's attributes loads the library's module for this GPU: it fails with
  // cudaErrorNoKernelImageForDevice when no compiled arch (or PTX) fits.
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, gemv_probe_kernel());
  if (err != cudaSuccess) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return set_error(err, "kernels cannot run on device %d (sm_%d%d; library built for %s): %s", device, major, minor,
                     INT4OPS_ARCHS, cudaGetErrorString(err));
  }
  return 0;
}

// Whether the sm_90 GEMM can run on `device`: 0 and a message if not.
static int gemm_sm90_check_device(const char* prefix, int device) {
#ifndef INT4OPS_HAS_SM90A
  (void)device;
  return set_error(INT4OPS_ERR_ARGS, "%s: the library was built without sm_90a code (archs %s)", prefix, INT4OPS_ARCHS);
#else
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) return set_error(err, "%s: device %d: %s", prefix, device, cudaGetErrorString(err));
  if (major != 9 || minor != 0)
    return set_error(INT4OPS_ERR_ARGS, "%s: needs an sm_90 GPU (H100/H200), device %d is sm_%d%d", prefix, device, major,
                     minor);
  return 0;
#endif
}

extern "C" int int4ops_w4a16_gemm_sm90_supported(int device) {
  return gemm_sm90_check_device("w4a16_gemm_sm90", device) == 0 ? 1 : 0;
}

#ifdef INT4OPS_HAS_SM90A
// The GEMM's plan for this shape; the environment can force a tile (INT4OPS_GEMM_TILE_TOKENS=128|256),
// turn K splitting off (INT4OPS_GEMM_SPLIT_K=0) or force stream-K off or on where it applies
// (INT4OPS_GEMM_STREAM_K=0|1), run a last wave as 128-token tiles instead of clusters of two K
// parts (INT4OPS_GEMM_PAIRS=0), start a second launch only after the first (INT4OPS_PDL=0), or run
// every tile as its own block instead of persistent grids (INT4OPS_GEMM_PERSISTENT=0), for tests
// and benchmarks.
static GemmPlan gemm_sm90_plan_env(int M, int N, int K_rows, int sm_count) {
  int tile_tokens = 0;
  const char* env = getenv("INT4OPS_GEMM_TILE_TOKENS");
  if (env && *env) tile_tokens = atoi(env) == 256 ? 256 : 128;
  const char* split = getenv("INT4OPS_GEMM_SPLIT_K");
  const char* sk = getenv("INT4OPS_GEMM_STREAM_K");
  const int stream_k = sk && *sk ? (sk[0] == '0' ? 0 : 1) : -1;
  const char* pairs = getenv("INT4OPS_GEMM_PAIRS");
  GemmPlan plan = gemm_sm90_plan(M, N, K_rows, tile_tokens, !(split && split[0] == '0'), stream_k,
                                 !(pairs && pairs[0] == '0'), sm_count);
  plan.pdl = pdl_env_allows();
  const char* persistent = getenv("INT4OPS_GEMM_PERSISTENT");
  plan.persistent_blocks = persistent && persistent[0] == '0' ? 0 : sm_count;
  return plan;
}
#endif

extern "C" int int4ops_w4a16_gemm_sm90_plan(int M, int N, int K_rows, int sm_count, size_t* workspace_bytes) {
  if (workspace_bytes) *workspace_bytes = 0;
  if (M < 1 || N < 1 || K_rows < 1 || sm_count < 1)
    return set_error(INT4OPS_ERR_ARGS, "w4a16_gemm_sm90_plan: bad shape M=%d N=%d K_rows=%d sm_count=%d", M, N, K_rows,
                     sm_count);
#ifdef INT4OPS_HAS_SM90A
  const GemmPlan plan = gemm_sm90_plan_env(M, N, K_rows, sm_count);
  if (workspace_bytes) *workspace_bytes = plan.workspace_bytes;
  return plan.splits;
#else
  return gemm_sm90_check_device("w4a16_gemm_sm90_plan", 0);
#endif
}

extern "C" int int4ops_w4a16_gemm_sm90(const void* x, const void* qweight, const void* scales, const void* zeros,
                                       void* out, void* workspace, size_t workspace_bytes, int M, int N, int K,
                                       int K_rows, int group_size, int act_dtype, int scale_dtype, int device,
                                       void* stream) {
  char prefix[256];
  if (int rc = check_decode_args(prefix, "w4a16_gemm_sm90", INT_MAX, x, qweight, scales, out, nullptr, M, N, K, K_rows,
                                 group_size, act_dtype, scale_dtype, 1))
    return rc;
  // The copies (out too) are TMA tensor copies: 16-byte aligned bases and row strides.
  if (N % 8 != 0 || K % 8 != 0 || (zeros && N % 16 != 0))
    return set_error(INT4OPS_ERR_ARGS, "%s: needs N %% 8 == 0 (N %% 16 == 0 with zero points) and K %% 8 == 0", prefix);
  if (!aligned16(x) || !aligned16(qweight) || !aligned16(scales) || (zeros && !aligned16(zeros)) ||
      !aligned16(workspace) || !aligned16(out))
    return set_error(INT4OPS_ERR_ARGS, "%s: needs 16-byte aligned x, qweight, scales, zeros, workspace and out", prefix);
  if (int rc = gemm_sm90_check_device(prefix, device)) return rc;
#ifdef INT4OPS_HAS_SM90A
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess)
    return set_error(guard.err, "%s: cudaSetDevice(%d): %s", prefix, device, cudaGetErrorString(guard.err));
  int sm_count = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return set_error(err, "%s: %s", prefix, cudaGetErrorString(err));
  const GemmPlan plan = gemm_sm90_plan_env(M, N, K_rows, sm_count);
  if (plan.workspace_bytes > 0 && (!workspace || workspace_bytes < plan.workspace_bytes))
    return set_error(INT4OPS_ERR_ARGS, "%s: needs a workspace of %zu bytes (int4ops_w4a16_gemm_sm90_plan), got %zu",
                     prefix, plan.workspace_bytes, workspace ? workspace_bytes : (size_t)0);
  err = gemm_sm90_launch(plan, x, qweight, scales, zeros, out, workspace, M, N, K, K_rows, group_size, act_dtype,
                         scale_dtype, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return set_error(err, "%s: %s", prefix, cudaGetErrorString(err));
#endif
  return 0;
}
