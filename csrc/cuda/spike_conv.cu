// CUDA kernels of spikingir::spike_conv2d_fwd / spike_conv2d_bwd (schemas: csrc/ops.cpp).
//
// A first, simple and exact version (the fast GPU path is the Triton implicit
// GEMM in kernels/spike_conv.py; tensor cores / 2:4 sparse MMA are not done here):
//   forward: one thread per output value (n, co, oy, ox) walks (ci, ky, kx) in a
//     fixed order and adds w[co, ci, ky, kx] where the spike is set: adds only,
//     float32, deterministic. The spikes for backward are packed 1 bit per spike
//     ([N, Cin, H, ceil(W/8)] uint8, bit b of byte j = pixel 8 j + b) by a
//     second kernel, one thread per byte.
//   backward: grad_s is the dense transposed convolution (cuDNN); grad_weight:
//     one block per weight (co, ci, ky, kx) sums grad_out over the output pixels
//     whose input spike is set, in a fixed order (per-thread strided sums, then a
//     fixed shared-memory tree): deterministic, no atomics.
// Offsets are int64; launches go on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "../dispatch.h"
#include "../spike_conv.h"

namespace spikingir {
namespace {

constexpr int kThreads = 256;


__device__ __forceinline__ bool is_spike(float v) { return v != 0.0f; }
__device__ __forceinline__ bool is_spike(c10::Half v) { return static_cast<float>(v) != 0.0f; }
__device__ __forceinline__ bool is_spike(c10::BFloat16 v) { return static_cast<float>(v) != 0.0f; }

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 32));
}

template <typename scalar_t>
__global__ void spike_conv2d_fwd_kernel(const scalar_t* __restrict__ s,
                                        const float* __restrict__ w,
                                        const float* __restrict__ bias, float* __restrict__ out,
                                        Geometry g) {
  const int64_t total = g.N * g.Cout * g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ox = i % g.Wo;
    const int64_t oy = (i / g.Wo) % g.Ho;
    const int64_t co = (i / (g.Wo * g.Ho)) % g.Cout;
    const int64_t n = i / (g.Wo * g.Ho * g.Cout);
    float acc = bias ? __ldg(bias + co) : 0.0f;
    for (int64_t ci = 0; ci < g.Cin; ++ci) {
      const scalar_t* sc = s + (n * g.Cin + ci) * g.H * g.W;
      const float* wc = w + (co * g.Cin + ci) * g.kh * g.kw;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.stride + ky - g.pad;
        if (iy < 0 || iy >= g.H) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.stride + kx - g.pad;
          if (ix < 0 || ix >= g.W) continue;
          if (is_spike(sc[iy * g.W + ix])) acc += __ldg(wc + ky * g.kw + kx);
        }
      }
    }
    out[i] = acc;
  }
}

// The forward kernel reading channel masks [N, H, W, Cw] (spike_conv2d_fwd_masks):
// the same walk and summation order (ci, ky, kx) as spike_conv2d_fwd_kernel,
// so the same result bit for bit; bits past Cin are never read.
__global__ void spike_conv2d_fwd_masks_kernel(const unsigned long long* __restrict__ masks,
                                              const float* __restrict__ w,
                                              const float* __restrict__ bias,
                                              float* __restrict__ out, Geometry g, int64_t Cw) {
  const int64_t total = g.N * g.Cout * g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ox = i % g.Wo;
    const int64_t oy = (i / g.Wo) % g.Ho;
    const int64_t co = (i / (g.Wo * g.Ho)) % g.Cout;
    const int64_t n = i / (g.Wo * g.Ho * g.Cout);
    float acc = bias ? __ldg(bias + co) : 0.0f;
    for (int64_t ci = 0; ci < g.Cin; ++ci) {
      const float* wc = w + (co * g.Cin + ci) * g.kh * g.kw;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.stride + ky - g.pad;
        if (iy < 0 || iy >= g.H) continue;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.stride + kx - g.pad;
          if (ix < 0 || ix >= g.W) continue;
          const unsigned long long word = __ldg(masks + ((n * g.H + iy) * g.W + ix) * Cw + ci / 64);
          if ((word >> (ci % 64)) & 1ull) acc += __ldg(wc + ky * g.kw + kx);
        }
      }
    }
    out[i] = acc;
  }
}

