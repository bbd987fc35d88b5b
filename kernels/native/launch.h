// How every op walks its [B, N] elements: in chunks of kChunkGroups Philox groups of one
// sample, each touching four contiguous runs (one per quarter, e = j·Q + g), spread over
// OpenMP threads. Chunk boundaries depend on N only, so per-chunk partial sums reduced in
// chunk order give the same result for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "philox.h"

namespace fastddpm {

// 4 × 1024 floats of noise: 16 KiB, in L1. A 3×32×32 sample is one chunk: its reverse step is
// 4% faster than with 512 (two unequal chunks); 3×64×64 is the same either way (Zen 4).
constexpr int64_t kChunkGroups = 1024;
constexpr int64_t kParallelElements = 1 << 15;  // below this, threads cost more than they save

struct Layout {
  int64_t B, N, Q, chunks_per_sample;
  Layout(int64_t B_, int64_t N_) : B(B_), N(N_), Q((N_ + 3) / 4), chunks_per_sample((Q + kChunkGroups - 1) / kChunkGroups) {}
  int64_t chunks() const { return B * chunks_per_sample; }
};

struct Chunk {
  int64_t index, b, g0, groups;  // index = b · chunks_per_sample + chunk of the sample
};

struct Run {
  int64_t offset, length;  // element offset within the sample, and count
};

// Run j of a chunk: elements j·Q + g0 .. of the sample, cut at N.
inline Run run_of(const Layout& L, const Chunk& c, int j) {
  const int64_t e0 = j * L.Q + c.g0;
  return {e0, std::max<int64_t>(0, std::min(c.groups, L.N - e0))};
}

// Per-thread noise of one chunk: z[j][i] is the noise of element j·Q + g0 + i.
struct NoiseBuffer {
  alignas(64) float z[4][kChunkGroups];
};

// Where a kernel's noise comes from: a given [B, N] float32 buffer, or the contract's normals
// at (seed, sample_base + b, step, stream).
struct NoiseSource {
  const float* given;
  uint64_t seed;
  int64_t sample_base;

  // Pointers to the noise of the chunk's four runs. `needed` false (the noise would be
  // multiplied by 0) gives zeros instead of generating it.
  void fill(const Layout& L, const Chunk& c, uint32_t step, uint32_t stream, bool needed, NoiseBuffer& buf,
            const float* z[4]) const {
    if (given != nullptr) {
      for (int j = 0; j < 4; ++j) z[j] = given + c.b * L.N + j * L.Q + c.g0;
      return;
    }
    if (needed) {
      normal_groups(seed, static_cast<uint32_t>(sample_base + c.b), step, stream, static_cast<uint32_t>(c.g0),
                    c.groups, buf.z[0], buf.z[1], buf.z[2], buf.z[3]);
    } else {
      std::memset(buf.z, 0, sizeof buf.z);
    }
    for (int j = 0; j < 4; ++j) z[j] = buf.z[j];
  }
};

// body(chunk, noise_buffer) for every chunk of every sample, on all threads.
template <class Body>
void for_each_chunk(const Layout& L, Body&& body) {
  const int64_t chunks = L.chunks();
#pragma omp parallel if (L.B * L.N >= kParallelElements)
  {
    NoiseBuffer buf;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t b = i / L.chunks_per_sample, g0 = (i % L.chunks_per_sample) * kChunkGroups;
      body(Chunk{i, b, g0, std::min(kChunkGroups, L.Q - g0)}, buf);
    }
  }
}

}  // namespace fastddpm
