// atlas/cpu.h: run-time CPU feature checks.
//
// A kernel compiled for a wider instruction set (a GCC or Clang function
// target on x86-64) may run only on a CPU that has it; the wheel stays
// portable because nothing else is compiled for it. The bfloat16 checks are
// for Python (atlas._native.cpu_features): the trainer multiplies in
// bfloat16 only where the CPU has bfloat16 dot products. Each answer is
// computed once per process.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ATLAS_X86_TARGETS 1
#else
#define ATLAS_X86_TARGETS 0
#endif

namespace atlas::cpu {

// AVX2 with fused multiply-add.
inline bool has_avx2_fma() {
#if ATLAS_X86_TARGETS
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline bool has_avx512f() {
#if ATLAS_X86_TARGETS
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

// AVX-512 bfloat16 dot products (vdpbf16ps).
inline bool has_avx512_bf16() {
#if ATLAS_X86_TARGETS
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// AMX tiles with bfloat16 (whether the kernel lets a process use them is
// the library's to ask: oneDNN does before it runs AMX code).
inline bool has_amx_bf16() {
#if ATLAS_X86_TARGETS
  static const bool has = __builtin_cpu_supports("amx-bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace atlas::cpu
