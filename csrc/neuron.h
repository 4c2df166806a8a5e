// Host-side pieces of the neuron op shared by the CPU (cpu/neuron.cpp) and CUDA
// (cuda/neuron.cu) kernels: the parameter block and the defensive input checks
// (user-facing validation happens once in spikingir/ops/neuron.py).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>

namespace spikingir {

// Per-channel parameters (C values each; channel of neuron m = (m / inner) % C)
// and the flags of one call.
struct Params {
  const float* theta;
  const float* beta;
  const float* alpha;
  int64_t C, inner;
  float reuse_alpha;
  bool reuse_step, scale_output, detach_reset;
};

inline void check_common(const at::Tensor& t, const at::Tensor& theta, const at::Tensor& beta,
                         const at::Tensor& alpha, int64_t inner, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, "spikingir neuron (", c10::DeviceTypeName(device, true),
              "): expected ", c10::DeviceTypeName(device), " tensors");
  TORCH_CHECK(t.dim() >= 1 && t.size(0) >= 1, "spikingir neuron: expected x of shape [T, ...], T >= 1");
  TORCH_CHECK(t.is_contiguous(), "spikingir neuron: expected contiguous inputs");
  for (const auto* q : {&theta, &beta, &alpha}) {
    TORCH_CHECK(q->scalar_type() == at::kFloat && q->dim() == 1 && q->is_contiguous() &&
                    q->device() == t.device(),
                "spikingir neuron: theta/beta/alpha must be contiguous 1-d float32 on the input's device");
  }
  TORCH_CHECK(beta.numel() == theta.numel() && alpha.numel() == theta.numel(),
              "spikingir neuron: theta, beta and alpha must have the same length C");
  // x is [T, M] with M = B x C x inner (channel c of element m: (m / inner) % C):
  // C = 0 or an M that is no multiple of C x inner would divide by zero or drop
  // elements from the per-channel sums. Written so that C x inner cannot overflow.
  const int64_t C = theta.numel(), M = t.numel() / t.size(0);
  TORCH_CHECK(C >= 1, "spikingir neuron: theta must have at least one channel");
  TORCH_CHECK(inner >= 1 && (M == 0 || (inner <= M && C <= M / inner && M % (C * inner) == 0)),
              "spikingir neuron: the size of one step, ", M, ", must be a multiple of C x inner = ",
              C, " x ", inner);
}

inline Params make_params(const at::Tensor& theta, const at::Tensor& beta, const at::Tensor& alpha,
                          int64_t inner, double reuse_alpha, bool reuse_step, bool scale_output,
                          bool detach_reset) {
  return Params{theta.data_ptr<float>(), beta.data_ptr<float>(), alpha.data_ptr<float>(),
                theta.numel(), inner, static_cast<float>(reuse_alpha), reuse_step,
                scale_output, detach_reset};
}

}  // namespace spikingir
