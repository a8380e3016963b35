// Multi-tensor launches for the optimizer ops: one launch updates up to kMaxTensors tensors, each block one
// chunk of one tensor, each thread 16-byte vectors (scalar loads only for a tensor's last VEC-1 entries, or
// for a tensor whose pointers are not aligned for vectors).
//
// Block bodies are plain functions of (table, block, thread), compiled for the device by the .cu files and
// for the host by tests/ops/cuda_emulation.cpp, which runs every block and thread of the planned grid and
// checks the result against the scalar update and every vector access for alignment. Threads of a block
// share nothing, so running them one after another is exact.
#pragma once
#include <cassert>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../adamw.h"

namespace surgery::mt {

constexpr int kThreads = 256;    // threads per block
constexpr int kIters = 4;        // vectors per thread per block
constexpr int kMaxTensors = 32;  // per launch: the table is a ~2 KB kernel argument (limit 4 KB)

// VEC entries moved as one access: 16 bytes (two 16-byte accesses for 8 fp32 moments).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T x[N];
};

template <typename V, typename T>
SURGERY_HD inline V load(const T* ptr) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const V*>(ptr);
#else
  assert(reinterpret_cast<uintptr_t>(ptr) % alignof(V) == 0 && "misaligned vector load");
  V out;
  std::memcpy(&out, ptr, sizeof(V));
  return out;
#endif
}

template <typename V, typename T>
SURGERY_HD inline void store(T* ptr, const V& val) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(ptr) = val;
#else
  assert(reinterpret_cast<uintptr_t>(ptr) % alignof(V) == 0 && "misaligned vector store");
  std::memcpy(ptr, &val, sizeof(V));
#endif
}

// One launch's tensors, passed by value as the kernel argument. Entry i covers blocks
// [first_block[i], first_block[i+1]); `sel` is a bool mask (dense) or int32 indices (compact).
struct Table {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  float* m[kMaxTensors];
  float* v[kMaxTensors];
  const void* sel[kMaxTensors];
  int64_t n[kMaxTensors];      // entries to update: numel (dense) or nnz (compact)
  int64_t limit[kMaxTensors];  // numel of the param: the bound on indices (compact)
  int64_t first_block[kMaxTensors + 1];
  int index[kMaxTensors];      // position in the op's argument lists
  bool vec[kMaxTensors];       // every vector-accessed pointer is aligned
  int count;
};

struct Entry {
  void* p;
  const void* g;
  float* m;
  float* v;
  const void* sel;
  int64_t n, limit;
};

inline bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Split the entries into launches of at most kMaxTensors non-empty tensors, `chunk` entries per block.
// Vector access needs p and g aligned to `align_pg` bytes (1: gathered, not vector-accessed), m and v to 16,
// sel to `align_sel`.
inline std::vector<Table> plan(const std::vector<Entry>& entries, int64_t chunk, int align_pg, int align_sel) {
  std::vector<Table> launches;
  Table t{};
  for (size_t k = 0; k < entries.size(); ++k) {
    const Entry& e = entries[k];
    if (e.n == 0) continue;
    if (t.count == kMaxTensors) {
      launches.push_back(t);
      t = Table{};
    }
    const int c = t.count++;
    t.p[c] = e.p, t.g[c] = e.g, t.m[c] = e.m, t.v[c] = e.v, t.sel[c] = e.sel;
    t.n[c] = e.n, t.limit[c] = e.limit, t.index[c] = static_cast<int>(k);
    t.vec[c] = aligned(e.p, align_pg) && aligned(e.g, align_pg) && aligned(e.m, 16) && aligned(e.v, 16) &&
               aligned(e.sel, align_sel);
    t.first_block[c + 1] = t.first_block[c] + (e.n + chunk - 1) / chunk;
  }
  if (t.count) launches.push_back(t);
  return launches;
}

inline int64_t blocks(const Table& t) { return t.first_block[t.count]; }

// What one block covers: entries [lo, hi) of tensor i, as VEC-wide vectors up to `tail`, scalars after it.
struct Span {
  int i;
  int64_t lo, hi, tail;
};

template <int VEC>
SURGERY_HD inline Span span(const Table& t, int64_t block, int64_t chunk) {
  int i = 0;
  while (block >= t.first_block[i + 1]) ++i;
  const int64_t lo = (block - t.first_block[i]) * chunk, hi = lo + chunk < t.n[i] ? lo + chunk : t.n[i];
  return {i, lo, hi, t.vec[i] ? lo + (hi - lo) / VEC * VEC : lo};
}

// Dense state: entries with mask false are not touched (a vector with no true lane is not even loaded).
template <typename T>
struct Dense {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int64_t CHUNK = int64_t(kThreads) * VEC * kIters;
  static constexpr int ALIGN_PG = 16, ALIGN_SEL = VEC;
  static constexpr bool DENSE = true;

