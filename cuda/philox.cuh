// cuda/philox.cuh: Philox-4x32-10 (Salmon et al., SC'11), the counter-based
// generator of verify.h, written so that host and device compute the same bits.
#pragma once

#include <cstdint>

namespace atlas {
namespace cuda {

// The multipliers and Weyl increments of the published Philox-4x32 rounds.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// The bonus draw at a node uses this attempt index, far above any child count.
constexpr uint32_t kBonusAttempt = 0x80000000u;

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds; the key is bumped between rounds. Returns the first output word.
__host__ __device__ __forceinline__ uint32_t philox4x32_10_first(uint32_t c0, uint32_t c1, uint32_t c2,
                                                                uint32_t c3, uint32_t k0, uint32_t k1) {
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
  return c0;
}

// verify.h's uniform: key = seed, counter = {offset low, offset high, node,
// attempt}; the top 24 bits of the first word, scaled to [0, 1) exactly.
__host__ __device__ __forceinline__ float philox_uniform01(uint64_t seed, uint64_t offset, uint32_t node,
                                                           uint32_t attempt) {
  const uint32_t w = philox4x32_10_first(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                         node, attempt, static_cast<uint32_t>(seed),
                                         static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(w >> 8) * (1.0f / 16777216.0f);
}

}  // namespace cuda
}  // namespace atlas
