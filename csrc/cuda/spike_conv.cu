// CUDA kernels of spikingir::spike_conv2d_fwd / spike_conv2d_fwd_masks /
// spike_conv2d_bwd (schemas: csrc/ops.cpp).
//
//   forward, event-driven and exact in float32 (CUDA cores; the tensor-core path is
//   the Triton implicit GEMM in kernels/spike_conv.py):
//     0. float spikes -> channel masks [N, H, W, ceil(Cin/64)] (bit c % 64 of word
//        c / 64; masks_kernel, one thread per pixel and word). spike_conv2d_fwd_masks
//        starts here with the neurons' masks.
//     1. event_conv_kernel: one block per tile of 8 x 16 output pixels and 64
//        output channels; warp w owns tile row w, lane l output channels l and
//        l + 32 (16 x 2 accumulators in registers). Per 64-channel word and tap,
//        the tap's weights [64 ci][64 co] (double-buffered: the next tap's are
//        copied with cp.async during this one) and the tile's input masks sit in
//        shared memory; per pixel the warp lists the word's set channels (the
//        same word for every lane: no divergence) and adds the weight rows
//        w[tap][ci][l] (conflict-free shared loads). Adds only, work
//        proportional to the spikes. Order per output value: (word, tap, ci)
//        ascending, then the bias: fixed, so bitwise reproducible; for Cin <= 64 it
//        is the CPU kernel's order ((ky, kx, ci), then bias), so the two agree bit
//        for bit.
//        The tile is written through shared memory (coalesced rows).
//     The spikes for backward are packed 1 bit per spike ([N, Cin, H, ceil(W/8)]
//     uint8, bit b of byte j = pixel 8 j + b) by pack_kernel, one thread per byte.
//   backward: grad_s is the dense transposed convolution (cuDNN); grad_weight:
//     by default (dense_rate < 0) cuDNN's weight gradient of the unpacked spikes,
//     deterministic under torch's deterministic settings as nn.Conv2d's; in (0, 1)
//     the firing rate (read back: a sync) picks cuDNN above it; >= 1 the event
//     loop grad_weight_kernel: one block per weight (co,
//     ci, ky, kx; blocks loop past gridDim.x's limit) sums grad_out over the output pixels whose input spike is set, in
//     a fixed order (per-thread strided sums, then a fixed shared-memory tree):
//     deterministic, no atomics, but 40-47x slower than cuDNN (see below).
// Offsets are int64; launches go on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
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

// Float spikes [N, Cin, HW] -> channel masks [N, HW, Cw]: one thread per (n,
// word, pixel); neighbouring threads read neighbouring pixels (coalesced).
template <typename scalar_t>
__global__ void masks_kernel(const scalar_t* __restrict__ s, unsigned long long* __restrict__ masks,
                             int64_t N, int64_t Cin, int64_t HW, int64_t Cw) {
  const int64_t total = N * Cw * HW;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pix = i % HW;
    const int64_t k = (i / HW) % Cw;
    const int64_t n = i / (HW * Cw);
    unsigned long long bits = 0;
    for (int j = 0; j < 64; ++j) {
      const int64_t c = 64 * k + j;
      if (c < Cin && is_spike(s[(n * Cin + c) * HW + pix])) bits |= 1ull << j;
    }
    masks[(n * HW + pix) * Cw + k] = bits;
  }
}

constexpr int kTileH = 8;   // output rows per block: one per warp
constexpr int kTileW = 16;  // output columns per block: accumulators per thread
constexpr int kEventThreads = 32 * kTileH;
// The largest input footprint of a tile: stride 2, 7 x 7 kernel.
constexpr int kMaxFoot = ((kTileH - 1) * 2 + 7) * ((kTileW - 1) * 2 + 7);
constexpr int kStageStride = kTileH * kTileW + 1;  // +1: conflict-free transposed writes
constexpr int kWStage = 64 * 64;                    // floats of one weight stage [64 ci][64 co]
// Main loop: two weight stages (double buffer), the tile's masks, one 64-entry
// list of set channels per warp. Epilogue: the output tile (reuses the memory).
constexpr int kMainBytes = 2 * kWStage * 4 + kMaxFoot * 8 + kTileH * 64 * 2;
constexpr int kSmemBytes = 64 * kStageStride * 4 > kMainBytes ? 64 * kStageStride * 4 : kMainBytes;

// 16-byte asynchronous copy global -> shared (sm_80+); src_bytes = 0 fills zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most one committed group (the most recent) is still in flight.
__device__ __forceinline__ void cp_async_wait_prior1() {
  asm volatile("cp.async.wait_group 1;\n" ::);
}