  SURGERY_HD static void block(const Table& t, int64_t block, int thread, const AdamW& opt) {
    const auto [i, lo, hi, tail] = span<VEC>(t, block, CHUNK);
    T* p = static_cast<T*>(t.p[i]);
    const T* g = static_cast<const T*>(t.g[i]);
    float *m = t.m[i], *v = t.v[i];
    const bool* keep = static_cast<const bool*>(t.sel[i]);
    for (int64_t j = lo + int64_t(thread) * VEC; j < tail; j += int64_t(kThreads) * VEC) {
      const auto k = load<Vec<bool, VEC>>(keep + j);
      bool any = false;
      for (int e = 0; e < VEC; ++e) any |= k.x[e];
      if (!any) continue;
      auto pv = load<Vec<T, VEC>>(p + j);
      const auto gv = load<Vec<T, VEC>>(g + j);
      auto mv = load<Vec<float, VEC>>(m + j);
      auto vv = load<Vec<float, VEC>>(v + j);
      for (int e = 0; e < VEC; ++e) {
        if (!k.x[e]) continue;  // the lane's loaded bits are stored back unchanged
        float pe = static_cast<float>(pv.x[e]);
        opt.update(pe, static_cast<float>(gv.x[e]), mv.x[e], vv.x[e]);
        pv.x[e] = static_cast<T>(pe);
      }
      store(p + j, pv);
      store(m + j, mv);
      store(v + j, vv);
    }
    for (int64_t j = tail + thread; j < hi; j += kThreads) {
      if (!keep[j]) continue;
      float pj = static_cast<float>(p[j]);
      opt.update(pj, static_cast<float>(g[j]), m[j], v[j]);
      p[j] = static_cast<T>(pj);
    }
  }
};

// Compact state: indices and moments read as vectors, params and grads gathered. Indices must be distinct
// (as built from a mask); they are range-checked by IndexRange before the update.
template <typename T>
struct Compact {
  static constexpr int VEC = 4;
  static constexpr int64_t CHUNK = int64_t(kThreads) * VEC * kIters;
  static constexpr int ALIGN_PG = 1, ALIGN_SEL = 16;
  static constexpr bool DENSE = false;

  SURGERY_HD static void block(const Table& t, int64_t block, int thread, const AdamW& opt) {
    const auto [i, lo, hi, tail] = span<VEC>(t, block, CHUNK);
    T* p = static_cast<T*>(t.p[i]);
    const T* g = static_cast<const T*>(t.g[i]);
    float *m = t.m[i], *v = t.v[i];
    const int* idx = static_cast<const int*>(t.sel[i]);
    for (int64_t k = lo + int64_t(thread) * VEC; k < tail; k += int64_t(kThreads) * VEC) {
      const auto jv = load<Vec<int, VEC>>(idx + k);
      auto mv = load<Vec<float, VEC>>(m + k);
      auto vv = load<Vec<float, VEC>>(v + k);
      for (int e = 0; e < VEC; ++e) {
        const int j = jv.x[e];
        float pj = static_cast<float>(p[j]);
        opt.update(pj, static_cast<float>(g[j]), mv.x[e], vv.x[e]);
        p[j] = static_cast<T>(pj);
      }
      store(m + k, mv);
      store(v + k, vv);
    }
    for (int64_t k = tail + thread; k < hi; k += kThreads) {
      const int j = idx[k];
      float pj = static_cast<float>(p[j]);
      opt.update(pj, static_cast<float>(g[j]), m[k], v[k]);
      p[j] = static_cast<T>(pj);
    }
  }
};

// bad[index[i]] = 1 when an index of tensor i lies outside [0, limit[i]) or is not greater than the one before it
// (the compact update needs distinct indices: two equal ones would race). Same plan as Compact.
struct IndexRange {
  static constexpr int VEC = Compact<float>::VEC;
  static constexpr int64_t CHUNK = Compact<float>::CHUNK;
  static constexpr int ALIGN_PG = 1, ALIGN_SEL = Compact<float>::ALIGN_SEL;

  SURGERY_HD static void block(const Table& t, int64_t block, int thread, int* bad) {
    const auto [i, lo, hi, tail] = span<VEC>(t, block, CHUNK);
    const int* idx = static_cast<const int*>(t.sel[i]);
    bool out = false;
    for (int64_t k = lo + int64_t(thread) * VEC; k < tail; k += int64_t(kThreads) * VEC) {
      const auto jv = load<Vec<int, VEC>>(idx + k);
      int prev = k > 0 ? idx[k - 1] : -1;
      for (int e = 0; e < VEC; ++e) {
        out |= jv.x[e] <= prev || jv.x[e] >= t.limit[i];
        prev = jv.x[e];
      }
    }
    for (int64_t k = tail + thread; k < hi; k += kThreads)
      out |= idx[k] <= (k > 0 ? idx[k - 1] : -1) || idx[k] >= t.limit[i];
    if (out) bad[t.index[i]] = 1;  // every writer stores the same value
  }
};

}  // namespace surgery::mt
