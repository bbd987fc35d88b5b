// Reading model outputs stored as float32, float16 or bfloat16: every value is widened exactly
// to float32 (all arithmetic is float32). Branch-free, so loops over them vectorize.
#pragma once

#include <cstdint>

#include "vmath.h"

namespace fastddpm {

// fastddpm.options.MODEL_DTYPES: a dtype's code is the index of its name.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
inline constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16"};

// IEEE binary16 → binary32, exact for every input: normals by re-biasing the exponent,
// subnormals as integer · 2⁻²⁴ (so a DAZ/FTZ floating-point mode cannot flush them),
// ±inf and NaN (payload kept) by widening the all-ones exponent.
static FASTDDPM_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7fffu;
  const uint32_t normal = (magnitude << 13) + ((127u - 15u) << 23);
  const uint32_t special = (magnitude << 13) | 0x7f800000u;
  const uint32_t subnormal = vmath::to_bits(static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f);
  const uint32_t bits = magnitude >= 0x7c00u ? special : (magnitude >= 0x0400u ? normal : subnormal);
  return vmath::from_bits(bits | sign);
}

// bfloat16 is the top half of a float32.
static FASTDDPM_INLINE float bfloat16_to_float(uint16_t h) {
  return vmath::from_bits(static_cast<uint32_t>(h) << 16);
}

template <int DT>
static FASTDDPM_INLINE float load(const void* base, int64_t i) {
  if constexpr (DT == kFloat32) {
    return static_cast<const float*>(base)[i];
  } else if constexpr (DT == kFloat16) {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return bfloat16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

// The model's prediction at i; with GUIDED, classifier-free guidance's ε_u + w (ε_c − ε_u) of the
// conditional branch at `cond` and the unconditional one at `uncond` (reference.guided_output).
template <int DT, bool GUIDED>
static FASTDDPM_INLINE float load_prediction(const void* cond, const void* uncond, float w, int64_t i) {
  const float c = load<DT>(cond, i);
  if constexpr (GUIDED) {
    const float u = load<DT>(uncond, i);
    return u + w * (c - u);
  } else {
    return c;
  }
}

template <int DT>
static FASTDDPM_INLINE const void* offset(const void* base, int64_t elements) {
  constexpr int64_t bytes = DT == kFloat32 ? 4 : 2;
  return static_cast<const char*>(base) + elements * bytes;
}

}  // namespace fastddpm
