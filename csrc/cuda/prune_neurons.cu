// prune_neurons_ on CUDA: one launch of the zeroing jobs in prune_neurons.cuh for every input projection, bias
// and fc_out.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "prune_neurons.cuh"

namespace surgery {

__global__ void __launch_bounds__(mt::kThreads) zero_kernel(const __grid_constant__ mt::ZeroJobs t) {
  mt::Zero::block(t, blockIdx.x, threadIdx.x);
}

// Launcher only: validation and registration live in ops_cuda.cpp (host C++), so nothing here throws.
cudaError_t prune_neurons_launch(at::TensorList fc_in, at::TensorList bias, const at::Tensor& fc_out,
                                 const at::Tensor& neurons) {
  const c10::cuda::CUDAGuard guard(fc_out.device());
  std::vector<mt::ZeroJob> jobs;
  for (size_t k = 0; k < fc_in.size(); ++k) {
    const int es = fc_in[k].element_size();
    jobs.push_back({mt::ZeroJobs::ROWS, fc_in[k].data_ptr(), es, fc_in[k].size(1) * es, 1, 0});
    if (!bias.empty()) {
      const int bes = bias[k].element_size();
      jobs.push_back({mt::ZeroJobs::ROWS, bias[k].data_ptr(), bes, bes, 1, 0});
    }
  }
  const int es = fc_out.element_size();
  jobs.push_back({mt::ZeroJobs::COLS, fc_out.data_ptr(), es, es, fc_out.size(0), fc_out.size(1) * es});
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const mt::ZeroJobs& t : mt::plan_zero(jobs, neurons.data_ptr<int64_t>(), neurons.numel())) {
    zero_kernel<<<mt::blocks(t), mt::kThreads, 0, stream>>>(t);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace surgery