template <typename scalar_t>
__global__ void pack_kernel(const scalar_t* __restrict__ s, uint8_t* __restrict__ bits,
                            int64_t rows, int64_t W, int64_t Wb) {
  const int64_t total = rows * Wb;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / Wb, j = i % Wb;
    const scalar_t* row = s + r * W;
    uint32_t byte = 0;
    for (int b = 0; b < 8; ++b) {
      const int64_t x = 8 * j + b;
      if (x < W && is_spike(row[x])) byte |= 1u << b;
    }
    bits[i] = static_cast<uint8_t>(byte);
  }
}

__global__ void grad_weight_kernel(const float* __restrict__ go, const uint8_t* __restrict__ bits,
                                   float* __restrict__ gw, Geometry g) {
  // blockIdx.x = ((co * Cin + ci) * kh + ky) * kw + kx
  const int64_t idx = blockIdx.x;
  const int64_t kx = idx % g.kw;
  const int64_t ky = (idx / g.kw) % g.kh;
  const int64_t ci = (idx / (g.kw * g.kh)) % g.Cin;
  const int64_t co = idx / (g.kw * g.kh * g.Cin);
  const int64_t pixels = g.N * g.Ho * g.Wo;
  float acc = 0.0f;
  for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) {
    const int64_t ox = p % g.Wo;
    const int64_t oy = (p / g.Wo) % g.Ho;
    const int64_t n = p / (g.Wo * g.Ho);
    const int64_t iy = oy * g.stride + ky - g.pad;
    const int64_t ix = ox * g.stride + kx - g.pad;
    if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) continue;
    const uint8_t byte = bits[((n * g.Cin + ci) * g.H + iy) * g.Wb + ix / 8];
    if ((byte >> (ix % 8)) & 1) acc += go[((n * g.Cout + co) * g.Ho + oy) * g.Wo + ox];
  }
  __shared__ float partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int step = kThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) partial[threadIdx.x] += partial[threadIdx.x + step];
    __syncthreads();
  }
  if (threadIdx.x == 0) gw[idx] = partial[0];
}

void check_weight(const at::Tensor& weight, const at::Tensor& like, int64_t Cin, int64_t stride,
                  int64_t pad) {
  TORCH_CHECK(weight.device() == like.device() && weight.scalar_type() == at::kFloat &&
                  weight.dim() == 4 && weight.is_contiguous(),
              "spike_conv2d (cuda): weight must be a contiguous float32 tensor [Cout, Cin, kh, kw] "
              "on the spikes' device");
  TORCH_CHECK(weight.size(1) == Cin, "spike_conv2d: weight has ", weight.size(1),
              " input channels, the spikes ", Cin);
  TORCH_CHECK(stride >= 1 && pad >= 0, "spike_conv2d: stride must be >= 1 and padding >= 0");
}

