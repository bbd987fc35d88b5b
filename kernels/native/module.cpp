// fastddpm._native: the CPU kernels of kernels/README.md as a pybind11 module. Buffers are
// passed as addresses (`tensor.data_ptr()`), so the module needs no torch headers; the caller
// owns shapes, dtypes and contiguity. Every op releases the GIL. A noise address of 0 means
// "draw the contract's".
#include <pybind11/pybind11.h>

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"
#include "ops.h"
#include "philox.h"
#include "schedule.h"

namespace py = pybind11;
using namespace fastddpm;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <size_t K>
py::tuple tuple_of(const char* const (&names)[K]) {
  py::tuple out(K);
  for (size_t i = 0; i < K; ++i) out[i] = py::str(names[i]);
  return out;
}

// The names whose indices the kernels take as codes, for the Python side to compare with its own.
py::dict names() {
  py::dict out;
  out["rows"] = tuple_of(kRowNames);
  out["predictions"] = tuple_of(kPredictionNames);
  out["variances"] = tuple_of(kVarianceNames);
  out["model_dtypes"] = tuple_of(kDTypeNames);
  out["solver_rows"] = tuple_of(kSolverRowNames);
  return out;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastddpm's native CPU kernels (kernels/native): reverse_step, q_sample, simple_loss, vlb_terms, solver_step, "
            "normal";
  auto release = py::call_guard<py::gil_scoped_release>();

  m.def("names", &names, "The table rows, predictions, variances and model dtypes, in the order of their codes.");
  m.def("has_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("max_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });

  m.def(
      "philox",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
        const Words w = philox4x32_10(c0, c1, c2, c3, seed);
        return py::make_tuple(w.w0, w.w1, w.w2, w.w3);
      },
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("seed"),
      "Philox4x32-10 of one counter: 4 uint32 words.");

  m.def(
      "normal",
      [](uintptr_t out, int64_t B, int64_t N, uint64_t seed, int64_t sample_base, int64_t step, int64_t stream) {
        normal(ptr<float>(out), B, N, seed, sample_base, step, stream);
      },
      py::arg("out_ptr"), py::arg("B"), py::arg("N"), py::arg("seed"), py::arg("sample_base"), py::arg("step"),
      py::arg("stream"), release, "Fill float32 [B, N] with the contract's normals.");

  m.def(
      "reverse_step",
      [](uintptr_t out, uintptr_t x, uintptr_t model, int model_dtype, int64_t model_batch_stride, uintptr_t t,
         uintptr_t table, int64_t T, int64_t B, int64_t N, uintptr_t noise, uint64_t seed, int64_t sample_base,
         int prediction, int variance, bool clip, bool ddim, double eta, bool guided, double guidance) {
        reverse_step(ptr<float>(out), ptr<const float>(x), ptr<const void>(model), model_dtype, model_batch_stride,
                     ptr<const int64_t>(t), ptr<const float>(table), T, B, N, ptr<const float>(noise), seed,
                     sample_base, prediction, variance, clip, ddim, eta, guided, guidance);
      },
      py::arg("out_ptr"), py::arg("x_ptr"), py::arg("model_ptr"), py::arg("model_dtype"),
      py::arg("model_batch_stride"), py::arg("t_ptr"), py::arg("table_ptr"), py::arg("T"), py::arg("B"),
      py::arg("N"), py::arg("noise_ptr"), py::arg("seed"), py::arg("sample_base"), py::arg("prediction"),
      py::arg("variance"), py::arg("clip"), py::arg("ddim"), py::arg("eta"), py::arg("guided"), py::arg("guidance"),
      release,
      "reference.reverse_step into float32 [B, N] (noise_ptr 0: generated at step t[b], stream 1; guided: the model "
      "output holds 2B rows, conditional then unconditional).");

  m.def(
      "q_sample",
      [](uintptr_t out, uintptr_t x0, uintptr_t t, uintptr_t table, int64_t T, int64_t B, int64_t N, uintptr_t noise,
         uint64_t seed, int64_t sample_base, int64_t step) {
        q_sample(ptr<float>(out), ptr<const float>(x0), ptr<const int64_t>(t), ptr<const float>(table), T, B, N,
                 ptr<const float>(noise), seed, sample_base, step);
      },
      py::arg("out_ptr"), py::arg("x0_ptr"), py::arg("t_ptr"), py::arg("table_ptr"), py::arg("T"), py::arg("B"),
      py::arg("N"), py::arg("noise_ptr"), py::arg("seed"), py::arg("sample_base"), py::arg("step"), release,
      "reference.q_sample into float32 [B, N] (noise_ptr 0: generated at `step`, stream 2).");

  m.def(
      "simple_loss",
      [](uintptr_t per_sample, uintptr_t grad, uintptr_t pred, int pred_dtype, int64_t pred_batch_stride,
         uintptr_t x0, uintptr_t t, uintptr_t table, int64_t T, int64_t B, int64_t N, uintptr_t noise, uint64_t seed,
         int64_t sample_base, int64_t step, int prediction) {
        simple_loss(ptr<float>(per_sample), ptr<float>(grad), ptr<const void>(pred), pred_dtype, pred_batch_stride,
                    ptr<const float>(x0), ptr<const int64_t>(t), ptr<const float>(table), T, B, N,
                    ptr<const float>(noise), seed, sample_base, step, prediction);
      },
      py::arg("per_sample_ptr"), py::arg("grad_ptr"), py::arg("pred_ptr"), py::arg("pred_dtype"),
      py::arg("pred_batch_stride"), py::arg("x0_ptr"), py::arg("t_ptr"), py::arg("table_ptr"), py::arg("T"),
      py::arg("B"), py::arg("N"), py::arg("noise_ptr"), py::arg("seed"), py::arg("sample_base"), py::arg("step"),
      py::arg("prediction"), release,
      "Per-sample MSE [B] of reference.simple_loss and its gradient 2 (pred - target) / N, [B, N].");

  m.def(
      "vlb_terms",
      [](uintptr_t out, uintptr_t model, int model_dtype, int64_t model_batch_stride, uintptr_t x0, uintptr_t xt,
         uintptr_t t, uintptr_t table, int64_t T, int64_t B, int64_t N, int prediction, int variance, bool clip,
         int64_t levels) {
        vlb_terms(ptr<float>(out), ptr<const void>(model), model_dtype, model_batch_stride, ptr<const float>(x0),
                  ptr<const float>(xt), ptr<const int64_t>(t), ptr<const float>(table), T, B, N, prediction, variance,
                  clip, levels);
      },
      py::arg("out_ptr"), py::arg("model_ptr"), py::arg("model_dtype"), py::arg("model_batch_stride"),
      py::arg("x0_ptr"), py::arg("xt_ptr"), py::arg("t_ptr"), py::arg("table_ptr"), py::arg("T"), py::arg("B"),
      py::arg("N"), py::arg("prediction"), py::arg("variance"), py::arg("clip"), py::arg("levels"), release,
      "reference.vlb_terms: float32 [B] bits/dim (KL for t > 0, decoder NLL at t = 0).");

  m.def(
      "solver_step",
      [](uintptr_t x, uintptr_t model, int model_dtype, int64_t model_batch_stride, uintptr_t step, uintptr_t t,
         uintptr_t table, int64_t M, int64_t B, int64_t N, uintptr_t history, int64_t slots, bool stochastic,
         uintptr_t noise, uint64_t seed, int64_t sample_base, int prediction, bool clip, bool guided, double guidance) {
        solver_step(ptr<float>(x), ptr<const void>(model), model_dtype, model_batch_stride, ptr<const int64_t>(step),
                    ptr<const int64_t>(t), ptr<const float>(table), M, B, N, ptr<float>(history), slots, stochastic,
                    ptr<const float>(noise), seed, sample_base, prediction, clip, guided, guidance);
      },
      py::arg("x_ptr"), py::arg("model_ptr"), py::arg("model_dtype"), py::arg("model_batch_stride"),
      py::arg("step_ptr"), py::arg("t_ptr"), py::arg("table_ptr"), py::arg("M"), py::arg("B"), py::arg("N"),
      py::arg("history_ptr"), py::arg("slots"), py::arg("stochastic"), py::arg("noise_ptr"), py::arg("seed"),
      py::arg("sample_base"), py::arg("prediction"), py::arg("clip"), py::arg("guided"), py::arg("guidance"), release,
      "reference.solver_step in place: x and history [slots, B, N] (noise_ptr 0: drawn at step t[b], stream 1; "
      "guided: as reverse_step's).");
}
