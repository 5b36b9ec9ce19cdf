// m16n8k16 fragment helpers shared by the two tensor-core decode kernels (w4a16_mma.cu,
// w4a16_mma_stream.cu). The fragment mapping itself is explained at the top of w4a16_mma.cu.
#pragma once
#include <type_traits>

#include "common.cuh"

namespace int4ops {

template <typename P> __device__ __forceinline__ P as_pair(uint32_t v) { return *reinterpret_cast<P*>(&v); }
template <typename P> __device__ __forceinline__ uint32_t as_u32(P v) { return *reinterpret_cast<uint32_t*>(&v); }

// c += A (16 x 16, four 16-bit pair registers) * B (16 x 8, two pair registers), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// B fragments from the x pairs u = {x0,x1}, {x2,x3}, {x4,x5}, {x6,x7} of x[m, k .. k+7]:
// {x0,x4}, {x1,x5} (first MMA of a step) and {x2,x6}, {x3,x7} (second), the order in which
// the weight codes unpack.
__device__ __forceinline__ void permute_b(const uint32_t (&u)[4], uint32_t (&b)[4]) {
  b[0] = __byte_perm(u[0], u[2], 0x5410);  // {x0, x4}
  b[1] = __byte_perm(u[0], u[2], 0x7632);  // {x1, x5}
  b[2] = __byte_perm(u[1], u[3], 0x5410);  // {x2, x6}
  b[3] = __byte_perm(u[1], u[3], 0x7632);  // {x3, x7}
}

}  // namespace int4ops
