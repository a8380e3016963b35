// CUDA entry points: validate in host C++ (TORCH_CHECK raises cleanly from here), then call the launchers
// in the .cu files, and turn a launch error into a Python exception.
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../checks.h"

namespace surgery {

cudaError_t prune_neurons_launch(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&);
cudaError_t masked_adamw_launch(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                const AdamW&);
cudaError_t sparse_adamw_launch(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                const AdamW&);
cudaError_t index_range_launch(at::TensorList, at::TensorList, const at::Tensor&);

static void ok(cudaError_t e, const char* op) { TORCH_CHECK(e == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(e)); }

void prune_neurons_cuda(at::TensorList fc_in, at::TensorList bias, const at::Tensor& fc_out, const at::Tensor& neurons) {
  check_prune(fc_in, bias, fc_out, neurons);
  bump_versions(fc_in), bump_versions(bias), bump_versions(fc_out);
  if (neurons.numel()) ok(prune_neurons_launch(fc_in, bias, fc_out, neurons), "prune_neurons_");
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList masks, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
  check_adamw("masked_adamw_", params, grads, exp_avgs, exp_avg_sqs, masks, true, step, beta1, beta2);
  bump_versions(params), bump_versions(exp_avgs), bump_versions(exp_avg_sqs);
  if (params.empty()) return;
  ok(masked_adamw_launch(params, grads, exp_avgs, exp_avg_sqs, masks, AdamW(step, lr, beta1, beta2, eps, weight_decay)),
     "masked_adamw_");
}

void sparse_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList indices, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
  check_adamw("sparse_adamw_", params, grads, exp_avgs, exp_avg_sqs, indices, false, step, beta1, beta2,
              /*index_range=*/false);
  if (params.empty()) return;
  // All index lists order- and range-checked in one launch and one device-to-host copy, before anything is written.
  const at::Tensor bad = at::zeros({(int64_t)params.size()}, indices[0].options().dtype(at::kInt));
  ok(index_range_launch(params, indices, bad), "sparse_adamw_");
  const at::Tensor flags = bad.cpu();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(flags.data_ptr<int>()[i] == 0, "sparse_adamw_: indices[", i,
                "] must be strictly increasing and in range [0, ", params[i].numel(), ")");
  }
  bump_versions(params), bump_versions(exp_avgs), bump_versions(exp_avg_sqs);
  ok(sparse_adamw_launch(params, grads, exp_avgs, exp_avg_sqs, indices, AdamW(step, lr, beta1, beta2, eps, weight_decay)),
     "sparse_adamw_");
}

TORCH_LIBRARY_IMPL(surgery, CUDA, m) {
  m.impl("prune_neurons_", &prune_neurons_cuda);
  m.impl("masked_adamw_", &masked_adamw_cuda);
  m.impl("sparse_adamw_", &sparse_adamw_cuda);
}

}  // namespace surgery
