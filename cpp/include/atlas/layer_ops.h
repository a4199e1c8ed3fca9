// atlas/layer_ops.h: the small per-layer operations of the target's forward
// of a few float32 rows on the CPU (a decode step or a draft tree): RMSNorm,
// and rotary embedding of q and k with the new keys and values stored in the
// paged cache.
//
// Why: run as chains of torch element-wise operations they cost more in
// dispatch than in arithmetic. Measured on the 2-core development machine,
// SmolLM2-135M (576-wide rows, 30 layers), 1 to 16 rows: a norm about 45
// microseconds as five torch operations (61 a forward: 2.8 to 4.0 ms of a 31
// to 51 ms forward), the rotary embedding and the two index_copy_ calls of
// the cache about 45 microseconds a layer.
//
// Numerics, each step rounded to float32 in the order written (the source is
// compiled without fused multiply-adds), so that the rotary embedding gives
// the bits of the torch expression it replaces:
//   rms_norm:   y[r, j] = weight[j] * (x[r, j] * s_r), s_r = 1 / sqrt(m_r + eps),
//               m_r = the mean of the row's squares, summed in double (eight
//               partial sums of the columns j = l mod 8 up to the last multiple
//               of 8, added as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)), then
//               the remaining columns in order) and rounded once to float32
//               (torch sums in float32 in an order of its own: the two can
//               differ in the last bit);
//   rope_store: out[t, h, j] = v[j] * cos[t, j] + v[j ^ half] * sin[t, j] for
//               v = the head's D values (j ^ half: the other half's element at
//               the same offset, i.e. rotate-half with the sign folded into
//               sin's first half), keys stored rotated and values as given.
// A row's result depends on nothing but the row.
#pragma once

#include <cstdint>

#include "atlas/common.h"

namespace atlas {

// y[r, :] = rmsnorm(x[r, :]) * weight for r < rows; rows `ldx` and `ldy`
// floats apart (>= n); y may be x (in place) but must not overlap it otherwise.
Status rms_norm(const float* x, int64_t rows, int64_t ldx, int64_t n, const float* weight, float eps, float* y,
                int64_t ldy);

struct RopeStoreProblem {
  // [total, num_q_heads + 2 * num_kv_heads, head_dim] rows `ld_qkv` floats
  // apart, heads contiguous: the q heads, then the k heads, then the v heads.
  const float* qkv = nullptr;
  int64_t total = 0, ld_qkv = 0;
  int32_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0;  // head_dim even
  const float* cos = nullptr;  // [total, head_dim], contiguous: the tables at each row's position
  const float* sin = nullptr;  // [total, head_dim], rotate-half sign folded in
  float* q_out = nullptr;      // [total, num_q_heads, head_dim], contiguous: the rotated q
  // One layer's keys and values, [capacity, num_kv_heads, head_dim] each,
  // indexed by slot; row t goes to slots[t], each in [0, capacity).
  float* keys = nullptr;
  float* values = nullptr;
  const int64_t* slots = nullptr;
  int64_t capacity = 0;
};

Status rope_store(const RopeStoreProblem& p);

}  // namespace atlas
