// Every schema of the spikingir op library, in one place.
//
// Device kernels register in their own files (cpu/neuron.cpp, cuda/neuron.cu);
// the Triton backend registers Python implementations of the *_triton schemas
// (spikingir/ops/neuron.py). The Python side adds fake (meta) kernels and
// autograd. Importing spikingir._C runs these registrations; the module exports
// nothing else.
#include <torch/library.h>

TORCH_LIBRARY(spikingir, m) {
  // Fused multi-timestep IF neuron, optionally followed by the MPRN reuse step.
  //   x        [T, M...] float32/float16/bfloat16, contiguous
  //   theta    [C] float32 threshold (C == 1: scalar), channel of neuron m is
  //            (m / inner) % C within one step
  //   beta     [C] float32 reuse-step spike size (ignored unless reuse_step)
  //   v0       optional [M...] float32 initial potential
  //   alpha    [C] float32 surrogate sharpness (backward only)
  // Returns (y like x, v_final float32 [M...], saved): saved is u = h - threshold
  // per neuron-step, all that backward needs, as float32 (save_bytes 4) or
  // bfloat16 (2), or an empty tensor (0: inference, nothing kept).
  m.def(
      "neuron_fwd(Tensor x, Tensor theta, Tensor beta, Tensor? v0, Tensor alpha, "
      "int surrogate, float reuse_alpha, bool reuse_step, bool scale_output, "
      "bool detach_reset, int inner, int save_bytes) -> (Tensor, Tensor, Tensor)");
  // Backward of neuron_fwd through time. Returns (grad_x like x, grad_v0 float32,
  // grad_theta [C], grad_beta [C]); parameter gradients are zeros unless asked for.
  m.def(
      "neuron_bwd(Tensor grad_y, Tensor? grad_v, Tensor saved, Tensor theta, "
      "Tensor beta, Tensor alpha, int surrogate, float reuse_alpha, bool reuse_step, "
      "bool scale_output, bool detach_reset, int inner, bool need_theta_grad, "
      "bool need_beta_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same two ops implemented by the Triton kernels in kernels/neuron.py.
  m.def(
      "neuron_fwd_triton(Tensor x, Tensor theta, Tensor beta, Tensor? v0, Tensor alpha, "
      "int surrogate, float reuse_alpha, bool reuse_step, bool scale_output, "
      "bool detach_reset, int inner, int save_bytes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "neuron_bwd_triton(Tensor grad_y, Tensor? grad_v, Tensor saved, Tensor theta, "
      "Tensor beta, Tensor alpha, int surrogate, float reuse_alpha, bool reuse_step, "
      "bool scale_output, bool detach_reset, int inner, bool need_theta_grad, "
      "bool need_beta_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

