// solver_step: one step of a multistep DPM-Solver++ chain (fastddpm/solvers.py, reference.solver_step),
// in place: m0 = x̂₀ from the model output at the step's (α_s, σ_s), x ← cx x + c0 m0 + c1 m1 + c2 m2
// + cz z, and the history of earlier x̂₀'s ← (m0, m1). z is given or drawn at (seed, sample_base + b,
// t[b], STREAM_REVERSE); with guidance, the prediction is classifier-free guidance's combination of
// the model's two branches (dtype.h). The reference's float32 operations, in its order.
#include <cmath>

#include "checks.h"
#include "dtype.h"
#include "launch.h"
#include "ops.h"
#include "schedule.h"
#include "simd.h"

namespace fastddpm {
namespace {

// One step's scalars (a column of the chain's table).
struct SolverCoef {
  float alpha, sigma, cx, c0, c1, c2, cz;
};

// One contiguous run of a sample: x[i], pred[i] (guided by upred[i]), its history h0[i], h1[i]
// (SLOTS of them) and noise z[i].
template <int DT, int PRED, int SLOTS, bool NOISE, bool GUIDED>
FASTDDPM_CLONES void solver_run(float* x, const void* pred, const void* upred, float w, float* h0, float* h1,
                                const float* z, int64_t n, const SolverCoef& coef, float lo, float hi) {
  const SolverCoef k = coef;  // a copy the stores cannot alias: kept in registers
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xv = x[i], p = load_prediction<DT, GUIDED>(pred, upred, w, i);
    float m0 = PRED == kEps ? (xv - k.sigma * p) / k.alpha : (PRED == kX0 ? p : k.alpha * xv - k.sigma * p);
    m0 = m0 < lo ? lo : m0;  // clamp(−1, 1), or (−∞, ∞) without clipping; NaN stays NaN
    m0 = hi < m0 ? hi : m0;
    float out = k.cx * xv + k.c0 * m0;
    if constexpr (SLOTS >= 1) out = out + k.c1 * h0[i];
    if constexpr (SLOTS >= 2) {
      out = out + k.c2 * h1[i];
      h1[i] = h0[i];
    }
    if constexpr (SLOTS >= 1) h0[i] = m0;
    if constexpr (NOISE) out = out + k.cz * z[i];
    x[i] = out;
  }
}

}  // namespace

void solver_step(float* x, const void* model, int model_dtype, int64_t model_batch_stride, const int64_t* step,
                 const int64_t* t, const float* table, int64_t M, int64_t B, int64_t N, float* history, int64_t slots,
                 bool stochastic, const float* noise, uint64_t seed, int64_t sample_base, int prediction, bool clip,
                 bool guided, double guidance) {
  check_sizes(B, N);
  check_prediction(prediction);
  check_model(model_dtype, model_batch_stride, N, false);
  require(slots >= 0 && slots <= 2, [&] { return "history must hold 0, 1 or 2 slots, got " + std::to_string(slots); });
  if (B * N == 0) return;
  check_inputs({{x, "x"}, {model, "model_out"}, {t, "t"}}, step, table, B, M, "step");
  if (slots > 0) check_pointer(history, "history");
  const Table tab{table, M};
  const Layout L(B, N);
  const NoiseSource source{noise, seed, sample_base};
  const float lo = clip ? -1.0f : -INFINITY, hi = clip ? 1.0f : INFINITY;
  const float w = static_cast<float>(guidance);
  dispatch3(model_dtype, [&](auto dt) {
    dispatch3(prediction, [&](auto pred) {
      dispatch3(static_cast<int>(slots), [&](auto s) {
        dispatch_bool(guided, [&](auto g) {
          dispatch_bool(stochastic, [&](auto with_noise) {
            for_each_chunk(L, [&](const Chunk& c, NoiseBuffer& buf) {
              const int64_t i = step[c.b];
              const SolverCoef k{tab.at(kAlphaS, i), tab.at(kSigmaS, i), tab.at(kCx, i), tab.at(kC0, i),
                                 tab.at(kC1, i),     tab.at(kC2, i),     tab.at(kCz, i)};
              const float* z[4] = {nullptr, nullptr, nullptr, nullptr};
              if constexpr (decltype(with_noise)::value) {
                source.fill(L, c, static_cast<uint32_t>(t[c.b]), kStreamReverse, true, buf, z);
              }
              const void* sample_out = offset<dt>(model, c.b * model_batch_stride);
              const void* uncond_out = offset<dt>(model, (B + c.b) * model_batch_stride);  // guided only
              for (int j = 0; j < 4; ++j) {
                const Run r = run_of(L, c, j);
                const int64_t at = c.b * N + r.offset;
                float* h0 = s >= 1 ? history + at : nullptr;
                float* h1 = s >= 2 ? history + B * N + at : nullptr;
                solver_run<dt, pred, s, decltype(with_noise)::value, g>(x + at, offset<dt>(sample_out, r.offset),
                                                                        offset<dt>(uncond_out, r.offset), w, h0, h1,
                                                                        z[j], r.length, k, lo, hi);
              }
            });
          });
        });
      });
    });
  });
}

}  // namespace fastddpm
