// Argument validation shared by the CPU and CUDA kernels: a bad call raises, it never touches memory.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "adamw.h"

namespace surgery {

// Tell autograd the tensors are about to be written in place, as ATen's in-place ops do: a backward that saved one
// of them then raises instead of silently reading the new values. Called after the checks, before any write; an
// inference tensor outside inference mode is refused here, with torch's own message.
inline void bump_versions(at::TensorList ts) {
  for (const auto& t : ts) t.unsafeGetTensorImpl()->bump_version();
}

inline bool is_weight_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

inline void check_prune(at::TensorList fc_in, at::TensorList bias, const at::Tensor& fc_out,
                        const at::Tensor& neurons) {
  TORCH_CHECK(!fc_in.empty(), "prune_neurons_: fc_in is empty");
  TORCH_CHECK(bias.empty() || bias.size() == fc_in.size(), "prune_neurons_: ", bias.size(), " biases for ",
              fc_in.size(), " input projections");
  TORCH_CHECK(fc_out.dim() == 2 && fc_out.is_contiguous(), "prune_neurons_: fc_out must be a contiguous [D, H] matrix, got ",
              fc_out.sizes(), fc_out.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(is_weight_dtype(fc_out), "prune_neurons_: fc_out must be fp32, fp64, bf16 or fp16, got ",
              fc_out.scalar_type());
  const int64_t H = fc_out.size(1);
  for (size_t k = 0; k < fc_in.size(); ++k) {
    TORCH_CHECK(fc_in[k].dim() == 2 && fc_in[k].size(0) == H && fc_in[k].is_contiguous(), "prune_neurons_: fc_in[", k,
                "] must be a contiguous [", H, ", D] matrix, got ", fc_in[k].sizes(),
                fc_in[k].is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(is_weight_dtype(fc_in[k]), "prune_neurons_: fc_in[", k, "] must be fp32, fp64, bf16 or fp16, got ",
                fc_in[k].scalar_type());
    TORCH_CHECK(fc_in[k].device() == fc_out.device(), "prune_neurons_: fc_in[", k, "] is on ", fc_in[k].device(),
                ", fc_out on ", fc_out.device());
    if (!bias.empty()) {
      TORCH_CHECK(bias[k].dim() == 1 && bias[k].size(0) == H && bias[k].is_contiguous() &&
                  bias[k].device() == fc_out.device() && bias[k].scalar_type() == fc_in[k].scalar_type(),
                  "prune_neurons_: fc_in_bias[", k, "] must be a contiguous [", H, "] ", fc_in[k].scalar_type(),
                  " vector on ", fc_out.device());
    }
  }
  TORCH_CHECK(neurons.dim() == 1 && neurons.scalar_type() == at::kLong && neurons.is_contiguous(),
              "prune_neurons_: neurons must be a contiguous int64 [n] tensor");
  TORCH_CHECK(neurons.device() == fc_out.device(), "prune_neurons_: neurons on ", neurons.device(), ", weights on ",
              fc_out.device());
  if (neurons.numel()) {
    auto lo = neurons.min().item<int64_t>(), hi = neurons.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < H, "prune_neurons_: neuron index out of range [0, ", H, "): min ", lo, ", max ", hi);
  }
}

// True when idx[0..n) is strictly increasing (so distinct: no two updates race on one entry) and lies in
// [0, limit). One parallel pass; each chunk also compares its first entry with the one before it.
inline bool indices_ordered(const int* idx, int64_t n, int64_t limit) {
  if (n == 0) return true;
  if (idx[0] < 0 || idx[n - 1] >= limit) return false;
  std::atomic<bool> ordered{true};
  at::parallel_for(1, n, 1 << 16, [&](int64_t a, int64_t b) {
    bool ok = true;
    for (int64_t k = a; k < b; ++k) ok &= idx[k] > idx[k - 1];
    if (!ok) ordered = false;
  });
  return ordered;
}

// No tensor the op writes may share memory with another tensor it writes or reads: the result would depend on the
// order of the updates, and on the GPU they race. Tensors it only reads may share memory. Sorted spans, one sweep
// (the tensors are contiguous, checked before, so a span is exactly the tensor's memory).
inline void check_no_overlap(const char* op, at::TensorList params, at::TensorList grads, at::TensorList m,
                             at::TensorList v, at::TensorList sel, bool dense) {
  struct Span {
    uintptr_t start, end;
    bool written;
    const char* name;
    size_t i;
  };
  std::vector<Span> spans;
  auto add = [&](at::TensorList ts, bool written, const char* name) {
    for (size_t i = 0; i < ts.size(); ++i) {
      if (!ts[i].numel()) continue;
      const auto start = reinterpret_cast<uintptr_t>(ts[i].data_ptr());
      spans.push_back({start, start + ts[i].nbytes(), written, name, i});
    }
  };
  add(params, true, "params"), add(m, true, "exp_avgs"), add(v, true, "exp_avg_sqs");
  add(grads, false, "grads"), add(sel, false, dense ? "masks" : "indices");
  // stable: ties keep the order above, and the twin (surgery/ops/checks.py) names the same pair
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
  const Span *end_written = nullptr, *end_any = nullptr;  // the span reaching furthest so far, of each kind
  for (const auto& s : spans) {
    const Span* other = end_written && s.start < end_written->end       ? end_written
                        : s.written && end_any && s.start < end_any->end ? end_any
                                                                        : nullptr;
    TORCH_CHECK(!other, op, ": ", s.name, "[", s.i, "] shares memory with ", other->name, "[", other->i,
                "]; the params and the state it writes must not share memory with each other or with the grads, "
                "masks or indices");
    if (!end_any || s.end > end_any->end) end_any = &s;
    if (s.written && (!end_written || s.end > end_written->end)) end_written = &s;
  }
}

// sel: masks (dense: bool, same shape as the param) or indices (compact: int32 [nnz], state [nnz]). The index
// order and range check reads the indices; CUDA skips it here and runs one batched check instead (a sync per
// tensor would cost more than the update itself).
inline void check_adamw(const char* op, at::TensorList params, at::TensorList grads, at::TensorList m,
                        at::TensorList v, at::TensorList sel, bool dense, int64_t step, double beta1, double beta2,
                        bool index_range = true) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && m.size() == n && v.size() == n && sel.size() == n, op,
              ": lists differ in length (params ", n, ", grads ", grads.size(), ", exp_avgs ", m.size(),
              ", exp_avg_sqs ", v.size(), dense ? ", masks " : ", indices ", sel.size(), ")");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1, got ", step);
  // 1 - beta^step is a divisor (bias correction): beta = 1 would turn every updated entry into inf or nan
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op, ": beta1 and beta2 must lie in [0, 1), got ",
              beta1, " and ", beta2);
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const auto dev = p.device();
    TORCH_CHECK(dev == params[0].device(), op, ": params[", i, "] is on ", dev, ", params[0] on ", params[0].device());
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                op, ": params[", i, "] must be fp32, bf16 or fp16, got ", p.scalar_type());
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() && grads[i].sizes() == p.sizes(), op, ": grads[", i,
                "] must match params[", i, "] (", p.sizes(), " ", p.scalar_type(), "), got ", grads[i].sizes(), " ",
                grads[i].scalar_type());
    const auto state = dense ? p.sizes() : sel[i].sizes();
    TORCH_CHECK(m[i].scalar_type() == at::kFloat && v[i].scalar_type() == at::kFloat && m[i].sizes() == state &&
                v[i].sizes() == state, op, ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be fp32 of shape ", state);
    if (dense) {
      TORCH_CHECK(sel[i].scalar_type() == at::kBool && sel[i].sizes() == p.sizes(), op, ": masks[", i,
                  "] must be bool of shape ", p.sizes());
    } else {
      TORCH_CHECK(sel[i].scalar_type() == at::kInt && sel[i].dim() == 1, op, ": indices[", i, "] must be int32 [nnz]");
    }
    for (const auto* t : {&grads[i], &m[i], &v[i], &sel[i]}) {
      TORCH_CHECK(t->device() == dev, op, ": tensors of entry ", i, " are on different devices (", dev, ", ",
                  t->device(), ")");
    }
    const std::pair<const char*, const at::Tensor*> named[] = {
        {"params", &p}, {"grads", &grads[i]}, {"exp_avgs", &m[i]}, {"exp_avg_sqs", &v[i]},
        {dense ? "masks" : "indices", &sel[i]}};
    for (const auto& [name, t] : named) {
      TORCH_CHECK(t->is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    }
    if (!dense && index_range) {
      TORCH_CHECK(indices_ordered(sel[i].data_ptr<int>(), sel[i].numel(), p.numel()), op, ": indices[", i,
                  "] must be strictly increasing and in range [0, ", p.numel(), ")");
    }
  }
  check_no_overlap(op, params, grads, m, v, sel, dense);
}

}  // namespace surgery
