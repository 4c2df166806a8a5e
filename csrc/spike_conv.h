// Shapes of spike_conv2d shared by the CPU (cpu/spike_conv.cpp) and CUDA
// (cuda/spike_conv.cu) kernels. Schemas: csrc/ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace spikingir {

// Input [N, Cin, H, W] (bit-packed rows: Wb = ceil(W / 8) bytes), weight
// [Cout, Cin, kh, kw], output [N, Cout, Ho, Wo] for zero padding `pad`.
struct Geometry {
  int64_t N, Cin, H, W, Wb, Cout, kh, kw, Ho, Wo, stride, pad;
};

inline Geometry geometry(int64_t N, int64_t Cin, int64_t H, int64_t W, const at::Tensor& weight,
                         int64_t stride, int64_t pad) {
  Geometry g;
  g.N = N;
  g.Cin = Cin;
  g.H = H;
  g.W = W;
  g.Wb = (W + 7) / 8;
  g.Cout = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.stride = stride;
  g.pad = pad;
  g.Ho = (H + 2 * pad - g.kh) / stride + 1;
  g.Wo = (W + 2 * pad - g.kw) / stride + 1;
  return g;
}

}  // namespace spikingir
