// masked_adamw_ (dense state) and sparse_adamw_ (compact state) on CPU: fp32 math, at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "checks.h"

namespace surgery {

constexpr int64_t kRun = 4096;  // entries per gather-and-update run of the dense op

// Positions of the set bytes of keep[0..n) into hit, in order; returns how many. Branch-free per byte, with an
// 8-byte test that skips the all-false words of a sparse mask (92 % of them at 1 % density).
inline int32_t gather(const uint8_t* keep, int64_t n, int32_t* hit) {
  int32_t count = 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    uint64_t word;
    std::memcpy(&word, keep + j, 8);
    if (word == 0) continue;
    for (int64_t q = j; q < j + 8; ++q) {
      hit[count] = static_cast<int32_t>(q);
      count += keep[q] != 0;
    }
  }
  for (; j < n; ++j) {
    hit[count] = static_cast<int32_t>(j);
    count += keep[j] != 0;
  }
  return count;
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList masks, int64_t step, double lr, double beta1, double beta2, double eps,
                      double weight_decay) {
  check_adamw("masked_adamw_", params, grads, exp_avgs, exp_avg_sqs, masks, true, step, beta1, beta2);
  bump_versions(params), bump_versions(exp_avgs), bump_versions(exp_avg_sqs);
  const AdamW opt(step, lr, beta1, beta2, eps, weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "masked_adamw_", [&] {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      float* m = exp_avgs[i].data_ptr<float>();
      float* v = exp_avg_sqs[i].data_ptr<float>();
      const uint8_t* keep = reinterpret_cast<const uint8_t*>(masks[i].data_ptr<bool>());
      at::parallel_for(0, params[i].numel(), kRun, [&](int64_t a, int64_t b) {
        // Gather the run's masked entries first (branch-free), then update them back to back: a sparse mask
        // then keeps many independent loads in flight instead of one per mispredicted branch.
        int32_t hit[kRun];
        for (int64_t c = a; c < b; c += kRun) {
          const int32_t n = gather(keep + c, std::min(b, c + kRun) - c, hit);
          for (int32_t k = 0; k < n; ++k) {
            const int64_t j = c + hit[k];
            float pj = static_cast<float>(p[j]);
            opt.update(pj, static_cast<float>(g[j]), m[j], v[j]);
            p[j] = static_cast<scalar_t>(pj);
          }
        }
      });
    });
  }
}

void sparse_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList indices, int64_t step, double lr, double beta1, double beta2, double eps,
                      double weight_decay) {
  check_adamw("sparse_adamw_", params, grads, exp_avgs, exp_avg_sqs, indices, false, step, beta1, beta2);
  bump_versions(params), bump_versions(exp_avgs), bump_versions(exp_avg_sqs);
  const AdamW opt(step, lr, beta1, beta2, eps, weight_decay);
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "sparse_adamw_", [&] {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      float* m = exp_avgs[i].data_ptr<float>();
      float* v = exp_avg_sqs[i].data_ptr<float>();
      const int* idx = indices[i].data_ptr<int>();
      at::parallel_for(0, indices[i].numel(), 4096, [&](int64_t a, int64_t b) {
        for (int64_t k = a; k < b; ++k) {
          const int j = idx[k];
          float pj = static_cast<float>(p[j]);
          opt.update(pj, static_cast<float>(g[j]), m[k], v[k]);
          p[j] = static_cast<scalar_t>(pj);
        }
      });
    });
  }
}

TORCH_LIBRARY_IMPL(surgery, CPU, m) {
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("sparse_adamw_", &sparse_adamw_cpu);
}

}  // namespace surgery