// Start copying the weights of 64-channel word k and tap `tap` ([64 ci][64 co]
// from wt [taps, Cin, Cout_p], output channels c0 ...) into `stage`: 1024 chunks of
// 16 bytes, 4 per thread. Rows past Cin are zero-filled (a stray mask bit there
// adds nothing).
__device__ __forceinline__ void stage_weights(float* stage, const float* __restrict__ wt,
                                              int64_t k, int tap, const Geometry& g,
                                              int64_t Cout_p, int64_t c0) {
  for (int q = threadIdx.x; q < 64 * 16; q += blockDim.x) {
    const int row = q / 16, col = q % 16 * 4;
    const int64_t ci = 64 * k + row;
    const bool inside = ci < g.Cin;
    cp_async16(stage + row * 64 + col, inside ? wt + (tap * g.Cin + ci) * Cout_p + c0 + col : wt,
               inside ? 16 : 0);
  }
}

// wt: weights [kh kw, Cin, Cout_p] (Cout zero-padded to a multiple of 64),
// bias_p [Cout_p]; grid (N * n_th * n_tw, Cout_p / 64).
//
// Steps it = 0 .. Cw * taps - 1 walk (word k, tap) in order; step it+1's weights
// are copied (cp.async) while step it computes. Per step and pixel, the warp
// lists the word's set channels in shared memory (each lane tests its two bits;
// a ballot prefix count gives the slot), then every lane adds those weight rows:
// the list costs a few instructions per pixel, the walk ~4 per spike (a serial
// find-first-set loop cost ~15). Both keep the order ci ascending.
__global__ void __launch_bounds__(kEventThreads)
    event_conv_kernel(const unsigned long long* __restrict__ masks, const float* __restrict__ wt,
                      const float* __restrict__ bias_p, float* __restrict__ out, Geometry g,
                      int64_t Cw, int64_t Cout_p, int64_t n_th, int64_t n_tw) {
  __shared__ __align__(16) unsigned char smem[kSmemBytes];
  float* w_stages = reinterpret_cast<float*>(smem);  // 2 x [64 ci][64 co]
  unsigned long long* m_s = reinterpret_cast<unsigned long long*>(smem + 2 * kWStage * 4);
  unsigned short* lists =
      reinterpret_cast<unsigned short*>(smem + 2 * kWStage * 4 + kMaxFoot * 8);
  const int64_t tile = blockIdx.x;
  const int64_t n = tile / (n_th * n_tw);
  const int64_t ty0 = (tile / n_tw) % n_th * kTileH;
  const int64_t tx0 = tile % n_tw * kTileW;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * 64;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned below = (1u << lane) - 1u;  // lanes under this one
  unsigned short* list = lists + warp * 64;  // entries: ci * 64, ascending
  const int FH = (kTileH - 1) * static_cast<int>(g.stride) + static_cast<int>(g.kh);
  const int FW = (kTileW - 1) * static_cast<int>(g.stride) + static_cast<int>(g.kw);
  const int64_t iy0 = ty0 * g.stride - g.pad, ix0 = tx0 * g.stride - g.pad;
  float acc[kTileW][2];  // from zero: the bias is added last, as on the CPU
#pragma unroll
  for (int p = 0; p < kTileW; ++p) {
    acc[p][0] = 0.0f;
    acc[p][1] = 0.0f;
  }
  const int taps = static_cast<int>(g.kh * g.kw);
  const int64_t steps = Cw * taps;
  stage_weights(w_stages, wt, 0, 0, g, Cout_p, c0);
  cp_async_commit();
  for (int64_t it = 0; it < steps; ++it) {
    const int64_t k = it / taps;
    const int tap = static_cast<int>(it % taps);
    // (A) every warp is done with step it-1: its weight stage ((it+1) & 1) and,
    // when the word changes, the masks can be overwritten.
    __syncthreads();
    if (it + 1 < steps) {
      stage_weights(w_stages + ((it + 1) & 1) * kWStage, wt, (it + 1) / taps,
                    static_cast<int>((it + 1) % taps), g, Cout_p, c0);
    }
    cp_async_commit();  // (possibly empty) group it+1
    if (tap == 0) {
      for (int i = threadIdx.x; i < FH * FW; i += blockDim.x) {
        const int64_t iy = iy0 + i / FW, ix = ix0 + i % FW;
        m_s[i] = (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W)
                     ? masks[((n * g.H + iy) * g.W + ix) * Cw + k]
                     : 0ull;
      }
    }
    cp_async_wait_prior1();  // group it (this step's weights) has landed
    __syncthreads();         // (B) ... for every thread's copies, and the masks
    const float* w_s = w_stages + (it & 1) * kWStage;
    const int ky = tap / static_cast<int>(g.kw), kx = tap % static_cast<int>(g.kw);
    const unsigned long long* mrow = m_s + (warp * static_cast<int>(g.stride) + ky) * FW + kx;
#pragma unroll
    for (int p = 0; p < kTileW; ++p) {
      const unsigned long long word = mrow[p * static_cast<int>(g.stride)];  // warp-uniform
      if (word == 0ull) continue;
      const unsigned lo = static_cast<unsigned>(word), hi = static_cast<unsigned>(word >> 32);
      const int n_lo = __popc(lo), count = n_lo + __popc(hi);
      __syncwarp();  // the previous pixel's list has been read
      if ((lo >> lane) & 1u) list[__popc(lo & below)] = static_cast<unsigned short>(lane * 64);
      if ((hi >> lane) & 1u) {
        list[n_lo + __popc(hi & below)] = static_cast<unsigned short>((lane + 32) * 64);
      }
      __syncwarp();
      int j = 0;
      for (; j + 1 < count; j += 2) {
        const int r0 = list[j], r1 = list[j + 1];
        acc[p][0] += w_s[r0 + lane];
        acc[p][1] += w_s[r0 + lane + 32];
        acc[p][0] += w_s[r1 + lane];
        acc[p][1] += w_s[r1 + lane + 32];
      }
      if (j < count) {
        const int r0 = list[j];
        acc[p][0] += w_s[r0 + lane];
        acc[p][1] += w_s[r0 + lane + 32];
      }
    }
  }
  __syncthreads();
  float* o_s = reinterpret_cast<float*>(smem);  // [64 co][kTileH kTileW pixels]
#pragma unroll
  for (int p = 0; p < kTileW; ++p) {
    o_s[lane * kStageStride + warp * kTileW + p] = acc[p][0];
    o_s[(lane + 32) * kStageStride + warp * kTileW + p] = acc[p][1];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 64 * kTileH * kTileW; i += blockDim.x) {
    const int co_l = i / (kTileH * kTileW), pix = i % (kTileH * kTileW);
    const int64_t co = c0 + co_l, oy = ty0 + pix / kTileW, ox = tx0 + pix % kTileW;
    if (co < g.Cout && oy < g.Ho && ox < g.Wo) {
      out[((n * g.Cout + co) * g.Ho + oy) * g.Wo + ox] =
          o_s[co_l * kStageStride + pix] + bias_p[co];
    }
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
  // idx = ((co * Cin + ci) * kh + ky) * kw + kx; block-stride loop: the grid is capped
  // (gridDim.x <= 2^31 - 1, a weight can have more elements); idx is block-uniform.
  const int64_t weights = g.Cout * g.Cin * g.kh * g.kw;
  for (int64_t idx = blockIdx.x; idx < weights; idx += gridDim.x) {
    const int64_t kx = idx % g.kw;
    const int64_t ky = (idx / g.kw) % g.kh;
    const int64_t ci = (idx / (g.kw * g.kh)) % g.Cin;
    const int64_t co = idx / (g.kw * g.kh * g.Cin);
    const int64_t pixels = g.N * g.Ho * g.Wo;
    float acc = 0.0f;
    // Thread t visits the flat pixels p = t, t + blockDim.x, ... (the order, hence the
    // sums, of the plain loop), with (n, oy, ox) carried forward by additions:
    // 64-bit divisions only when a step crosses into the next image, not three per pixel.
    const int64_t step_x = blockDim.x % g.Wo, step_y = blockDim.x / g.Wo;
    int64_t p = threadIdx.x;
    int64_t ox = p % g.Wo, oy = (p / g.Wo) % g.Ho, n = p / (g.Wo * g.Ho);
    for (; p < pixels; p += blockDim.x) {
      const int64_t iy = oy * g.stride + ky - g.pad;
      const int64_t ix = ox * g.stride + kx - g.pad;
      if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {
        const uint8_t byte = bits[((n * g.Cin + ci) * g.H + iy) * g.Wb + (ix >> 3)];
        if ((byte >> (ix & 7)) & 1) acc += go[((n * g.Cout + co) * g.Ho + oy) * g.Wo + ox];
      }
      ox += step_x;  // p + blockDim.x as (n, oy, ox)
      oy += step_y;
      if (ox >= g.Wo) {
        ox -= g.Wo;
        ++oy;
      }
      if (oy >= g.Ho) {
        n += oy / g.Ho;
        oy %= g.Ho;
      }
    }
    __shared__ float partial[kThreads];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int step = kThreads / 2; step > 0; step /= 2) {
      if (threadIdx.x < step) partial[threadIdx.x] += partial[threadIdx.x + step];
      __syncthreads();
    }
    if (threadIdx.x == 0) gw[idx] = partial[0];
    __syncthreads();  // partial[0] is read before the next weight overwrites it
  }
}

