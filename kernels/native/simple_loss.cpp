// simple_loss: L_simple (reference.simple_loss) per sample, MSE_b = mean_e (pred − target)², and its
// gradient d MSE_b / d pred = 2 (pred − target) / N, written in the same pass (the operator stores
// it for the backward instead of regenerating the target there).
#include <vector>

#include "checks.h"
#include "dtype.h"
#include "launch.h"
#include "ops.h"
#include "schedule.h"
#include "simd.h"

namespace fastddpm {
namespace {

// Σ (pred − target)² over one run (in double, lanes in a fixed order), and
// grad = 2 (pred − target) · grad_coef. target = ε, x₀ or v = √ᾱ ε − √(1 − ᾱ) x₀.
template <int DT, int PRED>
FASTDDPM_CLONES double loss_run(float* grad, const void* pred, const float* x0, const float* z, int64_t n, float sa,
                                float s1ma, float grad_coef) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float target = PRED == kEps ? z[i] : (PRED == kX0 ? x0[i] : sa * z[i] - s1ma * x0[i]);
    const float d = load<DT>(pred, i) - target;
    sum += static_cast<double>(d * d);
    grad[i] = (2.0f * d) * grad_coef;
  }
  return sum;
}

// Runs loss_run over every chunk; returns the per-chunk sums.
std::vector<double> loss_chunks(float* grad, const void* pred, int pred_dtype, int64_t pred_batch_stride,
                                const float* x0, const int64_t* t, const Table& tab, const Layout& L,
                                const NoiseSource& source, int64_t step, int prediction) {
  std::vector<double> partial(L.chunks());
  const float grad_coef = static_cast<float>(1.0 / static_cast<double>(L.N));
  dispatch3(pred_dtype, [&](auto dt) {
    dispatch3(prediction, [&](auto pr) {
      for_each_chunk(L, [&](const Chunk& c, NoiseBuffer& buf) {
        const float sa = tab.at(kSqrtAlphasCumprod, t[c.b]), s1ma = tab.at(kSqrtOneMinusAlphasCumprod, t[c.b]);
        const float* z[4];
        source.fill(L, c, static_cast<uint32_t>(step), kStreamTrain, pr != kX0, buf, z);
        const void* sample_pred = offset<dt>(pred, c.b * pred_batch_stride);
        double sum = 0.0;
        for (int j = 0; j < 4; ++j) {
          const Run r = run_of(L, c, j);
          sum += loss_run<dt, pr>(grad + c.b * L.N + r.offset, offset<dt>(sample_pred, r.offset),
                                  x0 + c.b * L.N + r.offset, z[j], r.length, sa, s1ma, grad_coef);
        }
        partial[c.index] = sum;
      });
    });
  });
  return partial;
}

}  // namespace

void simple_loss(float* per_sample, float* grad, const void* pred, int pred_dtype, int64_t pred_batch_stride,
                 const float* x0, const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N,
                 const float* noise, uint64_t seed, int64_t sample_base, int64_t step, int prediction) {
  check_sizes(B, N);
  if (B == 0) return;
  check_pointer(per_sample, "per_sample");
  if (N == 0) {
    for (int64_t b = 0; b < B; ++b) per_sample[b] = NAN;  // the mean of nothing, as torch
    return;
  }
  check_prediction(prediction);
  check_model(pred_dtype, pred_batch_stride, N, false);
  check_inputs({{grad, "grad"}, {pred, "pred"}, {x0, "x0"}}, t, table, B, T);
  const Layout L(B, N);
  const NoiseSource source{noise, seed, sample_base};
  const Table tab{table, T};
  const std::vector<double> partial =
      loss_chunks(grad, pred, pred_dtype, pred_batch_stride, x0, t, tab, L, source, step, prediction);
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    for (int64_t c = 0; c < L.chunks_per_sample; ++c) sum += partial[b * L.chunks_per_sample + c];
    per_sample[b] = static_cast<float>(sum / static_cast<double>(N));
  }
}

}  // namespace fastddpm
