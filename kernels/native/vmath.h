// Branch-free float32 log, exp and sin/cos that GCC and Clang vectorize inside `omp simd`
// loops (libm calls do not vectorize without -ffast-math, which would break parity).
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

// ln x for positive, normal, finite x (Cephes logf: x = 2^k (1 + f), 1 + f ∈ [√½, √2), and a
// degree-9 polynomial in f). No division: Zen 4 divides and takes square roots on one unit, and
// Box–Muller's √ already waits on it (musl's f / (2 + f) form cost 9% more per normal).
static FASTDDPM_INLINE float log_positive(float x) {
  constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  uint32_t ix = to_bits(x) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 0x7f);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = from_bits(ix) - 1.0f;
  const float z = f * f;
  float p = fma(7.0376836292e-2f, f, -1.1514610310e-1f);
  p = fma(p, f, 1.1676998740e-1f);
  p = fma(p, f, -1.2420140846e-1f);
  p = fma(p, f, 1.4249322787e-1f);
  p = fma(p, f, -1.6668057665e-1f);
  p = fma(p, f, 2.0000714765e-1f);
  p = fma(p, f, -2.4999993993e-1f);
  p = fma(p, f, 3.3333331174e-1f);
  const float y = fma(-0.5f, z, fma(k, ln2_lo, p * f * z));
  return fma(k, ln2_hi, f + y);
}

// sin x and cos x for x ∈ [0, 8): quadrant reduction by π/2 (Cody–Waite, three parts) and
// Cephes' minimax polynomials on [−π/4, π/4].
static FASTDDPM_INLINE void sincos_0_8(float x, float& sin_x, float& cos_x) {
  constexpr float two_over_pi = 0.636619772367581343f;
  constexpr float pio2_1 = 1.5703125f, pio2_2 = 4.837512969970703125e-4f, pio2_3 = 7.54978995489188216e-8f;
  const int32_t j = static_cast<int32_t>(fma(x, two_over_pi, 0.5f));
  const float fj = static_cast<float>(j);
  const float r = fma(-fj, pio2_3, fma(-fj, pio2_2, fma(-fj, pio2_1, x)));
  const float z = r * r;
  const float s = fma(fma(fma(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f), z * r, r);
  const float c = fma(fma(fma(2.443315711809948e-5f, z, -1.388731625493765e-3f), z, 4.166664568298827e-2f), z * z,
                      fma(-0.5f, z, 1.0f));
  const bool odd = (j & 1) != 0;
  const float s1 = odd ? c : s, c1 = odd ? s : c;
  // Quadrant signs as sign-bit XORs, bit 1 of j (sin) and of j + 1 (cos) moved to bit 31: the
  // same values as negating, in fewer vector ops than selects (3.41 vs 3.52 ns per normal group).
  sin_x = from_bits(to_bits(s1) ^ (static_cast<uint32_t>(j) & 2u) << 30);
  cos_x = from_bits(to_bits(c1) ^ (static_cast<uint32_t>(j + 1) & 2u) << 30);
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
