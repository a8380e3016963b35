// Host emulation of the CUDA optimizer kernels (csrc/cuda/multi_tensor.cuh): plans the launches exactly as
// csrc/cuda/masked_adamw.cu does, runs every block and thread of every launch one after another, and checks
// against the scalar AdamW update: updated entries equal, masked-out entries bit-identical, every vector access
// aligned (asserts in load/store), out-of-range and out-of-order indices flagged. Built and run by
// test_cuda_emulation.py.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdio>
#include <random>

#include "cuda/multi_tensor.cuh"
#include "cuda/prune_neurons.cuh"

using namespace surgery;

static std::mt19937 rng(1234);

template <typename Body, typename Arg>
static int run(const std::vector<mt::Entry>& es, Arg arg) {
  int launches = 0;
  for (const mt::Table& t : mt::plan(es, Body::CHUNK, Body::ALIGN_PG, Body::ALIGN_SEL)) {
    for (int64_t b = 0; b < mt::blocks(t); ++b)
      for (int th = 0; th < mt::kThreads; ++th) Body::block(t, b, th, arg);
    ++launches;
  }
  return launches;
}

template <typename T>
struct Case {  // one param: storage with room to start `offset` entries in (misaligned views)
  std::vector<T> p, g, p0;
  std::vector<float> m, v, m0, v0;
  std::vector<char> keep;  // bool storage
  std::vector<int> idx;
  std::vector<float> cm, cv;  // compact moments
  int64_t n, off;
  Case(int64_t n_, int64_t off_, double density) : n(n_), off(off_) {
    std::normal_distribution<float> nd;
    std::uniform_real_distribution<double> u;
    for (int64_t j = 0; j < n + off; ++j) {
      p.push_back(T(nd(rng))), g.push_back(T(nd(rng)));
      m.push_back(0.1f * nd(rng)), v.push_back(std::abs(0.1f * nd(rng)));
      keep.push_back(u(rng) < density);
    }
    if (n > 9000) std::fill(keep.begin() + off + 5000, keep.begin() + off + 9000, 0);  // a run of all-false vectors
    p0 = p, m0 = m, v0 = v;
    for (int64_t j = 0; j < n; ++j)
      if (keep[off + j]) idx.push_back(int(j)), cm.push_back(m[off + j]), cv.push_back(v[off + j]);
  }
  mt::Entry dense() {
    return {p.data() + off, g.data() + off, m.data() + off, v.data() + off, keep.data() + off, n, n};
  }
  mt::Entry compact() { return {p.data() + off, g.data() + off, cm.data(), cv.data(), idx.data(), (int64_t)idx.size(), n}; }
};

template <typename T>
static bool same(T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

template <typename T>
static int check_dtype(const char* name) {
  const AdamW opt(3, 1e-2, 0.9, 0.999, 1e-8, 0.1);
  // sizes around the vector width and the chunk, an empty tensor, and more tensors than one launch holds
  std::vector<int64_t> sizes = {1, 3, 4, 5, 7, 8, 9, 31, 1000, 4095, 4096, 4097, 8191, 8192, 8193, 20000, 0};
  while (sizes.size() < mt::kMaxTensors + 9) sizes.push_back(1 + (int64_t)(rng() % 3000));
  std::vector<Case<T>> dense_cases, compact_cases;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t off = i % 3 == 2 ? 1 : 0;  // every third tensor is a misaligned view: scalar path
    dense_cases.emplace_back(sizes[i], off, i % 5 == 0 ? 1.0 : 0.3);
    compact_cases.emplace_back(sizes[i], off, 0.3);
  }
  std::vector<mt::Entry> de, ce;
  for (auto& c : dense_cases) de.push_back(c.dense());
  for (auto& c : compact_cases) ce.push_back(c.compact());
  const int ld = run<mt::Dense<T>>(de, opt), lc = run<mt::Compact<T>>(ce, opt);

  int errors = 0, vec_tensors = 0;
  for (const auto& t : mt::plan(de, mt::Dense<T>::CHUNK, mt::Dense<T>::ALIGN_PG, mt::Dense<T>::ALIGN_SEL))
    for (int c = 0; c < t.count; ++c) vec_tensors += t.vec[c];
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto& d = dense_cases[i];
    auto& s = compact_cases[i];
    for (int64_t j = 0; j < d.n + d.off; ++j) {
      float p = static_cast<float>(d.p0[j]), m = d.m0[j], v = d.v0[j];
      const bool upd = j >= d.off && d.keep[j];
      if (upd) opt.update(p, static_cast<float>(d.g[j]), m, v);
      const bool ok = upd ? same(d.p[j], static_cast<T>(p)) && same(d.m[j], m) && same(d.v[j], v)
                          : same(d.p[j], d.p0[j]) && same(d.m[j], d.m0[j]) && same(d.v[j], d.v0[j]);
      if (!ok && errors++ < 5) std::printf("%s dense: tensor %zu entry %lld wrong\n", name, i, (long long)j);
    }
    std::vector<T> expect = s.p0;
    for (size_t k = 0; k < s.idx.size(); ++k) {
      const int64_t j = s.off + s.idx[k];
      float p = static_cast<float>(s.p0[j]), m = s.m[s.off + s.idx[k]], v = s.v[s.off + s.idx[k]];
      opt.update(p, static_cast<float>(s.g[j]), m, v);
      expect[j] = static_cast<T>(p);
      if (!(same(s.cm[k], m) && same(s.cv[k], v)) && errors++ < 5)
        std::printf("%s compact: tensor %zu state %zu wrong\n", name, i, k);
    }
    for (size_t j = 0; j < expect.size(); ++j)
      if (!same(s.p[j], expect[j]) && errors++ < 5) std::printf("%s compact: tensor %zu param %zu wrong\n", name, i, j);
  }
  std::printf("%s: %zu tensors, %d+%d launches, %d vector-path tensors, %d errors\n", name, sizes.size(), ld, lc,
              vec_tensors, errors);
  return errors + (ld < 2 ? 1 : 0) + (vec_tensors == 0 ? 1 : 0);
}

