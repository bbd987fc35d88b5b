// Function multi-versioning: one build (one wheel) runs on any x86-64 CPU and uses AVX-512 or
// AVX2 where the CPU has them. The build targets baseline x86-64 (SSE2, no -march), which has
// no 32-bit vector multiply and 4-lane vectors: there the noise path is 3.9× slower than with
// AVX-512 (13.1 vs 3.4 ns per Philox group on a Zen 4 core, noise.cpp).
//
//  * FASTDDPM_CLONES on a hot loop function: GCC compiles it three times (x86-64-v4:
//    AVX-512F/BW/CD/DQ/VL; x86-64-v3: AVX2/FMA; baseline) and picks one at load time (ifunc).
//    The helpers it calls (vmath.h, philox.h, dtype.h: FASTDDPM_INLINE) inline into each clone.
//  * noise.cpp's `#pragma GCC target` sections (noise_simd.inc on vector types and intrinsics)
//    for the same two levels, picked at run time by `cpu_level()`.
//
// -ffp-contract=off (setup.py) holds in every clone: v3/v4 have FMA instructions, but no
// a·b + c is contracted into one, so every clone rounds as the reference does, op by op.
// Elsewhere (other compilers, other architectures, no ifunc) the macros are empty and the
// code is the portable one.
#pragma once

#include <cstdint>  // defines __GLIBC__ where glibc is the C library

// GCC 12 (the compiler this was verified with: clones inline the helpers, levels accepted by
// target_clones and __builtin_cpu_supports) on x86-64 Linux with glibc (ifunc).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && \
    defined(__GLIBC__)
#define FASTDDPM_X86_MULTIVERSION 1
#define FASTDDPM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDDPM_X86_MULTIVERSION 0
#define FASTDDPM_CLONES
#endif

// Forces inlining, so a helper is compiled for the level of each function that calls it.
#if defined(__GNUC__)
#define FASTDDPM_INLINE inline __attribute__((always_inline))
#else
#define FASTDDPM_INLINE inline
#endif

namespace fastddpm {

enum CpuLevel : int { kBaseline = 0, kX86V3 = 3, kX86V4 = 4 };

// The highest level this CPU (and OS: the AVX state is saved) supports; the same test the
// clones' ifunc resolvers make.
inline CpuLevel cpu_level() {
#if FASTDDPM_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kX86V4;
  if (__builtin_cpu_supports("x86-64-v3")) return kX86V3;
#endif
  return kBaseline;
}

}  // namespace fastddpm
