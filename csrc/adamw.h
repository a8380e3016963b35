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
  // Every scalar factor is formed in double and rounded once to float, as torch does with its Python-float
  // hyperparameters (forming 1 - β2 from a float β2 instead is off by 1.3e-5 relative at β2 = 0.999).
  float decay, one_minus_beta1, lerp_back, beta2, one_minus_beta2, eps, step_size, bc2_sqrt;
  bool lerp_small;
  AdamW(int64_t step, double lr, double b1, double b2, double eps_, double wd)
      : decay(1.0 - lr * wd), one_minus_beta1(1.0 - b1), lerp_back(1.0f - one_minus_beta1), beta2(b2),
        one_minus_beta2(1.0 - b2), eps(eps_), step_size(lr / (1.0 - std::pow(b1, (double)step))),
        bc2_sqrt(std::sqrt(1.0 - std::pow(b2, (double)step))), lerp_small(one_minus_beta1 < 0.5f) {}
  // torch.optim.AdamW's order: p *= 1 - lr·wd; m = lerp(m, g, 1-β1); v = β2·v + (1-β2)·g²;
  // denom = √v/√(1-β2^t) + eps; p -= lr/(1-β1^t) · m/denom. lerp as ATen's: from the nearer end, so that
  // β1 = 0 gives m = g exactly (weight w = 1-β1 ≥ 0.5: g - (g-m)·(1-w), with 1-w formed in float).
  SURGERY_HD inline void update(float& p, float g, float& m, float& v) const {
    p *= decay;
    m = lerp_small ? m + one_minus_beta1 * (g - m) : g - (g - m) * lerp_back;
    v = beta2 * v + one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    p -= step_size * (m / denom);
  }
};

}  // namespace surgery