void check_weight(const at::Tensor& weight, const at::Tensor& like, int64_t Cin, int64_t stride,
                  int64_t pad) {
  TORCH_CHECK(weight.device() == like.device() && weight.scalar_type() == at::kFloat &&
                  weight.dim() == 4 && weight.is_contiguous(),
              "spike_conv2d (cuda): weight must be a contiguous float32 tensor [Cout, Cin, kh, kw] "
              "on the spikes' device");
  TORCH_CHECK(weight.size(1) == Cin, "spike_conv2d: weight has ", weight.size(1),
              " input channels, the spikes ", Cin);
  // The event kernel's shared input-mask tile is sized for the worst footprint the
  // public op allows (kMaxFoot: stride 2, a 7x7 kernel); larger would overrun it.
  TORCH_CHECK((stride == 1 || stride == 2) && pad >= 0 && weight.size(2) <= 7 &&
                  weight.size(3) <= 7,
              "spike_conv2d (cuda): stride must be 1 or 2, padding >= 0 and the kernel at most "
              "7x7, got stride ", stride, ", padding ", pad, ", kernel ", weight.size(2), "x",
              weight.size(3));
}

const float* check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& like,
                        const Geometry& g) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                  bias->numel() == g.Cout && bias->device() == like.device(),
              "spike_conv2d (cuda): bias must be a contiguous float32 [Cout] on the input's device");
  return bias->data_ptr<float>();
}

