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

struct Features {
  bool avx2_fma = false;     // AVX2 with fused multiply-add
  bool avx512f = false;
  bool avx512_bf16 = false;  // AVX-512 bfloat16 dot products (vdpbf16ps) on 256-bit
                             // vectors too (AVX-512 VL, which every such CPU has)
  bool amx_bf16 = false;     // AMX tiles with bfloat16 (whether the kernel lets a
                             // process use them is the library's to ask: oneDNN does)
};

inline const Features& features() {
  static const Features f = [] {
    Features d;
#if ATLAS_X86_TARGETS
    d.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    d.avx512f = __builtin_cpu_supports("avx512f");
    d.avx512_bf16 = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
    d.amx_bf16 = __builtin_cpu_supports("amx-bf16");
#endif
    return d;
  }();
  return f;
}

inline bool has_avx2_fma() { return features().avx2_fma; }
inline bool has_avx512f() { return features().avx512f; }
inline bool has_avx512_bf16() { return features().avx512_bf16; }

}  // namespace atlas::cpu
