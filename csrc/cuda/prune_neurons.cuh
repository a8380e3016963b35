// prune_neurons_ as one launch of zeroing jobs: the rows `neurons` of every input projection and bias (contiguous
// byte runs, 16-byte stores where aligned) and the columns `neurons` of fc_out (one element per row and neuron).
// Zeroing needs only the element size, so one kernel serves every dtype. Block bodies are host-testable like
// the optimizer's (tests/ops/cuda_emulation.cpp).
#pragma once
#include "multi_tensor.cuh"

namespace surgery::mt {

constexpr int kMaxJobs = 16;

// Job i zeroes, for every neuron j: kind ROWS, the `row_bytes` bytes at base + idx[j]·row_bytes; kind COLS, the
// element at base + r·stride_bytes + idx[j]·elem for every row r < rows.
struct ZeroJobs {
  enum Kind : int { ROWS, COLS };
  char* base[kMaxJobs];
  int64_t row_bytes[kMaxJobs], rows[kMaxJobs], stride_bytes[kMaxJobs], units_per_neuron[kMaxJobs];
  int64_t first_block[kMaxJobs + 1];
  int kind[kMaxJobs], elem[kMaxJobs];
  bool vec[kMaxJobs];
  const int64_t* idx;
  int64_t n;  // neurons
  int count;
};

constexpr int64_t kZeroChunk = int64_t(kThreads) * kIters;  // units per block

struct ZeroJob {
  int kind;
  void* base;
  int elem;
  int64_t row_bytes, rows, stride_bytes;
};

inline std::vector<ZeroJobs> plan_zero(const std::vector<ZeroJob>& jobs, const int64_t* idx, int64_t n) {
  std::vector<ZeroJobs> launches;
  ZeroJobs t{};
  t.idx = idx, t.n = n;
  for (const ZeroJob& jb : jobs) {
    if (n == 0 || jb.row_bytes == 0 || jb.rows == 0) continue;
    if (t.count == kMaxJobs) {
      launches.push_back(t);
      t = ZeroJobs{};
      t.idx = idx, t.n = n;
    }
    const int c = t.count++;
    t.kind[c] = jb.kind, t.base[c] = static_cast<char*>(jb.base), t.elem[c] = jb.elem;
    t.row_bytes[c] = jb.row_bytes, t.rows[c] = jb.rows, t.stride_bytes[c] = jb.stride_bytes;
    t.vec[c] = jb.kind == ZeroJobs::ROWS && aligned(jb.base, 16) && jb.row_bytes % 16 == 0;
    // units: 16-byte vectors or elements of a row per neuron (ROWS), or one element per row (COLS)
    t.units_per_neuron[c] = jb.kind == ZeroJobs::COLS ? jb.rows : jb.row_bytes / (t.vec[c] ? 16 : jb.elem);
    t.first_block[c + 1] = t.first_block[c] + (n * t.units_per_neuron[c] + kZeroChunk - 1) / kZeroChunk;
  }
  if (t.count) launches.push_back(t);
  return launches;
}

inline int64_t blocks(const ZeroJobs& t) { return t.first_block[t.count]; }

SURGERY_HD inline void store_zero(char* ptr, int bytes) {
  switch (bytes) {
    case 16: store(reinterpret_cast<uint32_t*>(ptr), Vec<uint32_t, 4>{}); break;
    case 8: store(reinterpret_cast<uint32_t*>(ptr), Vec<uint32_t, 2>{}); break;
    case 4: store(reinterpret_cast<uint32_t*>(ptr), Vec<uint32_t, 1>{}); break;
    default: store(reinterpret_cast<uint16_t*>(ptr), Vec<uint16_t, 1>{}); break;
  }
}

struct Zero {
  SURGERY_HD static void block(const ZeroJobs& t, int64_t block, int thread) {
    int i = 0;
    while (block >= t.first_block[i + 1]) ++i;
    const int64_t per = t.units_per_neuron[i], total = t.n * per;
    const int64_t lo = (block - t.first_block[i]) * kZeroChunk;
    const int64_t hi = lo + kZeroChunk < total ? lo + kZeroChunk : total;
    for (int64_t u = lo + thread; u < hi; u += kThreads) {
      if (t.kind[i] == ZeroJobs::ROWS) {  // consecutive threads: consecutive vectors of one row
        const int bytes = t.vec[i] ? 16 : t.elem[i];
        store_zero(t.base[i] + t.idx[u / per] * t.row_bytes[i] + (u % per) * bytes, bytes);
      } else {  // consecutive threads: one row, consecutive neurons
        const int64_t r = u / t.n, j = u % t.n;
        store_zero(t.base[i] + r * t.stride_bytes[i] + t.idx[j] * t.elem[i], t.elem[i]);
      }
    }
  }
};

}  // namespace surgery::mt
