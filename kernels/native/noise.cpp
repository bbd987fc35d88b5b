// normal_groups: the contract's normals (philox.h) for a run of Philox groups of one sample,
// vectorized for the CPU it runs on. Blocks of kBlock groups go through two branch-free passes
// in L1: Philox's words (integer multiplies), then Box–Muller (float, vmath.h).
//
// Measured on one Zen 4 core (2026-11-24), ns per group (4 normals), Philox + Box–Muller:
//   AVX-512 (x86-64-v4)   1.16 + 1.19 = 2.4   (2.97 with 32-bit Philox lanes, Cephes' logf, float θ)
//   AVX2    (x86-64-v3)                 3.5
// The portable version is philox.h's scalar definition in `omp simd` loops. Its Philox needs
// the high and low words of 32 × 32 → 64-bit products, which GCC 12 vectorizes as 64-bit lanes
// (2.50 ns at AVX-512, 4.54 at AVX2), and its Box–Muller's table lookups become scalar loads; so
// x86 CPUs with AVX2 or AVX-512 run noise_simd.inc instead: vpmuludq on 64-bit lanes, vpermps
// for the table. Every version computes the same float operations in the same order (no FMA
// contraction), so the normals are bit-identical on every CPU (tests/test_native.py caps the
// level with FASTDDPM_CPU_LEVEL and compares).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "checks.h"
#include "launch.h"
#include "ops.h"
#include "philox.h"
#include "simd.h"

#if FASTDDPM_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace fastddpm {
namespace {

constexpr int64_t kBlock = 256;  // groups per pass: 4 KiB of words, in L1 with their normals
constexpr int kVectors = 4;      // independent Philox vectors in flight (noise_simd.inc)

// The Philox words of up to kBlock groups, by output: w[j][i] is word j of group g0 + i.
struct WordBlock {
  alignas(64) uint32_t w[4][kBlock];
};

// Counter (g0 + i, sample, step, stream) and key `seed` of group i of a block.
struct Counter {
  uint32_t g0, sample, step, stream;
  uint64_t seed;
};

// Portable: the definition, group by group, in loops the compiler vectorizes as it can.
namespace portable {

void normal_groups(const Counter& c, int64_t count, float* const z[4]) {
  WordBlock words;
  for (int64_t at = 0; at < count; at += kBlock) {
    const int64_t n = std::min(kBlock, count - at);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const Words w = philox4x32_10(c.g0 + static_cast<uint32_t>(at + i), c.sample, c.step, c.stream, c.seed);
      words.w[0][i] = w.w0;
      words.w[1][i] = w.w1;
      words.w[2][i] = w.w2;
      words.w[3][i] = w.w3;
    }
    float *z0 = z[0] + at, *z1 = z[1] + at, *z2 = z[2] + at, *z3 = z[3] + at;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      box_muller(words.w[0][i], words.w[1][i], z0[i], z1[i]);
      box_muller(words.w[2][i], words.w[3][i], z2[i], z3[i]);
    }
  }
}

}  // namespace portable

#if FASTDDPM_X86_MULTIVERSION

