// normal_groups: the contract's normals (philox.h) for a run of Philox groups of one sample,
// vectorized for the CPU it runs on. Blocks of kBlock groups go through two branch-free passes
// in L1: Philox's words (integer multiplies), then Box–Muller (float, vmath.h).
//
// Measured on one Zen 4 core, ns per group (4 normals), Philox + Box–Muller = together, before
// vmath.h's fused multiply-adds (7% off the whole):
//   baseline SSE2 (portable)      4.74 + 7.48 = 13.1
//   AVX2 (x86-64-v3)              1.48 + 3.19 =  4.6
//   AVX-512 (x86-64-v4)           1.21 + 2.23 =  3.4
// Philox needs the high and low words of 32 × 32 → 64-bit products, which GCC 12 vectorizes
// from the scalar definition as 64-bit lanes (vpmovzxdq, vpmullq, packing back; without vpmullq,
// at AVX2, three vpmuludq per product): 2.50 ns at AVX-512 and 4.54 at AVX2. So Philox is
// written with intrinsics below, vpmuludq on the even and odd lanes. Box–Muller needs nothing
// the autovectorizer lacks: it stays the scalar definition in an `omp simd` loop, inlined into
// each version and compiled for its level. Every version computes the same float operations in
// the same order (no FMA contraction), so the normals are bit-identical on every CPU.
#include <algorithm>
#include <cstdint>

#include "philox.h"
#include "simd.h"

#if FASTDDPM_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace fastddpm {
namespace {

constexpr int64_t kBlock = 256;  // groups per pass: 4 KiB of words, in L1 with their normals

// The Philox words of up to kBlock groups, by output: w[j][i] is word j of group g0 + i.
struct WordBlock {
  alignas(64) uint32_t w[4][kBlock];
};

// Counter (g0 + i, sample, step, stream) and key `seed` of group i of a block.
struct Counter {
  uint32_t g0, sample, step, stream;
  uint64_t seed;
};

// Portable: the definition, group by group, in a loop the compiler vectorizes as it can.
FASTDDPM_INLINE void philox_words_portable(const Counter& c, int64_t count, WordBlock& out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const Words w = philox4x32_10(c.g0 + static_cast<uint32_t>(i), c.sample, c.step, c.stream, c.seed);
    out.w[0][i] = w.w0;
    out.w[1][i] = w.w1;
    out.w[2][i] = w.w2;
    out.w[3][i] = w.w3;
  }
}

// Box–Muller of a block: normals z[j][at + i] from the words of group i, pairs (0, 1), (2, 3).
FASTDDPM_INLINE void box_muller_block(const WordBlock& in, int64_t count, float* const z[4], int64_t at) {
  float *z0 = z[0] + at, *z1 = z[1] + at, *z2 = z[2] + at, *z3 = z[3] + at;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    box_muller(uint_to_uniform(in.w[0][i]), uint_to_uniform(in.w[1][i]), z0[i], z1[i]);
    box_muller(uint_to_uniform(in.w[2][i]), uint_to_uniform(in.w[3][i]), z2[i], z3[i]);
  }
}

#if FASTDDPM_X86_MULTIVERSION

// Philox4x32-10 on kVectors × kLanes groups at once; words of groups past `count` (up to the next
// multiple of kVectors · kLanes, within the block) are computed and not read. Independent vectors
// hide the multiply latency: per group, AVX-512 1.54 / 1.32 / 1.22 ns and AVX2 2.26 / 1.70 /
// 1.49 ns with 1 / 2 / 4 vectors. One group per 64-bit lane instead (vpmuludq gives the whole
// product, 4 multiplies per 16 groups and round instead of 6) measured no faster.
constexpr int kVectors = 4;
static_assert(kBlock % (kVectors * 16) == 0, "blocks hold whole AVX-512 steps");

// AVX-512: (high, low) words of the 64-bit products c · m of 16 uint32 lanes.
FASTDDPM_TARGET_V4 inline void mul_hi_lo(__m512i c, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m);                        // products of lanes 0, 2, …
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);  // products of lanes 1, 3, …
  hi = _mm512_mask_mov_epi32(_mm512_srli_epi64(even, 32), 0xAAAA, odd);
  // vpmulld, not the low halves of even and odd merged (2 ops): 3.53 vs 3.70 ns per normal group
  lo = _mm512_mullo_epi32(c, m);
}

