// The AdamW update of one entry, shared by the CPU kernels, the CUDA kernels and the host emulation of the
// CUDA kernels (tests/ops/cuda_emulation.cpp): no ATen here.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SURGERY_HD __host__ __device__
#else
#define SURGERY_HD
#endif

namespace surgery {

struct AdamW {
  float lr, beta1, beta2, eps, wd, bc1, bc2_sqrt;
  AdamW(int64_t step, double lr_, double b1, double b2, double eps_, double wd_)
      : lr(lr_), beta1(b1), beta2(b2), eps(eps_), wd(wd_),
        bc1(1.0 - std::pow(b1, (double)step)), bc2_sqrt(std::sqrt(1.0 - std::pow(b2, (double)step))) {}
  // torch.optim.AdamW's order: p *= 1 - lr·wd; m = lerp(m, g, 1-β1); v = β2·v + (1-β2)·g²;
  // denom = √v/√(1-β2^t) + eps; p -= lr/(1-β1^t) · m/denom.
  SURGERY_HD inline void update(float& p, float g, float& m, float& v) const {
    p *= 1.0f - lr * wd;
    m += (1.0f - beta1) * (g - m);
    v = beta2 * v + (1.0f - beta2) * g * g;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    p -= (lr / bc1) * (m / denom);
  }
};

}  // namespace surgery
