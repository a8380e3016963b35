// prune_neurons_ on CUDA: one launch zeroes the rows of each input projection (and bias), one the columns of fc_out.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"

namespace surgery {

template <typename T>
__global__ void zero_rows(T* w, T* bias, const int64_t* idx, int64_t n, int64_t cols) {
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n * cols; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = t / cols, c = t % cols;
    w[idx[j] * cols + c] = T(0);
    if (bias != nullptr && c == 0) bias[idx[j]] = T(0);
  }
}

template <typename T>
__global__ void zero_cols(T* w, const int64_t* idx, int64_t n, int64_t rows, int64_t H) {
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n * rows; t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = t / n, j = t % n;  // consecutive threads: one row, neighbouring neurons
    w[r * H + idx[j]] = T(0);
  }
}

static int blocks_for(int64_t work) { return (int)std::min<int64_t>((work + 255) / 256, 65535); }

// Launcher only: validation and registration live in ops_cuda.cpp (host C++), so nothing here throws.
cudaError_t prune_neurons_launch(at::TensorList fc_in, at::TensorList bias, const at::Tensor& fc_out,
                                 const at::Tensor& neurons) {
  const int64_t n = neurons.numel();
  const c10::cuda::CUDAGuard guard(fc_out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t k = 0; k < fc_in.size(); ++k) {
    const int64_t cols = fc_in[k].size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fc_in[k].scalar_type(), "prune_rows", [&] {
      scalar_t* b = bias.empty() ? nullptr : bias[k].data_ptr<scalar_t>();
      zero_rows<scalar_t><<<blocks_for(n * cols), 256, 0, stream>>>(fc_in[k].data_ptr<scalar_t>(), b,
                                                                     neurons.data_ptr<int64_t>(), n, cols);
    });
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, fc_out.scalar_type(), "prune_cols", [&] {
    zero_cols<scalar_t><<<blocks_for(n * fc_out.size(0)), 256, 0, stream>>>(
        fc_out.data_ptr<scalar_t>(), neurons.data_ptr<int64_t>(), n, fc_out.size(0), fc_out.size(1));
  });
  return cudaGetLastError();
}

}  // namespace surgery
