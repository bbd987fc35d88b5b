// Branch-free float32 log, exp and sin/cos: the scalar definitions, which GCC and Clang
// vectorize inside `omp simd` loops (libm calls do not vectorize without -ffast-math, which
// would break parity), and which noise_simd.inc writes out on vectors.
// Each is within about 1 ulp on the range it is used on; the noise contract allows that
// ("the same on every backend up to float rounding of log/sqrt/cos/sin").
//
// log and sin/cos evaluate their polynomials with fused multiply-adds (explicit, so
// -ffp-contract=off does not stop them and every CPU rounds alike): 7% off the contract's
// normals (64 × 3072 on one Zen 4 core: 0.188 → 0.175 ms). In the AVX2/AVX-512 clones and on
// ARM an fma is one instruction; in the x86 baseline clone (CPUs without AVX2) it is a call to
// libm's fmaf, correctly rounded too, so the normals stay bit-identical there, only slower.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace fastddpm::vmath {

static FASTDDPM_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// a · b + c, rounded once.
static FASTDDPM_INLINE float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

static FASTDDPM_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The reduction table of minus_two_log_unit: m ∈ [½, 1) in 16 intervals [½ + i/32, ½ + (i+1)/32)
// with centres c_i (c_15 = 1, so that x near 1 reduces to r = m − 1 exactly). Filled in double
// when the module loads: −2/c_i (float, an exact ×2 of 1/c_i rounded) and −2 ln c_i =
// 2 ln(float(1/c_i)), so that m · (1/c_i) and ln c_i describe the same c_i.
struct LogTable {
  float minus_two_inv_c[16], minus_two_log_c[16];
  LogTable() {
    for (int i = 0; i < 16; ++i) {
      const double c = i == 15 ? 1.0 : 0.5 + (i + 0.5) / 32.0;
      const float inv_c = static_cast<float>(1.0 / c);
      minus_two_inv_c[i] = -2.0f * inv_c;
      minus_two_log_c[i] = static_cast<float>(2.0 * std::log(static_cast<double>(inv_c)));
    }
  }
};
inline const LogTable kLogTable;
constexpr float kMinusTwoLn2 = -1.38629436111989061f;
// −2 ln(1 + r) = ρ + ρ² (kLog0 + ρ (kLog1 + ρ (kLog2 + ρ kLog3))), ρ = −2r (below)
constexpr float kLog0 = 0.25f, kLog1 = 1.0f / 12.0f, kLog2 = 1.0f / 32.0f, kLog3 = 1.0f / 80.0f;

// −2 ln x for x ∈ (0, 1), normal: x = 2^k m, m ∈ [½, 1) in interval i of kLogTable, and
// −2 ln x = k (−2 ln 2) + (−2 ln c_i) − 2 ln(1 + r), r = m/c_i − 1, |r| ≤ 1/32, where the series of
// ln(1 + r) to r⁵ is within 5e-9 relatively. In ρ = −2r (exact scalings by 2):
// −2 ln(1 + r) = ρ + ρ² (1/4 + ρ/12 + ρ²/32 + ρ³/80). Near x = 1 (k = 0, i = 15) only the series
// remains, so the result keeps its relative accuracy as x → 1. Against Cephes' logf on
// [√½, √2) (degree 9, no table) this is 10 fewer vector operations; on a Zen 4 core Box–Muller
// went from 1.76 to 1.19 ns per group with sincos_quarter_turns.
static FASTDDPM_INLINE float minus_two_log_unit(float x) {
  const uint32_t ix = to_bits(x);
  const int i = static_cast<int>((ix >> 19) & 15u);
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 126);
  const float m = from_bits((ix & 0x007fffffu) | 0x3f000000u);
  const float rho = fma(m, kLogTable.minus_two_inv_c[i], 2.0f);
  const float p = fma(fma(fma(kLog3, rho, kLog2), rho, kLog1), rho, kLog0);
  return fma(k, kMinusTwoLn2, kLogTable.minus_two_log_c[i]) + fma(rho * rho, p, rho);
}

constexpr float kHalfPi = 1.57079632679489662f;
constexpr uint32_t kBit30 = 1u << 30, kBit31 = 1u << 31;
constexpr float kRoundMagic = 12582912.0f;  // 1.5·2²³: v + it rounds v to an integer, held in its low bits
// Cephes' minimax polynomials on [−π/4, π/4]: sin r = r + r z (s1 + z (s2 + z s3)),
// cos r = 1 + z (−½ + z (c1 + z (c2 + z c3))), z = r² (in Horner's form, one operation fewer
// than Cephes' 1 − z/2 + z²(…), within 2e-8 of it).
constexpr float kSin1 = -1.6666654611e-1f, kSin2 = 8.3321608736e-3f, kSin3 = -1.9515295891e-4f;
constexpr float kCos1 = 4.166664568298827e-2f, kCos2 = -1.388731625493765e-3f, kCos3 = 2.443315711809948e-5f;

// sin θ and cos θ for θ = (π/2) v, v ∈ [0, 4]: v = j + f with j the nearest integer (both
// subtractions are exact), r = f · π/2 (one rounding, |r| ≤ π/4), the polynomials, then the
// quadrant's swap and signs.
static FASTDDPM_INLINE void sincos_quarter_turns(float v, float& sin_x, float& cos_x) {
  const float shifted = v + kRoundMagic;
  const uint32_t j = to_bits(shifted) << 30;  // the quadrant j mod 4 in bits 31 and 30
  const float r = (v - (shifted - kRoundMagic)) * kHalfPi;
  const float z = r * r;
  const float s = fma(fma(fma(kSin3, z, kSin2), z, kSin1), z * r, r);
  const float c = fma(fma(fma(fma(kCos3, z, kCos2), z, kCos1), z, -0.5f), z, 1.0f);
  const bool odd = (j & kBit30) != 0;
  const float s1 = odd ? c : s, c1 = odd ? s : c;
  // Quadrant signs as sign-bit XORs, bit 1 of j (sin) and of j + 1 (cos) in bit 31: the same
  // values as negating, in fewer vector ops than selects.
  sin_x = from_bits(to_bits(s1) ^ (j & kBit31));
  cos_x = from_bits(to_bits(c1) ^ ((j + kBit30) & kBit31));
}

// e^x for any float x (Cephes expf: x = n ln 2 + r, |r| ≤ ½ ln 2, then p·2^n in two exact
// factors so subnormal results round once); ∞ above 88.72, NaN stays NaN.
static FASTDDPM_INLINE float exp(float x) {
  constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  constexpr float round_magic = 12582912.0f;  // 1.5·2²³: adding it rounds to an integer
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);  // e^−104 rounds to 0
  const float n = (xc * log2e + round_magic) - round_magic;
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                    1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  const float y = p * from_bits(static_cast<uint32_t>(half + 127) << 23) *
                  from_bits(static_cast<uint32_t>(ni - half + 127) << 23);
  return x > 88.72283905f ? INFINITY : (x != x ? x : y);
}

}  // namespace fastddpm::vmath