static int check_index_range() {
  // Long lists run the vector path over several chunks: 0, 1, ..., n-1, then one defect each.
  const int n = int(2 * mt::IndexRange::CHUNK + 1000);
  std::vector<int> ramp(n);
  for (int k = 0; k < n; ++k) ramp[k] = k;
  std::vector<std::vector<int>> lists = {ramp, {0, 99}, {0, 100}, {-1}, {}, {}, {4, 3}, {0, 1, -2, 3, 4, 5, 6, 7},
                                         ramp, ramp, ramp, ramp, {3, 3}};
  std::vector<int64_t> limits = {4400, 100, 100, 4, 4, 4, 5, 9, n, n, n, n, 5};
  lists[9][4320] = lists[9][4319];  // a duplicate across two vectors
  lists[10][4322] = lists[10][4321];  // a duplicate inside one vector
  const auto c = mt::IndexRange::CHUNK;
  lists[11][c] = lists[11][c - 1];  // a duplicate across two chunks (two blocks)
  std::vector<mt::Entry> es;
  for (size_t i = 0; i < lists.size(); ++i)
    es.push_back({nullptr, nullptr, nullptr, nullptr, lists[i].data(), (int64_t)lists[i].size(), limits[i]});
  std::vector<int> bad(lists.size(), 0), expect = {1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1};
  run<mt::IndexRange>(es, bad.data());
  int errors = 0;
  for (size_t i = 0; i < bad.size(); ++i) errors += bad[i] != expect[i];
  std::printf("index range: %d errors\n", errors);
  return errors;
}

// prune_neurons_: input projections [H, D] (D with and without 16-byte rows, one misaligned), biases, fc_out
// [Dout, H]; more jobs than one launch holds. Pruned rows and columns must be zero, everything else untouched.
template <typename T>
static int check_prune(const char* name) {
  const int64_t H = 300;
  std::vector<int64_t> idx;
  for (int64_t h = 0; h < H; ++h)
    if (rng() % 3 == 0) idx.push_back(h);
  std::shuffle(idx.begin(), idx.end(), rng);
  std::vector<std::vector<T>> mats;
  std::vector<int64_t> cols, offs;
  for (int k = 0; k < 10; ++k) {
    cols.push_back(k % 2 ? 64 : 37 + k), offs.push_back(k == 5 ? 1 : 0);  // 64·2 or 64·4 bytes: vector rows
    mats.emplace_back(offs.back() + H * cols.back());
    mats.emplace_back(offs.back() + H);  // bias
  }
  const int64_t dout = 45;
  mats.emplace_back(H * dout);  // fc_out
  std::normal_distribution<float> nd;
  for (auto& m : mats)
    for (auto& x : m) x = T(nd(rng) + 3.0f);  // never zero before pruning
  auto before = mats;
  std::vector<mt::ZeroJob> jobs;
  const int es = sizeof(T);
  for (int k = 0; k < 10; ++k) {
    jobs.push_back({mt::ZeroJobs::ROWS, mats[2 * k].data() + offs[k], es, cols[k] * es, 1, 0});
    jobs.push_back({mt::ZeroJobs::ROWS, mats[2 * k + 1].data() + offs[k], es, es, 1, 0});
  }
  jobs.push_back({mt::ZeroJobs::COLS, mats.back().data(), es, es, dout, H * es});
  int launches = 0, vec_jobs = 0;
  for (const auto& t : mt::plan_zero(jobs, idx.data(), (int64_t)idx.size())) {
    for (int c = 0; c < t.count; ++c) vec_jobs += t.vec[c];
    for (int64_t b = 0; b < mt::blocks(t); ++b)
      for (int th = 0; th < mt::kThreads; ++th) mt::Zero::block(t, b, th);
    ++launches;
  }
  std::vector<bool> pruned(H, false);
  for (auto h : idx) pruned[h] = true;
  int errors = 0;
  auto expect = [&](const std::vector<T>& m, const std::vector<T>& b, size_t at, bool zero) {
    const bool ok = zero ? static_cast<float>(m[at]) == 0.0f : same(m[at], b[at]);
    if (!ok && errors++ < 5) std::printf("%s prune: entry %zu wrong\n", name, at);
  };
  for (int k = 0; k < 10; ++k) {
    for (int64_t j = 0; j < offs[k] + H * cols[k]; ++j)
      expect(mats[2 * k], before[2 * k], j, j >= offs[k] && pruned[(j - offs[k]) / cols[k]]);
    for (int64_t j = 0; j < offs[k] + H; ++j) expect(mats[2 * k + 1], before[2 * k + 1], j, j >= offs[k] && pruned[j - offs[k]]);
  }
  for (int64_t j = 0; j < H * dout; ++j) expect(mats.back(), before.back(), j, pruned[j % H]);
  std::printf("%s prune: %zu neurons, %d launches, %d vector-row jobs, %d errors\n", name, idx.size(), launches,
              vec_jobs, errors);
  return errors + (launches < 2) + (vec_jobs == 0);
}

int main() {
  int errors = check_dtype<float>("fp32") + check_dtype<c10::BFloat16>("bf16") + check_dtype<c10::Half>("fp16") +
               check_index_range() + check_prune<float>("fp32") + check_prune<c10::BFloat16>("bf16") +
               check_prune<double>("fp64");
  std::printf(errors ? "FAILED\n" : "OK\n");
  return errors ? 1 : 0;
}
