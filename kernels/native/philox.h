// The noise contract of fastddpm/rng.py in C++: Philox4x32-10 and its conversion to normals.
//
//   normal(seed, sample, step, stream, element)
//
// Element j·Q + g of a sample (Q = ⌈N/4⌉) is output j of one Philox call with
// counter (g, sample, step, stream) and key (seed mod 2³², seed div 2³²); each 32-bit word x,
// read as int32, becomes u = (x < 0 ? −x − 1 : x) · 4.6566127342e-10f, and (u0, u1), (u2, u3)
// go through Box–Muller with r = √(−2 ln max(u, 1e-7)), θ = 2π u'. Everything here is
// branch-free so `normal_groups` vectorizes; the rounding of log/cos/sin is vmath.h's. The scalar
// functions are the definition; noise_simd.inc computes the same operations on vectors.
#pragma once

#include <cstdint>

#include "vmath.h"

namespace fastddpm {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kMinUniform = 1.0e-7f;  // u₁ is clamped to it before the log

// Streams keep the noise of different uses independent (rng.STREAM_*).
constexpr uint32_t kStreamPrior = 0, kStreamReverse = 1, kStreamTrain = 2;

struct Words {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32-10 (Salmon et al. 2011): rng.philox4x32 with rounds = 10.
static FASTDDPM_INLINE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = static_cast<uint64_t>(c0) * kPhiloxRoundA;
    const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// The int32 reinterpretation with negatives folded to −x − 1 (= ~x): a value in [0, 2³¹).
static FASTDDPM_INLINE int32_t fold(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  return x ^ (x >> 31);
}

// rng.uint_to_uniform: the folded word, scaled.
static FASTDDPM_INLINE float uint_to_uniform(uint32_t word) { return static_cast<float>(fold(word)) * kUniformScale; }

// rng.box_muller of two words: (r cos θ, r sin θ), r = √(−2 ln max(u₁, 1e-7)), θ = 2π u₂, for the
// definition's float u₁ and u₂. θ is not rounded to a float: sin and cos are taken at the
// quarter turns 4 u₂ (exact), within about 1 ulp of sin 2πu₂ and cos 2πu₂ (the definition's
// float θ differs from 2πu₂ by up to 4e-7, so normals differ from it by up to about 2e-6).
static FASTDDPM_INLINE void box_muller(uint32_t w1, uint32_t w2, float& n1, float& n2) {
  const float u1 = uint_to_uniform(w1);
  const float r = std::sqrt(vmath::minus_two_log_unit(u1 < kMinUniform ? kMinUniform : u1));
  float s, c;
  vmath::sincos_quarter_turns(static_cast<float>(fold(w2)) * (4.0f * kUniformScale), s, c);
  n1 = r * c;
  n2 = r * s;
}

// Normals for groups g0 .. g0 + count − 1 of one sample: quarter j of group g0 + i goes to z[j][i].
// noise.cpp: vectorized for the CPU it runs on (Philox in AVX-512 / AVX2 where present).
void normal_groups(uint64_t seed, uint32_t sample, uint32_t step, uint32_t stream, uint32_t g0, int64_t count,
                   float* z0, float* z1, float* z2, float* z3);

}  // namespace fastddpm
