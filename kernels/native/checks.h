// Argument checks shared by the ops, run before any thread starts (a bad t would read outside
// the table). They throw std::invalid_argument, which pybind11 raises as ValueError.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "dtype.h"
#include "schedule.h"

namespace fastddpm {

// Throws message() where ok is false; the message is only built then (the checks run on every
// call, t's once per sample).
template <class Message>
inline void require(bool ok, Message&& message) {
  if (!ok) throw std::invalid_argument(message());
}

inline void check_sizes(int64_t B, int64_t N) {
  require(B >= 0 && N >= 0,
          [&] { return "B and N must be >= 0, got B=" + std::to_string(B) + ", N=" + std::to_string(N); });
}

inline void check_pointer(const void* p, const char* name) {
  require(p != nullptr, [&] { return std::string(name) + " must not be a null pointer"; });
}

// Every index[b] in [0, T): the column it reads (t of the schedule's table, or a solver's step).
inline void check_timesteps(const int64_t* index, int64_t B, int64_t T, const char* name = "t") {
  require(T >= 1, [&] { return "T must be >= 1, got " + std::to_string(T); });
  for (int64_t b = 0; b < B; ++b) {
    require(index[b] >= 0 && index[b] < T, [&] {
      return std::string(name) + " out of range: " + name + "[" + std::to_string(b) + "] = " +
             std::to_string(index[b]) + ", values must lie in [0, " + std::to_string(T - 1) + "]";
    });
  }
}

// What every op checks before reading: no null buffer (``buffers``, then the index and the table)
// and every index[b] inside the table.
inline void check_inputs(std::initializer_list<std::pair<const void*, const char*>> buffers, const int64_t* index,
                         const float* table, int64_t B, int64_t T, const char* index_name = "t") {
  for (const auto& [pointer, name] : buffers) check_pointer(pointer, name);
  check_pointer(index, index_name);
  check_pointer(table, "table");
  check_timesteps(index, B, T, index_name);
}

inline void check_model(int dtype, int64_t batch_stride, int64_t N, bool learned) {
  require(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, [&] {
    return "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype);
  });
  const int64_t need = learned ? 2 * N : N;
  require(batch_stride >= need, [&] {
    return "model batch stride " + std::to_string(batch_stride) + " is smaller than " + std::to_string(need) +
           (learned ? " (2N: learned_range)" : " (N)");
  });
}

inline void check_prediction(int prediction) {
  require(prediction == kEps || prediction == kX0 || prediction == kV,
          [&] { return "prediction must be 0 (eps), 1 (x0) or 2 (v), got " + std::to_string(prediction); });
}

inline void check_variance(int variance) {
  require(variance == kFixedSmall || variance == kFixedLarge || variance == kLearnedRange, [&] {
    return "variance must be 0 (fixed_small), 1 (fixed_large) or 2 (learned_range), got " + std::to_string(variance);
  });
}

// Calls f(std::integral_constant<int, v>) for the runtime value v in [0, 3): a template
// instance per dtype / prediction, so each inner loop is branch-free and vectorizes.
template <class F>
inline void dispatch3(int v, F&& f) {
  if (v == 0) f(std::integral_constant<int, 0>{});
  else if (v == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

// Calls f(std::bool_constant<v>) for the runtime flag v: a template instance for each.
template <class F>
inline void dispatch_bool(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace fastddpm
