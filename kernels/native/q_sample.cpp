// q_sample: x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, the forward process (reference.q_sample), with ε given or
// drawn from the noise contract at (seed, sample_base + b, step, STREAM_TRAIN).
#include "checks.h"
#include "launch.h"
#include "ops.h"
#include "schedule.h"
#include "simd.h"

namespace fastddpm {

namespace {

// One contiguous run: √ᾱ x₀ + √(1 − ᾱ) ε.
FASTDDPM_CLONES void q_sample_run(float* out, const float* x0, const float* z, int64_t n, float sa, float s1ma) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = sa * x0[i] + s1ma * z[i];
}

}  // namespace

void q_sample(float* out, const float* x0, const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N,
              const float* noise, uint64_t seed, int64_t sample_base, int64_t step) {
  check_sizes(B, N);
  if (B * N == 0) return;
  check_inputs({{out, "out"}, {x0, "x0"}}, t, table, B, T);
  const Table tab{table, T};
  const Layout L(B, N);
  const NoiseSource source{noise, seed, sample_base};
  for_each_chunk(L, [&](const Chunk& c, NoiseBuffer& buf) {
    const float sa = tab.at(kSqrtAlphasCumprod, t[c.b]), s1ma = tab.at(kSqrtOneMinusAlphasCumprod, t[c.b]);
    const float* z[4];
    source.fill(L, c, static_cast<uint32_t>(step), kStreamTrain, true, buf, z);
    for (int j = 0; j < 4; ++j) {
      const Run r = run_of(L, c, j);
      q_sample_run(out + c.b * N + r.offset, x0 + c.b * N + r.offset, z[j], r.length, sa, s1ma);
    }
  });
}

}  // namespace fastddpm
