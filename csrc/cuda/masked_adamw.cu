// masked_adamw_ (dense state) and sparse_adamw_ (compact state) on CUDA: fp32 math, grid-stride loops.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

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
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return (int)std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, sms * 8));
}

// Launchers only: validation and registration live in ops_cuda.cpp (host C++), so nothing here throws.
cudaError_t masked_adamw_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList masks, const AdamW& opt) {
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
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t sparse_adamw_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList indices, const AdamW& opt) {
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
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace surgery