// The levels' instruction sets (x86-64-v4, x86-64-v3), added to the build's: an "arch=" would
// also drop what a -march=native build has beyond the level, and the intrinsics would not inline.
#pragma GCC push_options
#pragma GCC target("avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,popcnt,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")
namespace avx512 {

constexpr int kLanes = 16;
typedef float F __attribute__((vector_size(64)));
typedef int32_t I __attribute__((vector_size(64)));
typedef uint32_t U __attribute__((vector_size(64)));
typedef F Table16;  // the whole table in one register

FASTDDPM_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
FASTDDPM_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
FASTDDPM_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
FASTDDPM_INLINE Table16 table16(const float* t) { return _mm512_loadu_ps(t); }
FASTDDPM_INLINE F lookup(Table16 t, I index) { return _mm512_permutexvar_ps((__m512i)index, t); }  // index mod 16

typedef uint64_t W __attribute__((vector_size(64)));
// The 64-bit products of the low halves of c's lanes and m (vpmuludq).
FASTDDPM_INLINE W mul_wide(W c, uint32_t m) { return (W)_mm512_mul_epu32((__m512i)c, _mm512_set1_epi64(m)); }
// The low halves of a's lanes, then of b's (vpermt2d).
FASTDDPM_INLINE U low_halves(W a, W b) {
  const __m512i index = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return (U)_mm512_permutex2var_epi32((__m512i)a, index, (__m512i)b);
}

#include "noise_simd.inc"

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,popcnt")
namespace avx2 {

constexpr int kLanes = 8;
typedef float F __attribute__((vector_size(32)));
typedef int32_t I __attribute__((vector_size(32)));
typedef uint32_t U __attribute__((vector_size(32)));
struct Table16 {
  F low, high;  // entries 0–7 and 8–15
};

FASTDDPM_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
FASTDDPM_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
FASTDDPM_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
FASTDDPM_INLINE Table16 table16(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
// vpermps on each half (index mod 8), then bit 3 of the index, moved to the sign bit, picks one
FASTDDPM_INLINE F lookup(const Table16& t, I index) {
  const __m256i i = (__m256i)index;
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.low, i), _mm256_permutevar8x32_ps(t.high, i), (__m256)(index << 28));
}

typedef uint64_t W __attribute__((vector_size(32)));
FASTDDPM_INLINE W mul_wide(W c, uint32_t m) { return (W)_mm256_mul_epu32((__m256i)c, _mm256_set1_epi64x(m)); }
// The low halves of a's lanes, then of b's: vshufps within 128-bit halves, then vpermq.
FASTDDPM_INLINE U low_halves(W a, W b) {
  const __m256 pairs = _mm256_shuffle_ps((__m256)a, (__m256)b, 0x88);  // a0 a1 b0 b1 | a2 a3 b2 b3
  return (U)_mm256_permute4x64_epi64((__m256i)pairs, 0xD8);
}

#include "noise_simd.inc"

}  // namespace avx2
#pragma GCC pop_options

#endif  // FASTDDPM_X86_MULTIVERSION

using NormalGroups = void (*)(const Counter&, int64_t, float* const[4]);

// The highest level the CPU supports, capped by FASTDDPM_CPU_LEVEL (0, 3 or 4) where set: the
// tests run every version on one machine this way.
NormalGroups pick_normal_groups() {
  int level = cpu_level();
  if (const char* cap = std::getenv("FASTDDPM_CPU_LEVEL")) level = std::min(level, std::atoi(cap));
#if FASTDDPM_X86_MULTIVERSION
  if (level >= kX86V4) return avx512::normal_groups;
  if (level >= kX86V3) return avx2::normal_groups;
#endif
  return portable::normal_groups;
}

const NormalGroups kNormalGroups = pick_normal_groups();  // once, when the module loads

}  // namespace

void normal_groups(uint64_t seed, uint32_t sample, uint32_t step, uint32_t stream, uint32_t g0, int64_t count,
                   float* z0, float* z1, float* z2, float* z3) {
  float* const z[4] = {z0, z1, z2, z3};
  kNormalGroups(Counter{g0, sample, step, stream, seed}, count, z);
}

void normal(float* out, int64_t B, int64_t N, uint64_t seed, int64_t sample_base, int64_t step, int64_t stream) {
  check_sizes(B, N);
  if (B * N == 0) return;
  check_pointer(out, "out");
  const Layout L(B, N);
  const NoiseSource source{nullptr, seed, sample_base};
  for_each_chunk(L, [&](const Chunk& c, NoiseBuffer& buf) {
    const float* z[4];
    source.fill(L, c, static_cast<uint32_t>(step), static_cast<uint32_t>(stream), true, buf, z);
    for (int j = 0; j < 4; ++j) {
      const Run r = run_of(L, c, j);
      if (r.length > 0) std::memcpy(out + c.b * N + r.offset, z[j], r.length * sizeof(float));
    }
  });
}

}  // namespace fastddpm