FASTDDPM_TARGET_V4 void philox_words_v4(const Counter& c, int64_t count, WordBlock& out) {
  constexpr int kLanes = 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int64_t i = 0; i < count; i += kVectors * kLanes) {
    __m512i x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      x0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c.g0 + i + v * kLanes)), lane);
      x1[v] = _mm512_set1_epi32(static_cast<int>(c.sample));
      x2[v] = _mm512_set1_epi32(static_cast<int>(c.step));
      x3[v] = _mm512_set1_epi32(static_cast<int>(c.stream));
    }
    uint32_t k0 = static_cast<uint32_t>(c.seed), k1 = static_cast<uint32_t>(c.seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) {
        __m512i hi_a, lo_a, hi_b, lo_b;
        mul_hi_lo(x0[v], mul_a, hi_a, lo_a);
        mul_hi_lo(x2[v], mul_b, hi_b, lo_b);
        x0[v] = _mm512_ternarylogic_epi32(hi_b, x1[v], key0, 0x96);  // hi_b ^ c1 ^ k0
        x2[v] = _mm512_ternarylogic_epi32(hi_a, x3[v], key1, 0x96);  // hi_a ^ c3 ^ k1
        x1[v] = lo_b;
        x3[v] = lo_a;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    for (int v = 0; v < kVectors; ++v) {
      const int64_t at = i + v * kLanes;
      _mm512_store_si512(out.w[0] + at, x0[v]);
      _mm512_store_si512(out.w[1] + at, x1[v]);
      _mm512_store_si512(out.w[2] + at, x2[v]);
      _mm512_store_si512(out.w[3] + at, x3[v]);
    }
  }
}

// AVX2: the same on 8 lanes.
FASTDDPM_TARGET_V3 inline void mul_hi_lo(__m256i c, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(c, m);
}

FASTDDPM_TARGET_V3 void philox_words_v3(const Counter& c, int64_t count, WordBlock& out) {
  constexpr int kLanes = 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  for (int64_t i = 0; i < count; i += kVectors * kLanes) {
    __m256i x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      x0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c.g0 + i + v * kLanes)), lane);
      x1[v] = _mm256_set1_epi32(static_cast<int>(c.sample));
      x2[v] = _mm256_set1_epi32(static_cast<int>(c.step));
      x3[v] = _mm256_set1_epi32(static_cast<int>(c.stream));
    }
    uint32_t k0 = static_cast<uint32_t>(c.seed), k1 = static_cast<uint32_t>(c.seed >> 32);
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) {
        __m256i hi_a, lo_a, hi_b, lo_b;
        mul_hi_lo(x0[v], mul_a, hi_a, lo_a);
        mul_hi_lo(x2[v], mul_b, hi_b, lo_b);
        x0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1[v]), key0);
        x2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3[v]), key1);
        x1[v] = lo_b;
        x3[v] = lo_a;
      }
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    for (int v = 0; v < kVectors; ++v) {
      const int64_t at = i + v * kLanes;
      _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[0] + at), x0[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[1] + at), x1[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[2] + at), x2[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out.w[3] + at), x3[v]);
    }
  }
}

#endif  // FASTDDPM_X86_MULTIVERSION

// Philox then Box–Muller, block by block; always inlined, so each version below compiles the
// Box–Muller loop for its own level.
template <void (*PhiloxWords)(const Counter&, int64_t, WordBlock&)>
FASTDDPM_INLINE void normal_blocks(const Counter& c, int64_t count, float* const z[4]) {
  WordBlock words;
  for (int64_t at = 0; at < count; at += kBlock) {
    const int64_t n = std::min(kBlock, count - at);
    PhiloxWords(Counter{c.g0 + static_cast<uint32_t>(at), c.sample, c.step, c.stream, c.seed}, n, words);
    box_muller_block(words, n, z, at);
  }
}

void normal_groups_portable(const Counter& c, int64_t count, float* const z[4]) {
  normal_blocks<philox_words_portable>(c, count, z);
}

#if FASTDDPM_X86_MULTIVERSION
FASTDDPM_TARGET_V4 void normal_groups_v4(const Counter& c, int64_t count, float* const z[4]) {
  normal_blocks<philox_words_v4>(c, count, z);
}

FASTDDPM_TARGET_V3 void normal_groups_v3(const Counter& c, int64_t count, float* const z[4]) {
  normal_blocks<philox_words_v3>(c, count, z);
}
#endif

using NormalGroups = void (*)(const Counter&, int64_t, float* const[4]);

NormalGroups pick_normal_groups() {
#if FASTDDPM_X86_MULTIVERSION
  switch (cpu_level()) {
    case kX86V4: return normal_groups_v4;
    case kX86V3: return normal_groups_v3;
    default: break;
  }
#endif
  return normal_groups_portable;
}

const NormalGroups kNormalGroups = pick_normal_groups();  // once, when the module loads

}  // namespace

void normal_groups(uint64_t seed, uint32_t sample, uint32_t step, uint32_t stream, uint32_t g0, int64_t count,
                   float* z0, float* z1, float* z2, float* z3) {
  float* const z[4] = {z0, z1, z2, z3};
  kNormalGroups(Counter{g0, sample, step, stream, seed}, count, z);
}

}  // namespace fastddpm
