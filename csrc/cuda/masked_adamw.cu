// masked_adamw_ (dense state) and sparse_adamw_ (compact state) on CUDA: multi-tensor launches of the block
// bodies in multi_tensor.cuh, fp32 math.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "multi_tensor.cuh"

namespace surgery {

template <typename Body, typename Arg>
__global__ void __launch_bounds__(mt::kThreads) multi_tensor_kernel(const __grid_constant__ mt::Table t, Arg arg) {
  Body::block(t, blockIdx.x, threadIdx.x, arg);
}

static std::vector<mt::Entry> entries(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList sel, bool dense, at::ScalarType dtype) {
  std::vector<mt::Entry> out;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool mine = params[i].scalar_type() == dtype;  // other dtypes: n = 0, skipped by plan
    out.push_back({params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr<float>(),
                   exp_avg_sqs[i].data_ptr<float>(), sel[i].data_ptr(),
                   mine ? (dense ? params[i].numel() : sel[i].numel()) : 0, params[i].numel()});
  }
  return out;
}

template <typename Body, typename Arg>
static cudaError_t launch(const std::vector<mt::Entry>& es, Arg arg) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const mt::Table& t : mt::plan(es, Body::CHUNK, Body::ALIGN_PG, Body::ALIGN_SEL)) {
    multi_tensor_kernel<Body, Arg><<<mt::blocks(t), mt::kThreads, 0, stream>>>(t, arg);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <template <typename> class Body>
static cudaError_t adamw_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList sel, const AdamW& opt) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {  // one plan per dtype present
    const auto es = entries(params, grads, exp_avgs, exp_avg_sqs, sel, Body<float>::DENSE, dtype);
    const cudaError_t e = dtype == at::kFloat      ? launch<Body<float>>(es, opt)
                          : dtype == at::kBFloat16 ? launch<Body<c10::BFloat16>>(es, opt)
                                                   : launch<Body<c10::Half>>(es, opt);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Launchers only: validation and registration live in ops_cuda.cpp (host C++), so nothing here throws.
cudaError_t masked_adamw_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList masks, const AdamW& opt) {
  return adamw_launch<mt::Dense>(params, grads, exp_avgs, exp_avg_sqs, masks, opt);
}

cudaError_t sparse_adamw_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList indices, const AdamW& opt) {
  return adamw_launch<mt::Compact>(params, grads, exp_avgs, exp_avg_sqs, indices, opt);
}

// bad: int32 [len(params)] zeros on the params' device; entry i set to 1 if indices[i] leaves [0, numel).
cudaError_t index_range_launch(at::TensorList params, at::TensorList indices, const at::Tensor& bad) {
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<mt::Entry> es;
  for (size_t i = 0; i < params.size(); ++i) {
    es.push_back({nullptr, nullptr, nullptr, nullptr, indices[i].data_ptr(), indices[i].numel(), params[i].numel()});
  }
  return launch<mt::IndexRange>(es, bad.data_ptr<int>());
}

}  // namespace surgery
