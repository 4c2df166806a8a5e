// Shapes of spike_conv2d shared by the CPU (cpu/spike_conv.cpp) and CUDA
// (cuda/spike_conv.cu) kernels. Schemas: csrc/ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv_transpose2d.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>

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
  // Checked here, where every device's ops compute their shapes: C++ division
  // truncates toward zero, so a kernel one larger than the padded input would give
  // Ho = 1 where F.conv2d (and the fake kernels) give 0; 2 * pad must not overflow.
  TORCH_CHECK(stride >= 1 && pad >= 0 && pad <= (int64_t{1} << 30),
              "spike_conv2d: stride must be >= 1 and padding in [0, 2^30], got stride ", stride,
              ", padding ", pad);
  TORCH_CHECK(H + 2 * pad >= g.kh && W + 2 * pad >= g.kw, "spike_conv2d: kernel ", g.kh, "x",
              g.kw, " larger than the padded input ", H + 2 * pad, "x", W + 2 * pad);
  g.Ho = (H + 2 * pad - g.kh) / stride + 1;
  g.Wo = (W + 2 * pad - g.kw) / stride + 1;
  return g;
}

// Backward checks and dL/ds, the same on every device: grad_out must match the
// geometry, the saved spikes are the 1-bit packing [N, Cin, H, ceil(W / 8)].
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& packed,
                                  const Geometry& g, bool need_weight) {
  TORCH_CHECK(grad_out.size(1) == g.Cout && grad_out.size(2) == g.Ho && grad_out.size(3) == g.Wo,
              "spike_conv2d_bwd: grad_out has the wrong shape");
  if (need_weight) {
    // the device too: the dispatcher picks the kernel from the highest key among the
    // arguments, so a CPU `packed` beside a CUDA grad_out reaches the CUDA kernel
    TORCH_CHECK(packed.device() == grad_out.device() && packed.scalar_type() == at::kByte &&
                    packed.is_contiguous() && packed.dim() == 4 && packed.size(0) == g.N &&
                    packed.size(1) == g.Cin && packed.size(2) == g.H && packed.size(3) == g.Wb,
                "spike_conv2d_bwd: packed must be contiguous uint8 [N, Cin, height, "
                "ceil(width / 8)] on grad_out's device (", grad_out.device(), "), got ",
                packed.scalar_type(), " ", packed.sizes(), " on ", packed.device());
  }
}

// spike_conv2d_fwd_masks(_out), every device: checks the channel masks [N, H, W,
// ceil(channels / 64)] int64 on `device`, returns the geometry; `out` is checked
// (contiguous float32 [N, Cout, Ho, Wo] beside the masks) or, when undefined,
// allocated.
inline Geometry masks_geometry(const at::Tensor& masks, int64_t channels, const at::Tensor& weight,
                               int64_t stride, int64_t pad, c10::DeviceType device,
                               at::Tensor& out) {
  TORCH_CHECK(masks.device().type() == device && masks.scalar_type() == at::kLong &&
                  masks.dim() == 4 && masks.is_contiguous() && channels >= 1 &&
                  masks.size(3) == (channels + 63) / 64,
              "spike_conv2d_fwd_masks (", c10::DeviceTypeName(device, true),
              "): masks must be a contiguous int64 tensor [N, H, W, ceil(channels / 64)]");
  const Geometry g = geometry(masks.size(0), channels, masks.size(1), masks.size(2), weight,
                              stride, pad);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "spike_conv2d: kernel larger than the padded input");
  if (out.defined()) {
    TORCH_CHECK(out.device() == masks.device() && out.scalar_type() == at::kFloat &&
                    out.is_contiguous() && out.sizes() == at::IntArrayRef({g.N, g.Cout, g.Ho, g.Wo}),
                "spike_conv2d: out must be a contiguous float32 tensor [", g.N, ", ", g.Cout, ", ",
                g.Ho, ", ", g.Wo, "] on the masks' device");
  } else {
    out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, masks.options().dtype(at::kFloat));
  }
  return g;
}

// dL/ds is dense: the transposed convolution (oneDNN / cuDNN); output_padding
// maps [Ho, Wo] back to exactly [H, W].
inline at::Tensor grad_spikes_dense(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const Geometry& g) {
  const int64_t oph = g.H - ((g.Ho - 1) * g.stride - 2 * g.pad + g.kh);
  const int64_t opw = g.W - ((g.Wo - 1) * g.stride - 2 * g.pad + g.kw);
  return at::conv_transpose2d(grad_out, weight, {}, {g.stride, g.stride}, {g.pad, g.pad},
                              {oph, opw})
      .contiguous();
}

}  // namespace spikingir
