// atlas/common.h: error values, dtypes and small numeric helpers shared by the
// native core. No torch, no pybind11, no CUDA headers here.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

namespace atlas {

// Every fallible native call returns a Status. The binding layer turns
// kInvalidArgument into ValueError, kCacheFull into atlas.CacheFullError and
// kInternal into RuntimeError. An ok Status carries no message and so costs no
// allocation on the hot path.
enum class Code : int32_t {
  kOk = 0,
  kInvalidArgument = 1,
  kCacheFull = 2,
  kInternal = 3,
  kUnsupported = 4,
};

struct Status {
  Code code = Code::kOk;
  std::string message;

  static Status Ok() { return {}; }
  static Status Invalid(std::string msg) { return {Code::kInvalidArgument, std::move(msg)}; }
  static Status CacheFull(std::string msg) { return {Code::kCacheFull, std::move(msg)}; }
  static Status Internal(std::string msg) { return {Code::kInternal, std::move(msg)}; }
  static Status Unsupported(std::string msg) { return {Code::kUnsupported, std::move(msg)}; }
  bool ok() const { return code == Code::kOk; }
};

// Propagate a non-ok Status to the caller.
#define ATLAS_RETURN_IF_ERROR(expr)            \
  do {                                         \
    ::atlas::Status _atlas_st = (expr);        \
    if (!_atlas_st.ok()) return _atlas_st;     \
  } while (0)

// Element types of logits and KV storage.
enum class DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
};

inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
inline const char* dtype_name(DType t) { return t == DType::kFloat32 ? "float32" : "bfloat16"; }

// bfloat16 is the upper half of an IEEE float32; widening is exact.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, as torch does when it casts float32 to bfloat16.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN stays NaN
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

}  // namespace atlas
