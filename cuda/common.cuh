// cuda/common.cuh: small device helpers shared by the kernels (element loads,
// deterministic block reductions, launch-error plumbing).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "atlas/common.h"

namespace atlas {
namespace cuda {

// bfloat16 travels as its raw 16 bits; widening is exact.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

// Round to nearest even, NaN kept: the same rule as float_to_bf16 in common.h.
__device__ __forceinline__ uint16_t float_to_bf16_rn(float f) {
  uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}
__device__ __forceinline__ void store_elem(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_elem(uint16_t* p, float v) { *p = float_to_bf16_rn(v); }

// The 16 bytes of a uint4 as floats: 4 float32 or 8 bfloat16.
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int kN = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float* out) {
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
  }
};
template <>
struct Vec16<uint16_t> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void unpack(const uint4& r, float* out) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// ---- warp and block reductions ------------------------------------------------------
// Butterfly (xor) shuffles: every lane ends with the same value, and the order
// of the operations depends only on the lane layout, so sums are reproducible
// run to run.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; `scratch` holds one float per warp. Every thread gets the
// result. Must be reached by all threads of the block.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// (value, index) maximum; ties go to the lower index, as torch.argmax.
__device__ __forceinline__ void argmax_merge(float& v, int64_t& i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}
__device__ __forceinline__ void warp_argmax(float& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    argmax_merge(v, i, ov, oi);
  }
}
__device__ __forceinline__ void block_argmax(float& v, int64_t& i, float* fscratch, int64_t* iscratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_argmax(v, i);
  __syncthreads();
  if (lane == 0) {
    fscratch[warp] = v;
    iscratch[warp] = i;
  }
  __syncthreads();
  v = lane < nwarps ? fscratch[lane] : -INFINITY;
  i = lane < nwarps ? iscratch[lane] : INT64_MAX;
  warp_argmax(v, i);
}

__device__ __forceinline__ int64_t warp_min_i64(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    int64_t ov = __shfl_xor_sync(0xffffffffu, v, o);
    v = ov < v ? ov : v;
  }
  return v;
}
__device__ __forceinline__ int64_t block_min_i64(int64_t v, int64_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_min_i64(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < nwarps ? scratch[lane] : INT64_MAX;
  return warp_min_i64(v);
}
__device__ __forceinline__ int64_t block_max_i64(int64_t v, int64_t* scratch) {
  return -block_min_i64(-v, scratch);
}

// Exclusive prefix sum over the block in thread order; *total gets the sum.
// Reproducible: the association order depends only on the block shape. The
// exclusive prefix is formed from the inclusive sums of the lanes and warps
// before (never as inclusive - v, which would not be exact for floats).
// scratch: 33 entries.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  T incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    T n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl = incl + n;
  }
  T excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = T(0);
  __syncthreads();  // scratch may still be read by a previous scan
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T wincl = lane < nwarps ? scratch[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      T n = __shfl_up_sync(0xffffffffu, wincl, o);
      if (lane >= o) wincl = wincl + n;
    }
    T wexcl = __shfl_up_sync(0xffffffffu, wincl, 1);
    if (lane == 0) wexcl = T(0);
    __syncwarp();
    if (lane < nwarps) scratch[lane] = wexcl;
    if (lane == nwarps - 1) scratch[32] = wincl;
  }
  __syncthreads();
  *total = scratch[32];
  return scratch[warp] + excl;
}

// ---- host side ------------------------------------------------------------------------

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return Status::Internal(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                          ")");
}

// Launch errors (bad configuration) are reported at once; errors of the
// kernel's execution surface at the next synchronising call.
inline Status launch_status(const char* kernel) { return cuda_status(cudaGetLastError(), kernel); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace atlas
