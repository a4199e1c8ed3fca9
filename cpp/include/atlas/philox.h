// atlas/philox.h: the constants of the Philox-4x32-10 generator (Salmon et
// al., SC'11, as in Random123) and the counter streams of verify.h, shared by
// the CPU verifier and its CUDA twin so that both draw the same bits.
#pragma once

#include <cstdint>

namespace atlas {
namespace philox {

// The multipliers and Weyl key increments of the published generator.
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

// The streams of verify.h: the third counter word, so that the uniforms of one
// position never repeat across the three uses.
constexpr uint32_t kStreamOneHot = 0;      // the draw at a node of a one-hot tree (and the plain sampler)
constexpr uint32_t kStreamDraft = 1;       // attempt j at a node with draft_probs
constexpr uint32_t kStreamDraftBonus = 2;  // the bonus draw at a node with draft_probs

}  // namespace philox
}  // namespace atlas
