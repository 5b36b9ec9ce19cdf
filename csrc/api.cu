// Library-level C functions: last-error message, build info, device probe.
#include <stdarg.h>
#include <stdio.h>

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

const void* gemv_probe_kernel();  // w4a16_gemv.cu

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