// Forward step 1 over channel masks [N, H, W, Cw] (see event_conv_kernel), into
// `out` (contiguous float32 [N, Cout, Ho, Wo]).
at::Tensor event_conv(const unsigned long long* masks, int64_t Cw, const Geometry& g,
                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::Tensor out) {
  if (out.numel() == 0) return out;
  // [Cout, Cin, kh, kw] -> [kh kw, Cin, Cout_p], Cout zero-padded to a multiple of 64.
  const int64_t Cout_p = (g.Cout + 63) / 64 * 64;
  auto wt = at::zeros({g.kh * g.kw, g.Cin, Cout_p}, weight.options());
  wt.narrow(2, 0, g.Cout).copy_(weight.permute({2, 3, 1, 0}).reshape({g.kh * g.kw, g.Cin, g.Cout}));
  auto bias_p = at::zeros({Cout_p}, weight.options());
  if (bias.has_value()) bias_p.narrow(0, 0, g.Cout).copy_(*bias);
  const int64_t n_th = (g.Ho + kTileH - 1) / kTileH, n_tw = (g.Wo + kTileW - 1) / kTileW;
  const int64_t tiles = g.N * n_th * n_tw;
  TORCH_CHECK(tiles < (int64_t(1) << 31),
              "spike_conv2d (cuda): input too large for one launch (", tiles, " tiles of ",
              kTileH, "x", kTileW, " output pixels; at most 2^31 - 1)");
  // the 64-channel blocks are grid axis y, at most 65535 blocks
  TORCH_CHECK(Cout_p / 64 <= 65535, "spike_conv2d (cuda): at most ", 64 * 65535,
              " output channels, got ", g.Cout);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Cout_p / 64));
  event_conv_kernel<<<grid, kEventThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      masks, wt.data_ptr<float>(), bias_p.data_ptr<float>(), out.data_ptr<float>(), g, Cw, Cout_p,
      n_th, n_tw);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
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
  (void)dense_rate;  // a single (event-driven) path
  (void)validate;    // checked by the caller (spikingir.ops.spike_conv2d) on CUDA
  const c10::cuda::CUDAGuard guard(s.device());
  const Geometry g = geometry(s.size(0), s.size(1), s.size(2), s.size(3), weight, stride, padding);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "spike_conv2d: kernel larger than the padded input");
  check_bias(bias, s, g);
  const int64_t Cw = (g.Cin + 63) / 64;
  auto masks = at::empty({g.N, g.H, g.W, Cw}, s.options().dtype(at::kLong));
  const auto u8 = s.options().dtype(at::kByte);
  auto packed = save ? at::empty({g.N, g.Cin, g.H, g.Wb}, u8) : at::empty({0}, u8);
  auto* mp = reinterpret_cast<unsigned long long*>(masks.data_ptr<int64_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPK_DISPATCH_FLOATS(s.scalar_type(), "spike_conv2d_fwd_cuda", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    if (masks.numel() > 0) {
      masks_kernel<scalar_t><<<blocks_for(masks.numel()), kThreads, 0, stream>>>(
          sp, mp, g.N, g.Cin, g.H * g.W, Cw);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (save && packed.numel() > 0) {
      pack_kernel<scalar_t><<<blocks_for(packed.numel()), kThreads, 0, stream>>>(
          sp, packed.data_ptr<uint8_t>(), g.N * g.Cin * g.H, g.W, g.Wb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {event_conv(mp, Cw, g, weight, bias,
                     at::empty({g.N, g.Cout, g.Ho, g.Wo}, s.options().dtype(at::kFloat))),
          packed};
}

// `out`: where to write (spike_conv2d_fwd_masks_out), or undefined (a new tensor).
at::Tensor masks_conv(const at::Tensor& masks, int64_t channels, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                      double dense_rate, at::Tensor out) {
  check_weight(weight, masks, channels, stride, padding);
  (void)dense_rate;  // a single (event-driven) path
  const c10::cuda::CUDAGuard guard(masks.device());
  const Geometry g = masks_geometry(masks, channels, weight, stride, padding, at::kCUDA, out);
  check_bias(bias, masks, g);
  return event_conv(reinterpret_cast<const unsigned long long*>(masks.data_ptr<int64_t>()),
                    masks.size(3), g, weight, bias, out);
}

at::Tensor spike_conv2d_fwd_masks_cuda(const at::Tensor& masks, int64_t channels,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t stride,
                                       int64_t padding, double dense_rate) {
  return masks_conv(masks, channels, weight, bias, stride, padding, dense_rate, at::Tensor());
}

void spike_conv2d_fwd_masks_out_cuda(const at::Tensor& masks, int64_t channels,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t stride,
                                     int64_t padding, double dense_rate, at::Tensor& out) {
  masks_conv(masks, channels, weight, bias, stride, padding, dense_rate, out);
}

// Bit-packed spikes [N, Cin, H, ceil(W / 8)] -> float32 0/1 [N, Cin, H, W]: spike x of a
// row is bit x % 8 of byte x / 8 (the packing of the forward), by ATen ops on the GPU
// (kernels/spike_conv.py's unpack_bits is the same for the triton backend, in Python).
at::Tensor unpack_bits(const at::Tensor& packed, int64_t width) {
  const auto shifts = at::arange(8, packed.options());
  return packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1)
      .flatten(-2).narrow(-1, 0, width).to(at::kFloat).contiguous();
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
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const Geometry g = geometry(grad_out.size(0), Cin, height, width, weight, stride, padding);
  check_backward_inputs(grad_out, packed, g, need_weight);
  const auto f32 = grad_out.options().dtype(at::kFloat);
  at::Tensor gs = at::empty({0}, f32), gw = at::empty({0}, f32), gb = at::empty({0}, f32);
  if (need_s) gs = grad_spikes_dense(grad_out, weight, g);
  if (need_weight) {
    // The event loop below gives each weight element one block that walks every output
    // pixel: no reuse of grad_out or the spikes, 40-47x slower than cuDNN's weight
    // gradient at every firing rate on an H200 (benchmarks/RESULTS.md, twentieth
    // session). So dense_rate < 0 (the default, spikingir/ops/spike_conv.py) takes
    // cuDNN's weight gradient of the unpacked spikes, under torch's TF32 settings as
    // grad_s; >= 1 the event loop; in between the firing rate decides (read back: a sync).
    at::Tensor s;
    bool dense = dense_rate < 0.0;
    if (!dense && dense_rate < 1.0 && packed.numel() > 0) {
      s = unpack_bits(packed, width);
      dense = s.mean().item<double>() > dense_rate;
    }
    if (dense) {
      gw = std::get<1>(at::convolution_backward(grad_out, s.defined() ? s : unpack_bits(packed, width),
                                                weight, std::nullopt, {stride, stride},
                                                {padding, padding}, {1, 1}, false, {0, 0}, 1,
                                                {false, true, false}))
               .contiguous();
    } else {
      gw = at::empty(weight.sizes(), f32);
      if (gw.numel() > 0) {
        // one block per weight up to gridDim.x's limit; the kernel loops past it
        const auto blocks =
            static_cast<unsigned>(std::min<int64_t>(gw.numel(), (int64_t{1} << 31) - 1));
        grad_weight_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad_out.data_ptr<float>(), packed.data_ptr<uint8_t>(), gw.data_ptr<float>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
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
  m.impl("spike_conv2d_fwd_masks_out", &spike_conv2d_fwd_masks_out_cuda);
}

}  // namespace spikingir
