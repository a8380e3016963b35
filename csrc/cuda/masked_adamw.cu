// masked_adamw_ (dense state) and sparse_adamw_ (compact state) on CUDA: fp32 math, grid-stride loops.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace surgery {

template <typename T>
__global__ void masked_adamw_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, const bool* __restrict__ keep, int64_t n, AdamW opt) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
    if (!keep[j]) continue;
    float pj = static_cast<float>(p[j]), mj = m[j], vj = v[j];
    opt.update(pj, static_cast<float>(g[j]), mj, vj);
    p[j] = static_cast<T>(pj);
    m[j] = mj;
    v[j] = vj;
  }
}

template <typename T>
__global__ void sparse_adamw_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, const int* __restrict__ idx, int64_t nnz, AdamW opt) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < nnz; k += (int64_t)gridDim.x * blockDim.x) {
    const int j = idx[k];
    float pj = static_cast<float>(p[j]), mk = m[k], vk = v[k];
    opt.update(pj, static_cast<float>(g[j]), mk, vk);
    p[j] = static_cast<T>(pj);
    m[k] = mk;
    v[k] = vk;
  }
}

static int grid(int64_t n) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return (int)std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, sms * 8));
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList masks, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
  check_adamw("masked_adamw_", params, grads, exp_avgs, exp_avg_sqs, masks, true, step);
  if (params.empty()) return;
  const AdamW opt(step, lr, beta1, beta2, eps, weight_decay);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "masked_adamw_", [&] {
      masked_adamw_kernel<scalar_t><<<grid(n), 256, 0, stream>>>(
          params[i].data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(), exp_avgs[i].data_ptr<float>(),
          exp_avg_sqs[i].data_ptr<float>(), masks[i].data_ptr<bool>(), n, opt);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void sparse_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList indices, int64_t step, double lr, double beta1, double beta2, double eps,
                       double weight_decay) {
  check_adamw("sparse_adamw_", params, grads, exp_avgs, exp_avg_sqs, indices, false, step);
  if (params.empty()) return;
  const AdamW opt(step, lr, beta1, beta2, eps, weight_decay);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t nnz = indices[i].numel();
    if (nnz == 0) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "sparse_adamw_", [&] {
      sparse_adamw_kernel<scalar_t><<<grid(nnz), 256, 0, stream>>>(
          params[i].data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(), exp_avgs[i].data_ptr<float>(),
          exp_avg_sqs[i].data_ptr<float>(), indices[i].data_ptr<int>(), nnz, opt);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

TORCH_LIBRARY_IMPL(surgery, CUDA, m) {
  m.impl("masked_adamw_", &masked_adamw_cuda);
  m.impl("sparse_adamw_", &sparse_adamw_cuda);
}

}  // namespace surgery
