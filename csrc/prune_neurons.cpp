// prune_neurons_ on CPU: zero rows `neurons` of each input projection and bias, columns of fc_out.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

namespace surgery {

void prune_neurons_cpu(at::TensorList fc_in, at::TensorList bias, const at::Tensor& fc_out, const at::Tensor& neurons) {
  check_prune(fc_in, bias, fc_out, neurons);
  bump_versions(fc_in), bump_versions(bias), bump_versions(fc_out);
  const int64_t n = neurons.numel(), D = fc_out.size(0), H = fc_out.size(1);
  const int64_t* idx = neurons.data_ptr<int64_t>();
  for (size_t k = 0; k < fc_in.size(); ++k) {
    const int64_t cols = fc_in[k].size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fc_in[k].scalar_type(), "prune_rows", [&] {
      scalar_t* w = fc_in[k].data_ptr<scalar_t>();
      at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
        for (int64_t j = a; j < b; ++j) std::fill_n(w + idx[j] * cols, cols, scalar_t(0));
      });
      if (!bias.empty()) {
        scalar_t* bb = bias[k].data_ptr<scalar_t>();
        for (int64_t j = 0; j < n; ++j) bb[idx[j]] = scalar_t(0);
      }
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fc_out.scalar_type(), "prune_cols", [&] {
    scalar_t* w = fc_out.data_ptr<scalar_t>();
    at::parallel_for(0, D, 64, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r)
        for (int64_t j = 0; j < n; ++j) w[r * H + idx[j]] = scalar_t(0);
    });
  });
}

TORCH_LIBRARY_IMPL(surgery, CPU, m) { m.impl("prune_neurons_", &prune_neurons_cpu); }

}  // namespace surgery
