// reverse_step: x_{t−1} from x_t and the model output (reference.reverse_step): ancestral DDPM
// (Algorithm 2) or DDIM(η), with z given or drawn from the noise contract at
// (seed, sample_base + b, t[b], STREAM_REVERSE); with guidance, the prediction is classifier-free
// guidance's combination of the model's two branches (dtype.h). Every formula is fastddpm/reference.py's, in its
// float32 operation order, so results match the reference to rounding of exp (and of log/cos/sin
// where noise is generated).
#include <cmath>

#include "checks.h"
#include "dtype.h"
#include "launch.h"
#include "ops.h"
#include "schedule.h"
#include "simd.h"

namespace fastddpm {

namespace {

enum StepMode : int { kFixed = 0, kLearned = 1, kDdim = 2 };

// Per-sample scalars of one reverse step, float32 as the reference computes them.
struct StepCoef {
  X0Coef x0;                      // x̂₀ from x_t and the prediction
  float mean_x0, mean_xt;         // μ = mean_x0 · x̂₀ + mean_xt · x_t (DDIM: mean_xt multiplies ε̂)
  float sqrt_recip, sqrt_recipm1; // DDIM's ε̂ = (√(1/ᾱ) x_t − x̂₀) / √(1/ᾱ − 1)
  float log_beta, log_tilde;      // learned_range: log β_t and log β̃_t
  float nonzero;                  // t > 0
  float noise_scale;              // fixed: nonzero · e^{½ log σ²}; DDIM: nonzero · σ
  bool needs_noise;               // false where the noise is multiplied by 0
};

StepCoef step_coef(const Table& tab, int64_t t, int prediction, int variance, bool ddim, float eta) {
  StepCoef k{};
  k.x0 = x0_coef(tab, t, prediction);
  k.nonzero = t > 0 ? 1.0f : 0.0f;
  k.sqrt_recip = tab.at(kSqrtRecipAlphasCumprod, t);
  k.sqrt_recipm1 = tab.at(kSqrtRecipm1AlphasCumprod, t);
  if (ddim) {
    // σ = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1})) — Song et al. 2021, eq. (16)
    const float abar = tab.at(kAlphasCumprod, t), abar_prev = tab.at(kAlphasCumprodPrev, t);
    const float sigma = eta * std::sqrt((1.0f - abar_prev) / (1.0f - abar) * (1.0f - abar / abar_prev));
    const float rest = 1.0f - abar_prev - sigma * sigma;
    k.mean_x0 = std::sqrt(abar_prev);
    k.mean_xt = std::sqrt(rest < 0.0f ? 0.0f : rest);
    k.noise_scale = k.nonzero * sigma;
    k.needs_noise = k.noise_scale != 0.0f;
    return k;
  }
  k.mean_x0 = tab.at(kPosteriorMeanCoef1, t);
  k.mean_xt = tab.at(kPosteriorMeanCoef2, t);
  k.log_beta = tab.at(kLogBetas, t);
  k.log_tilde = tab.at(kPosteriorLogVarianceClipped, t);
  if (variance == kLearnedRange) {
    k.needs_noise = t > 0;
  } else {
    const float log_variance = variance == kFixedSmall ? k.log_tilde : tab.at(kLogLargeVariance, t);
    k.noise_scale = k.nonzero * std::exp(0.5f * log_variance);
    k.needs_noise = k.noise_scale != 0.0f;
  }
  return k;
}

// One contiguous run of a sample: out[i] = x_{t−1} at x[i], pred[i] (guided by upred[i]), var[i]
// and noise z[i].
template <int DT, int PRED, int MODE, bool GUIDED>
FASTDDPM_CLONES void reverse_run(float* out, const float* x, const void* pred, const void* upred, float w,
                                 const void* var, const float* z, int64_t n, const StepCoef& coef, float lo, float hi) {
  // A copy, which `out` cannot alias: its fields stay in registers instead of being reloaded
  // after every store (reverse_step measured 2–4% faster).
  const StepCoef k = coef;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xv = x[i], p = load_prediction<DT, GUIDED>(pred, upred, w, i);
    float x0 = PRED == kX0 ? p : k.x0.from_x * xv - k.x0.from_pred * p;
    x0 = x0 < lo ? lo : x0;  // clamp(−1, 1), or (−∞, ∞) without clipping; NaN stays NaN
    x0 = hi < x0 ? hi : x0;
    if constexpr (MODE == kDdim) {
      const float eps = (k.sqrt_recip * xv - x0) / k.sqrt_recipm1;
      out[i] = (k.mean_x0 * x0 + k.mean_xt * eps) + k.noise_scale * z[i];
    } else {
      const float mean = k.mean_x0 * x0 + k.mean_xt * xv;  // μ̃_t(x̂₀, x_t) — eq. (7)
      float scale = k.noise_scale;
      if constexpr (MODE == kLearned) {
        // log Σ = v log β_t + (1 − v) log β̃_t, v = (output + 1)/2 — Nichol & Dhariwal eq. (15)
        const float frac = (load<DT>(var, i) + 1.0f) / 2.0f;
        scale = k.nonzero * vmath::exp(0.5f * (frac * k.log_beta + (1.0f - frac) * k.log_tilde));
      }
      out[i] = mean + scale * z[i];
    }
  }
}

}  // namespace

void reverse_step(float* out, const float* x, const void* model, int model_dtype, int64_t model_batch_stride,
                  const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N, const float* noise,
                  uint64_t seed, int64_t sample_base, int prediction, int variance, bool clip, bool ddim, double eta,
                  bool guided, double guidance) {
  check_sizes(B, N);
  check_prediction(prediction);
  check_variance(variance);
  check_model(model_dtype, model_batch_stride, N, variance == kLearnedRange);
  if (B * N == 0) return;
  check_inputs({{out, "out"}, {x, "x"}, {model, "model_out"}}, t, table, B, T);
  const Table tab{table, T};
  const Layout L(B, N);
  const NoiseSource source{noise, seed, sample_base};
  const int mode = ddim ? kDdim : (variance == kLearnedRange ? kLearned : kFixed);
  const float lo = clip ? -1.0f : -INFINITY, hi = clip ? 1.0f : INFINITY;
  const float w = static_cast<float>(guidance);
  dispatch3(model_dtype, [&](auto dt) {
    dispatch3(prediction, [&](auto pred) {
      dispatch3(mode, [&](auto md) {
        dispatch_bool(guided, [&](auto g) {
          for_each_chunk(L, [&](const Chunk& c, NoiseBuffer& buf) {
            const StepCoef k = step_coef(tab, t[c.b], prediction, variance, ddim, static_cast<float>(eta));
            const float* z[4];
            source.fill(L, c, static_cast<uint32_t>(t[c.b]), kStreamReverse, k.needs_noise, buf, z);
            const void* sample_out = offset<dt>(model, c.b * model_batch_stride);
            const void* uncond_out = offset<dt>(model, (B + c.b) * model_batch_stride);  // guided only
            for (int j = 0; j < 4; ++j) {
              const Run r = run_of(L, c, j);
              reverse_run<dt, pred, md, g>(out + c.b * N + r.offset, x + c.b * N + r.offset,
                                           offset<dt>(sample_out, r.offset), offset<dt>(uncond_out, r.offset), w,
                                           offset<dt>(sample_out, N + r.offset), z[j], r.length, k, lo, hi);
            }
          });
        });
      });
    });
  });
}

}  // namespace fastddpm