std::tuple<at::Tensor, at::Tensor> spike_conv2d_fwd_cuda(const at::Tensor& s,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        int64_t stride, int64_t padding,
                                                        double dense_rate, bool validate,
                                                        bool save) {
  TORCH_CHECK(s.is_cuda() && s.dim() == 4 && s.is_contiguous(),
              "spike_conv2d (cuda): s must be a contiguous 4-d CUDA tensor [N, Cin, H, W]");
  check_weight(weight, s, s.size(1), stride, padding);
  (void)dense_rate;  // this kernel has a single (event-skipping) path
  (void)validate;    // checked by the caller (spikingir.ops.spike_conv2d) on CUDA
  const c10::cuda::CUDAGuard guard(s.device());
  const Geometry g = geometry(s.size(0), s.size(1), s.size(2), s.size(3), weight, stride, padding);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "spike_conv2d: kernel larger than the padded input");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == g.Cout && bias->device() == s.device(),
                "spike_conv2d (cuda): bias must be a contiguous float32 [Cout] on the spikes' device");
    bp = bias->data_ptr<float>();
  }
  auto out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, s.options().dtype(at::kFloat));
  const auto u8 = s.options().dtype(at::kByte);
  auto packed = save ? at::empty({g.N, g.Cin, g.H, g.Wb}, u8) : at::empty({0}, u8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPK_DISPATCH_FLOATS(s.scalar_type(), "spike_conv2d_fwd_cuda", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    if (out.numel() > 0) {
      spike_conv2d_fwd_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          sp, weight.data_ptr<float>(), bp, out.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (save && packed.numel() > 0) {
      pack_kernel<scalar_t><<<blocks_for(packed.numel()), kThreads, 0, stream>>>(
          sp, packed.data_ptr<uint8_t>(), g.N * g.Cin * g.H, g.W, g.Wb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, packed};
}

at::Tensor spike_conv2d_fwd_masks_cuda(const at::Tensor& masks, int64_t channels,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t stride,
                                       int64_t padding, double dense_rate) {
  const int64_t Cw = (channels + 63) / 64;
  TORCH_CHECK(masks.is_cuda() && masks.scalar_type() == at::kLong && masks.dim() == 4 &&
                  masks.is_contiguous() && masks.size(3) == Cw && channels >= 1,
              "spike_conv2d_fwd_masks (cuda): masks must be a contiguous int64 CUDA tensor "
              "[N, H, W, ceil(channels / 64)]");
  check_weight(weight, masks, channels, stride, padding);
  (void)dense_rate;  // a single (event-skipping) path
  const c10::cuda::CUDAGuard guard(masks.device());
  const Geometry g = geometry(masks.size(0), channels, masks.size(1), masks.size(2), weight,
                              stride, padding);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "spike_conv2d: kernel larger than the padded input");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == g.Cout && bias->device() == masks.device(),
                "spike_conv2d (cuda): bias must be a contiguous float32 [Cout] on the masks' device");
    bp = bias->data_ptr<float>();
  }
  auto out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, masks.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    spike_conv2d_fwd_masks_kernel<<<blocks_for(out.numel()), kThreads, 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const unsigned long long*>(masks.data_ptr<int64_t>()),
        weight.data_ptr<float>(), bp, out.data_ptr<float>(), g, Cw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spike_conv2d_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& weight,
    int64_t height, int64_t width, int64_t stride, int64_t padding, double dense_rate,
    bool need_s, bool need_weight, bool need_bias) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.scalar_type() == at::kFloat &&
                  grad_out.dim() == 4 && grad_out.is_contiguous(),
              "spike_conv2d_bwd (cuda): grad_out must be contiguous float32 [N, Cout, Ho, Wo]");
  const int64_t Cin = weight.size(1);
  check_weight(weight, grad_out, Cin, stride, padding);
  (void)dense_rate;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const Geometry g = geometry(grad_out.size(0), Cin, height, width, weight, stride, padding);
  check_backward_inputs(grad_out, packed, g, need_weight);
  const auto f32 = grad_out.options().dtype(at::kFloat);
  at::Tensor gs = at::empty({0}, f32), gw = at::empty({0}, f32), gb = at::empty({0}, f32);
  if (need_s) gs = grad_spikes_dense(grad_out, weight, g);
  if (need_weight) {
    gw = at::empty(weight.sizes(), f32);
    if (gw.numel() > 0) {
      grad_weight_kernel<<<static_cast<unsigned>(gw.numel()), kThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(
          grad_out.data_ptr<float>(), packed.data_ptr<uint8_t>(), gw.data_ptr<float>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (need_bias) gb = grad_out.sum({0, 2, 3});
  return {gs, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(spikingir, CUDA, m) {
  m.impl("spike_conv2d_fwd", &spike_conv2d_fwd_cuda);
  m.impl("spike_conv2d_bwd", &spike_conv2d_bwd_cuda);
  m.impl("spike_conv2d_fwd_masks", &spike_conv2d_fwd_masks_cuda);
}

}  // namespace spikingir
