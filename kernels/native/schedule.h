// The kernel ABI's enums and the rows of `Coefficients.table` (fastddpm/schedule.py), in order.
// fastddpm.kernels.library compares `names()` (module.cpp) with the Python side when it loads.
#pragma once

#include <cstdint>

namespace fastddpm {

// fastddpm.options.PREDICTIONS and VARIANCES: a choice's code is the index of its name.
enum Prediction : int { kEps = 0, kX0 = 1, kV = 2 };
enum Variance : int { kFixedSmall = 0, kFixedLarge = 1, kLearnedRange = 2 };
inline constexpr const char* kPredictionNames[] = {"eps", "x0", "v"};
inline constexpr const char* kVarianceNames[] = {"fixed_small", "fixed_large", "learned_range"};

enum Row : int {
  kBetas,
  kAlphasCumprod,
  kAlphasCumprodPrev,
  kSqrtAlphasCumprod,
  kSqrtOneMinusAlphasCumprod,
  kSqrtRecipAlphasCumprod,
  kSqrtRecipm1AlphasCumprod,
  kPosteriorMeanCoef1,
  kPosteriorMeanCoef2,
  kPosteriorVariance,
  kPosteriorLogVarianceClipped,
  kLogBetas,
  kLogLargeVariance,
  kNumRows,
};

inline constexpr const char* kRowNames[kNumRows] = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "log_betas",
    "log_large_variance",
};

// The rows of a DPM-Solver++ chain's table (fastddpm/solvers.py ROWS), in order: step i's α_s, σ_s
// and its update's coefficients x ← cx x + c0 m0 + c1 m1 + c2 m2 + cz z.
enum SolverRow : int { kAlphaS, kSigmaS, kCx, kC0, kC1, kC2, kCz, kNumSolverRows };
inline constexpr const char* kSolverRowNames[kNumSolverRows] = {"alpha_s", "sigma_s", "cx", "c0", "c1", "c2", "cz"};

// table[row, t] of the float32 [rows, T] table.
struct Table {
  const float* data;
  int64_t T;
  float at(int row, int64_t t) const { return data[row * T + t]; }
};

// x̂₀ = from_x · x_t − from_pred · pred for eps and v prediction (reference.predict_x0); x0
// prediction takes pred itself and leaves both 0.
struct X0Coef {
  float from_x = 0.0f, from_pred = 0.0f;
};

inline X0Coef x0_coef(const Table& tab, int64_t t, int prediction) {
  if (prediction == kEps) return {tab.at(kSqrtRecipAlphasCumprod, t), tab.at(kSqrtRecipm1AlphasCumprod, t)};
  if (prediction == kV) return {tab.at(kSqrtAlphasCumprod, t), tab.at(kSqrtOneMinusAlphasCumprod, t)};
  return {};
}

}  // namespace fastddpm
