// The native CPU ops of the kernel ABI (kernels/README.md), on raw buffers: every image is a
// contiguous float32 [B, N] (N = C·H·W) unless a batch stride says otherwise, `t` is int64 [B],
// `table` is the float32 [rows, T] `Coefficients.table`. A null noise pointer means "generate
// the contract's normals" (philox.h). Each op is one file, named after it; `normal` is in noise.cpp.
#pragma once

#include <cstdint>

namespace fastddpm {

// Standard normals [B, N] at (seed, sample_base + b, step, stream).
void normal(float* out, int64_t B, int64_t N, uint64_t seed, int64_t sample_base, int64_t step, int64_t stream);

// reference.reverse_step: x_{t−1} [B, N]; DDIM(eta) if ddim, ancestral DDPM otherwise.
// Generated noise is at (seed, sample_base + b, t[b], STREAM_REVERSE). `out` may alias `x`. With
// `guided`, the model output holds 2B rows (conditional, then unconditional) and the step reads
// classifier-free guidance's ε_u + guidance (ε_c − ε_u).
void reverse_step(float* out, const float* x, const void* model, int model_dtype, int64_t model_batch_stride,
                  const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N, const float* noise,
                  uint64_t seed, int64_t sample_base, int prediction, int variance, bool clip, bool ddim, double eta,
                  bool guided, double guidance);

// reference.q_sample: x_t [B, N]; generated noise at (seed, sample_base + b, step, STREAM_TRAIN).
void q_sample(float* out, const float* x0, const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N,
              const float* noise, uint64_t seed, int64_t sample_base, int64_t step);

// reference.simple_loss per sample: per_sample[b] = mean_e (pred − target)², and its gradient
// grad = d per_sample[b] / d pred = 2 (pred − target) / N, [B, N].
void simple_loss(float* per_sample, float* grad, const void* pred, int pred_dtype, int64_t pred_batch_stride,
                 const float* x0, const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N,
                 const float* noise, uint64_t seed, int64_t sample_base, int64_t step, int prediction);

// reference.vlb_terms: [B] bits/dim, KL for t > 0 and the decoder NLL at t = 0.
void vlb_terms(float* out, const void* model, int model_dtype, int64_t model_batch_stride, const float* x0,
               const float* xt, const int64_t* t, const float* table, int64_t T, int64_t B, int64_t N,
               int prediction, int variance, bool clip, int64_t levels);

// reference.solver_step, in place: step[b] is sample b's column of the chain's float32 [7, M] table,
// history holds `slots` (0–2) earlier x̂₀'s [slots, B, N]; with `stochastic`, z is given or drawn at
// (seed, sample_base + b, t[b], STREAM_REVERSE); `guided` and `guidance` as reverse_step's.
void solver_step(float* x, const void* model, int model_dtype, int64_t model_batch_stride, const int64_t* step,
                 const int64_t* t, const float* table, int64_t M, int64_t B, int64_t N, float* history, int64_t slots,
                 bool stochastic, const float* noise, uint64_t seed, int64_t sample_base, int prediction, bool clip,
                 bool guided, double guidance);

}  // namespace fastddpm
