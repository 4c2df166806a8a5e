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
      "bool detach_reset, SymInt inner, int save_bytes) -> (Tensor, Tensor, Tensor)");
  // Backward of neuron_fwd through time. Returns (grad_x like x, grad_v0 float32,
  // grad_theta [C], grad_beta [C]); parameter gradients are zeros unless asked for.
  m.def(
      "neuron_bwd(Tensor grad_y, Tensor? grad_v, Tensor saved, Tensor theta, "
      "Tensor beta, Tensor alpha, int surrogate, float reuse_alpha, bool reuse_step, "
      "bool scale_output, bool detach_reset, SymInt inner, bool need_theta_grad, "
      "bool need_beta_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same two ops implemented by the Triton kernels in kernels/neuron.py.
  m.def(
      "neuron_fwd_triton(Tensor x, Tensor theta, Tensor beta, Tensor? v0, Tensor alpha, "
      "int surrogate, float reuse_alpha, bool reuse_step, bool scale_output, "
      "bool detach_reset, SymInt inner, int save_bytes) -> (Tensor, Tensor, Tensor)");
  m.def(
      "neuron_bwd_triton(Tensor grad_y, Tensor? grad_v, Tensor saved, Tensor theta, "
      "Tensor beta, Tensor alpha, int surrogate, float reuse_alpha, bool reuse_step, "
      "bool scale_output, bool detach_reset, SymInt inner, bool need_theta_grad, "
      "bool need_beta_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // Inference-only forward of the same neuron that emits its binary spikes as
  // channel masks, the input spikingir::spike_conv2d_fwd_masks takes (no float
  // spike tensor is written; nothing is kept for backward; no autograd).
  //   x      [T, N, C, P...] float32/float16/bfloat16, contiguous (P...: spatial),
  //          or [1, N, C, P...]: the same input current at every step
  //   steps  T (the number of steps simulated; x.size(0) is T or 1)
  //   theta  [C] or [1] float32 (beta, the reuse step's spike size, does not
  //          change which neurons fire: it is applied by the consumer)
  //   v0     optional [N, C, P...] float32, or [C]: one initial potential per channel
  // Returns (masks int64 [T, N, P..., ceil(C / 64)]: bit c % 64 of word c / 64
  // is the spike of channel c at that step and pixel; v_final float32 [N, C, P...]).
  // The spikes are exactly those of neuron_fwd with the same arguments.
  m.def(
      "neuron_fwd_masks(Tensor x, Tensor theta, Tensor? v0, float reuse_alpha, "
      "bool reuse_step, int steps) -> (Tensor, Tensor)");
  m.def(
      "neuron_fwd_masks_triton(Tensor x, Tensor theta, Tensor? v0, float reuse_alpha, "
      "bool reuse_step, int steps) -> (Tensor, Tensor)");
  // Convolution of binary spike maps (DESIGN.md section 4), groups = 1, no dilation.
  //   s        [N, Cin, H, W] float32/float16/bfloat16, contiguous, values 0 or 1
  //            (checked when validate is true)
  //   weight   [Cout, Cin, kh, kw] float32, contiguous;  bias  optional [Cout] float32
  //   dense_rate  firing rate above which the dense path runs (> 1: never)
  //   validate    raise a ValueError unless s holds only 0 and 1 (the CPU kernel
  //               checks in its packing pass; the CUDA kernel leaves it to the caller)
  // Returns (out float32 [N, Cout, Ho, Wo], packed): packed holds the spikes for
  // backward, 1 bit each, as uint8 [N, Cin, H, ceil(W / 8)] (bit b of byte j is
  // pixel 8 j + b), or an empty tensor when save is false.
  m.def(
      "spike_conv2d_fwd(Tensor s, Tensor weight, Tensor? bias, int stride, int padding, "
      "float dense_rate, bool validate, bool save) -> (Tensor, Tensor)");
  // Backward of spike_conv2d_fwd from the packed spikes. Returns (grad_s float32
  // [N, Cin, height, width], grad_weight float32, grad_bias float32 [Cout]); a
  // gradient not asked for is an empty tensor.
  m.def(
      "spike_conv2d_bwd(Tensor grad_out, Tensor packed, Tensor weight, SymInt height, "
      "SymInt width, int stride, int padding, float dense_rate, bool need_s, bool need_weight, "
      "bool need_bias) -> (Tensor, Tensor, Tensor)");
  // Inference-only spike_conv2d_fwd of spikes given as channel masks (the
  // output of neuron_fwd_masks, steps merged into N):
  //   masks    int64 [N, H, W, ceil(channels / 64)], bit c % 64 of word c / 64 =
  //            spike of input channel c at (n, y, x); bits >= channels are 0
  //   channels Cin (== weight.size(1))
  // Returns out float32 [N, Cout, Ho, Wo], equal to spike_conv2d_fwd on the
  // same spikes (the CPU kernel: bitwise equal).
  m.def(
      "spike_conv2d_fwd_masks(Tensor masks, int channels, Tensor weight, Tensor? bias, "
      "int stride, int padding, float dense_rate) -> Tensor");
  m.def(
      "spike_conv2d_fwd_masks_triton(Tensor masks, int channels, Tensor weight, Tensor? bias, "
      "int stride, int padding, float dense_rate) -> Tensor");
  // The same, written into `out` (contiguous float32 [N, Cout, Ho, Wo], e.g. a
  // slice of a larger output: two weight sets, one output, no copy).
  m.def(
      "spike_conv2d_fwd_masks_out(Tensor masks, int channels, Tensor weight, Tensor? bias, "
      "int stride, int padding, float dense_rate, Tensor(a!) out) -> ()");
  m.def(
      "spike_conv2d_fwd_masks_out_triton(Tensor masks, int channels, Tensor weight, "
      "Tensor? bias, int stride, int padding, float dense_rate, Tensor(a!) out) -> ()");
  // The same two ops implemented by the Triton kernels in kernels/spike_conv.py.
  m.def(
      "spike_conv2d_fwd_triton(Tensor s, Tensor weight, Tensor? bias, int stride, int padding, "
      "float dense_rate, bool validate, bool save) -> (Tensor, Tensor)");
  m.def(
      "spike_conv2d_bwd_triton(Tensor grad_out, Tensor packed, Tensor weight, SymInt height, "
      "SymInt width, int stride, int padding, float dense_rate, bool need_s, bool need_weight, "
      "bool need_bias) -> (Tensor, Tensor, Tensor)");
}
