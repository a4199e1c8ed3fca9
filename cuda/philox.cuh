// cuda/philox.cuh: Philox-4x32-10 (Salmon et al., SC'11), the counter-based
// generator of verify.h, written so that host and device compute the same bits.
#pragma once

#include <cstdint>

#include "atlas/philox.h"

namespace atlas {
namespace cuda {

// Constants and streams: atlas/philox.h, shared with the CPU verifier.
constexpr uint32_t kPhiloxM0 = philox::kM0;
constexpr uint32_t kPhiloxM1 = philox::kM1;
constexpr uint32_t kPhiloxW0 = philox::kW0;
constexpr uint32_t kPhiloxW1 = philox::kW1;
using philox::kStreamDraft;
using philox::kStreamDraftBonus;
using philox::kStreamOneHot;

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds; the key is bumped between rounds. Writes the first two output
// words (the uniform needs no more).
__host__ __device__ __forceinline__ void philox4x32_10_two(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                           uint32_t k0, uint32_t k1, uint32_t* w0,
                                                           uint32_t* w1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  *w0 = c0;
  *w1 = c1;
}

// verify.h's uniform: key = seed, counter = {position low, position high,
// stream, j}; 53 bits of the first two words, scaled to [0, 1) exactly.
__host__ __device__ __forceinline__ double philox_uniform53(uint64_t seed, uint64_t position, uint32_t stream,
                                                            uint32_t j) {
  uint32_t w0, w1;
  philox4x32_10_two(static_cast<uint32_t>(position), static_cast<uint32_t>(position >> 32), stream, j,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), &w0, &w1);
  const uint64_t bits = (static_cast<uint64_t>(w0) << 21) | (w1 >> 11);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

}  // namespace cuda
}  // namespace atlas
