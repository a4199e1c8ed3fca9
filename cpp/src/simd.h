// atlas/simd.h (internal to cpp/src): the generic vectors the CPU kernels are
// written with.
//
// The kernels (attention.cpp, head.cpp, linear.cpp, verify.cpp) use GCC/Clang
// vector extensions rather than intrinsics, so that one template serves every
// width: each is compiled for W = 4 float lanes (the portable build, SSE4.2 on
// x86-64), 8 (functions compiled for AVX2) and, where it pays, 16 (AVX-512F),
// and the widest the CPU has runs. Why not plain loops: GCC's vectoriser picks
// the wrong loop of a GEMM (see head.cpp), and the exact-bits kernels fix
// their order of additions lane by lane (see verify.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace atlas {
namespace simd {

// The vectors of W lanes: floats F, int32 I and uint32 U (the bit patterns of
// F), and the W uint16 H of a row of bfloat16 values (widened to F by a shift).
template <int W>
struct Vec {
  static_assert(W == 4 || W == 8 || W == 16, "the kernels use vectors of 4, 8 or 16 lanes");
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  typedef uint16_t H __attribute__((vector_size(2 * W)));
};

// The uint32 vector with as many lanes as the float vector V.
template <typename V>
using UintsOf = typename Vec<static_cast<int>(sizeof(V) / sizeof(float))>::U;

// Unaligned<V>::type: V in memory at any address its lanes may sit at, and
// allowed to alias other types. A load or store through a pointer to it is a
// single unaligned vector access; a memcpy into a local vector can compile to
// pieces that stall store forwarding (7x slower on one row of the draft head,
// measured; see head.cpp).
template <typename V>
struct Unaligned {
  static constexpr size_t kLane = sizeof(V{}[0]);
  typedef V type __attribute__((aligned(kLane), may_alias));
};

}  // namespace simd
}  // namespace atlas
