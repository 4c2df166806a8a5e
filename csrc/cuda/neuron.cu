// CUDA kernels of spikingir::neuron_fwd / neuron_bwd (schemas: csrc/ops.cpp).
//
// One thread per neuron walks all T steps (kChunk at a time, loads first): the
// membrane potential stays in a register and each step reads x (and writes y, u) once, so the kernel moves the
// byte floor of the op (fp32: 12 B per neuron-step forward incl. the saved u,
// 12 B backward). Offsets are int64 (t * M + m can pass 2^31). Launches go on
// the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "../dispatch.h"
#include "../neuron.h"
#include "../neuron_math.h"

namespace spikingir {
namespace {

constexpr int kThreads = 256;


__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(c10::Half v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f(c10::BFloat16 v) { return static_cast<float>(v); }

// Steps are taken kChunk at a time: the chunk's loads are issued before any of its
// arithmetic, so each thread keeps kChunk loads in flight instead of one (with one,
// 2048 threads x 4 B per SM is too little to cover HBM latency: the first H100
// run measured half the byte floor, where torch.compile's unrolled loop reached
// 91 %). The arithmetic and its order are unchanged.
constexpr int kChunk = 8;

template <typename scalar_t, typename save_t>
__global__ void neuron_fwd_kernel(const scalar_t* __restrict__ x, const float* __restrict__ v0,
                                  scalar_t* __restrict__ y, float* __restrict__ vT,
                                  save_t* __restrict__ saved, int64_t T, int64_t M, Params p) {
  const int64_t T_if = p.reuse_step ? T - 1 : T;
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < M;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (m / p.inner) % p.C;
    const float th = __ldg(p.theta + c);
    float v = v0 ? v0[m] : 0.0f;
    for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
      float xs[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        xs[i] = t0 + i < T ? to_f(x[(t0 + i) * M + m]) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int64_t t = t0 + i;
        if (t >= T) break;
        const int64_t off = t * M + m;
        const bool reuse = t >= T_if;
        const float thr = reuse ? p.reuse_alpha * th : th;
        const float k = reuse ? __ldg(p.beta + c) : th;
        // h = v + x; u = h - thr; s = H(u); v = h - theta s (soft reset).
        const float h = v + xs[i];
        const float u = h - thr;
        const float s = u >= 0.0f ? 1.0f : 0.0f;
        v = h - th * s;
        y[off] = static_cast<scalar_t>(p.scale_output ? k * s : s);
        store_saved(saved, off, u);
      }
    }
    vT[m] = v;
  }
}

template <typename scalar_t, typename save_t, int kSurrogate>
__global__ void neuron_bwd_kernel(const scalar_t* __restrict__ gy, const float* __restrict__ gvT,
                                  const save_t* __restrict__ saved, scalar_t* __restrict__ gx,
                                  float* __restrict__ gv0, float* __restrict__ gtheta_buf,
                                  float* __restrict__ gbeta_buf, int64_t T, int64_t M, Params p) {
  const int64_t T_if = p.reuse_step ? T - 1 : T;
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < M;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (m / p.inner) % p.C;
    const float th = __ldg(p.theta + c);
    const float a = __ldg(p.alpha + c);
    float gv = gvT ? gvT[m] : 0.0f;
    float gth = 0.0f, gbe = 0.0f;
    // Back in time, kChunk steps at a time, their loads first (see kChunk).
    for (int64_t t1 = T - 1; t1 >= 0; t1 -= kChunk) {
      float gys[kChunk], us[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int64_t off = (t1 - i) * M + m;
        gys[i] = t1 - i >= 0 ? to_f(gy[off]) : 0.0f;
        us[i] = t1 - i >= 0 ? to_f(saved[off]) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int64_t t = t1 - i;
        if (t < 0) break;
        const bool reuse = t >= T_if;
        const float u = us[i];
        const float s = u >= 0.0f ? 1.0f : 0.0f;
        const float sg = surrogate_grad<kSurrogate>(u, a);
        float gh, g_theta, g_k;
        step_backward(gys[i], gv, s, sg, th, reuse ? __ldg(p.beta + c) : th,
                      reuse ? p.reuse_alpha : 1.0f, p.scale_output, p.detach_reset, gh, g_theta,
                      g_k);
        gx[t * M + m] = static_cast<scalar_t>(gh);
        gv = gh;
        gth += g_theta;
        if (reuse) gbe += g_k; else gth += g_k;
      }
    }
    gv0[m] = gv;
    if (gtheta_buf) gtheta_buf[m] = gth;
    if (gbeta_buf) gbeta_buf[m] = gbe;
  }
}

int64_t num_blocks(int64_t M) {
  // Grid-stride loops: cap the grid, every thread covers M / (grid * block) neurons.
  const int64_t want = (M + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(want, int64_t(1) << 30));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neuron_fwd_cuda(
    const at::Tensor& x, const at::Tensor& theta, const at::Tensor& beta,
    const std::optional<at::Tensor>& v0, const at::Tensor& alpha, int64_t surrogate,
    double reuse_alpha, bool reuse_step, bool scale_output, bool detach_reset, int64_t inner,
    int64_t save_bytes) {
  check_common(x, theta, beta, alpha, inner, at::kCUDA);
  TORCH_CHECK(save_bytes == 0 || save_bytes == 2 || save_bytes == 4,
              "neuron_fwd: save_bytes must be 0, 2 or 4");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0);
  const int64_t M = x.numel() / T;
  TORCH_CHECK(!reuse_step || T >= 2, "neuron_fwd: the MPRN reuse step needs T + 1 >= 2 steps");
  const float* v0p = nullptr;
  if (v0.has_value()) {
    TORCH_CHECK(v0->scalar_type() == at::kFloat && v0->is_contiguous() && v0->numel() == M &&
                    v0->device() == x.device(),
                "neuron_fwd: v0 must be contiguous float32 on x's device, one value per neuron");
    v0p = v0->data_ptr<float>();
  }
  auto y = at::empty_like(x);
  auto vT = at::empty(x.sizes().slice(1), x.options().dtype(at::kFloat));
  auto saved = save_bytes == 0 ? at::empty({0}, x.options().dtype(at::kFloat))
                               : at::empty_like(x, x.options().dtype(save_bytes == 2 ? at::kBFloat16 : at::kFloat));
  if (M == 0) return {y, vT, saved};
  const Params p = make_params(theta, beta, alpha, inner, reuse_alpha, reuse_step, scale_output,
                               detach_reset);
  auto stream = c10::cuda::getCurrentCUDAStream();
  SPK_DISPATCH_FLOATS(x.scalar_type(), "neuron_fwd_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    float* vTp = vT.data_ptr<float>();
    const auto blocks = num_blocks(M);
    if (save_bytes == 2) {
      neuron_fwd_kernel<<<blocks, kThreads, 0, stream>>>(xp, v0p, yp, vTp,
                                                        saved.data_ptr<c10::BFloat16>(), T, M, p);
    } else if (save_bytes == 4) {
      neuron_fwd_kernel<<<blocks, kThreads, 0, stream>>>(xp, v0p, yp, vTp, saved.data_ptr<float>(),
                                                        T, M, p);
    } else {
      neuron_fwd_kernel<<<blocks, kThreads, 0, stream>>>(xp, v0p, yp, vTp,
                                                        static_cast<NoSave*>(nullptr), T, M, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, vT, saved};
}

template <typename scalar_t, typename save_t>
void launch_bwd(int64_t surrogate, cudaStream_t stream, const scalar_t* gy, const float* gvT,
                const save_t* saved, scalar_t* gx, float* gv0, float* gth, float* gbe, int64_t T,
                int64_t M, const Params& p) {
  const auto blocks = num_blocks(M);
#define SPK_LAUNCH(S)                                                                  \
  neuron_bwd_kernel<scalar_t, save_t, S><<<blocks, kThreads, 0, stream>>>(gy, gvT, saved, gx, \
                                                                          gv0, gth, gbe, T, M, p)
  switch (surrogate) {
    case kSigmoid: SPK_LAUNCH(kSigmoid); break;
    case kAtan: SPK_LAUNCH(kAtan); break;
    case kTriangle: SPK_LAUNCH(kTriangle); break;
    case kRectangle: SPK_LAUNCH(kRectangle); break;
    default: TORCH_CHECK(false, "neuron_bwd: unknown surrogate id ", surrogate);
  }
#undef SPK_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neuron_bwd_cuda(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_v, const at::Tensor& saved,
    const at::Tensor& theta, const at::Tensor& beta, const at::Tensor& alpha, int64_t surrogate,
    double reuse_alpha, bool reuse_step, bool scale_output, bool detach_reset, int64_t inner,
    bool need_theta_grad, bool need_beta_grad) {
  check_common(grad_y, theta, beta, alpha, inner, at::kCUDA);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  TORCH_CHECK(saved.sizes() == grad_y.sizes() && saved.is_contiguous() &&
                  saved.device() == grad_y.device(),
              "neuron_bwd: saved must be contiguous, on grad_y's device and shaped like it");
  const int64_t T = grad_y.size(0);
  const int64_t M = grad_y.numel() / T;
  const float* gvp = nullptr;
  if (grad_v.has_value()) {
    TORCH_CHECK(grad_v->scalar_type() == at::kFloat && grad_v->is_contiguous() &&
                    grad_v->numel() == M && grad_v->device() == grad_y.device(),
                "neuron_bwd: grad_v must be contiguous float32 with one value per neuron");
    gvp = grad_v->data_ptr<float>();
  }
  const int64_t C = theta.numel();
  const auto fopt = grad_y.options().dtype(at::kFloat);
  auto gx = at::empty_like(grad_y);
  auto gv0 = at::empty(grad_y.sizes().slice(1), fopt);
  at::Tensor gth_buf = need_theta_grad ? at::empty({M}, fopt) : at::Tensor();
  at::Tensor gbe_buf = need_beta_grad ? at::empty({M}, fopt) : at::Tensor();
  if (M > 0) {
    const Params p = make_params(theta, beta, alpha, inner, reuse_alpha, reuse_step,
                                 scale_output, detach_reset);
    float* gth = need_theta_grad ? gth_buf.data_ptr<float>() : nullptr;
    float* gbe = need_beta_grad ? gbe_buf.data_ptr<float>() : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream();
    SPK_DISPATCH_FLOATS(grad_y.scalar_type(), "neuron_bwd_cuda", [&] {
      {
        if (saved.scalar_type() == at::kBFloat16) {
          launch_bwd<scalar_t, c10::BFloat16>(surrogate, stream, grad_y.data_ptr<scalar_t>(), gvp,
                                              saved.data_ptr<c10::BFloat16>(), gx.data_ptr<scalar_t>(),
                                              gv0.data_ptr<float>(), gth, gbe, T, M, p);
        } else {
          TORCH_CHECK(saved.scalar_type() == at::kFloat, "neuron_bwd: saved must be float32 or bfloat16");
          launch_bwd<scalar_t, float>(surrogate, stream, grad_y.data_ptr<scalar_t>(), gvp,
                                      saved.data_ptr<float>(), gx.data_ptr<scalar_t>(),
                                      gv0.data_ptr<float>(), gth, gbe, T, M, p);
        }
      }
    });
  }
  // Per-channel reduction of the per-neuron partial sums: [B, C, inner] -> [C].
  // at::sum on CUDA uses a fixed reduction tree, so this is deterministic.
  auto reduce = [&](const at::Tensor& buf) {
    return buf.view({-1, C, inner}).sum(at::IntArrayRef{0, 2});
  };
  auto g_theta = need_theta_grad ? reduce(gth_buf) : at::zeros({C}, fopt);
  auto g_beta = need_beta_grad ? reduce(gbe_buf) : at::zeros({C}, fopt);
  return {gx, gv0, g_theta, g_beta};
}

// neuron_fwd_masks: one block per (image n, mask word, 32 pixels), 256 threads:
// lane = pixel (neighbouring lanes read neighbouring pixels: each channel's read of
// x is one coalesced 128-byte row), warp w = channels 64 word + 8 w .. + 7, whose
// 8 potentials stay in registers through all T steps. Per step each thread
// writes its 8 spikes as one byte into shared memory, [pixel][w]: the 8 bytes of a
// pixel are its 64-bit channel mask (little-endian: byte w, bit b = channel 8 w + b),
// which warp 0 stores. (The first version, one thread per pixel holding all 64
// potentials, had 124 registers and N P / 64 threads, too few to hide memory
// latency: 0.83 ms for 80 M neuron-steps on an H100, twice the values kernel.)
// The arithmetic is that of neuron_fwd_kernel: the same spikes bit for bit.
// x_step = 0: one input current for every step.
constexpr int kMaskPix = 32;   // pixels per block (one per lane)
constexpr int kMaskGroups = 8;  // warps per block: 8 channels each

template <typename scalar_t>
__global__ void __launch_bounds__(kMaskPix * kMaskGroups)
    neuron_fwd_masks_kernel(const scalar_t* __restrict__ x, const float* __restrict__ v0,
                            unsigned long long* __restrict__ masks, float* __restrict__ vT,
                            const float* __restrict__ theta, bool v0_per_channel,
                            bool per_channel, float reuse_alpha, bool reuse_step, int64_t T,
                            int64_t N, int64_t C, int64_t P, int64_t Cw, int64_t x_step) {
  __shared__ unsigned long long bytes_s[2][kMaskPix];  // double-buffered by step parity
  const int lane = threadIdx.x % kMaskPix, grp = threadIdx.x / kMaskPix;
  const int64_t n_pb = (P + kMaskPix - 1) / kMaskPix;
  const int64_t blk = blockIdx.x;
  const int64_t p = blk % n_pb * kMaskPix + lane;
  const int64_t word = blk / n_pb % Cw;
  const int64_t n = blk / (n_pb * Cw);
  const bool pix_ok = p < P;
  const int64_t c0 = 64 * word + 8 * grp;  // this thread's first channel
  const int64_t T_if = reuse_step ? T - 1 : T;
  float v[8], th[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const bool ok = pix_ok && c0 + j < C;
    th[j] = ok ? __ldg(theta + (per_channel ? c0 + j : 0)) : 1.0f;
    v[j] = (ok && v0) ? v0[v0_per_channel ? c0 + j : (n * C + c0 + j) * P + p] : 0.0f;
  }
  const scalar_t* xp = x + (n * C + c0) * P + p;  // channel c0 + j at xp[j * P]
  for (int64_t t = 0; t < T; ++t) {
    const float thr_scale = t >= T_if ? reuse_alpha : 1.0f;
    float xs[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // the 8 loads first: all in flight together
      xs[j] = (pix_ok && c0 + j < C) ? to_f(xp[t * x_step + j * P]) : 0.0f;
    }
    unsigned byte = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (pix_ok && c0 + j < C) {
        // h = v + x; u = h - thr; s = H(u); v = h - theta s (soft reset).
        const float h = v[j] + xs[j];
        const float u = h - thr_scale * th[j];
        const float s = u >= 0.0f ? 1.0f : 0.0f;
        v[j] = h - th[j] * s;
        byte |= static_cast<unsigned>(u >= 0.0f) << j;
      }
    }
    // Step t writes buffer t & 1; the barrier below orders it before warp 0 reads
    // it, and the next barrier (step t + 1) orders that read before step t + 2
    // writes the same buffer again.
    reinterpret_cast<unsigned char*>(bytes_s[t & 1])[lane * 8 + grp] =
        static_cast<unsigned char>(byte);
    __syncthreads();
    if (grp == 0 && pix_ok) masks[((t * N + n) * P + p) * Cw + word] = bytes_s[t & 1][lane];
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (pix_ok && c0 + j < C) vT[(n * C + c0 + j) * P + p] = v[j];
  }
}

std::tuple<at::Tensor, at::Tensor> neuron_fwd_masks_cuda(const at::Tensor& x,
                                                         const at::Tensor& theta,
                                                         const std::optional<at::Tensor>& v0,
                                                         double reuse_alpha, bool reuse_step,
                                                         int64_t steps) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 3 && x.is_contiguous() && steps >= 1 &&
                  (x.size(0) == steps || x.size(0) == 1),
              "neuron_fwd_masks (cuda): x must be a contiguous CUDA tensor [steps or 1, N, C, ...], "
              "steps >= 1");
  TORCH_CHECK(!reuse_step || steps >= 2,
              "neuron_fwd_masks: the MPRN reuse step needs T + 1 >= 2 steps");
  const int64_t T = steps, N = x.size(1), C = x.size(2);
  TORCH_CHECK(theta.device() == x.device() && theta.scalar_type() == at::kFloat &&
                  theta.dim() == 1 && theta.is_contiguous() &&
                  (theta.numel() == 1 || theta.numel() == C),
              "neuron_fwd_masks (cuda): theta must be contiguous float32 [C] or [1] on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  int64_t P = 1;
  for (int64_t d = 3; d < x.dim(); ++d) P *= x.size(d);
  const int64_t Cw = (C + 63) / 64;
  const float* v0p = nullptr;
  if (v0.has_value()) {
    TORCH_CHECK(v0->device() == x.device() && v0->scalar_type() == at::kFloat &&
                    v0->is_contiguous() &&
                    (v0->numel() == N * C * P || (v0->dim() == 1 && v0->numel() == C)),
                "neuron_fwd_masks: v0 must be contiguous float32 with one value per neuron or "
                "per channel");
    v0p = v0->data_ptr<float>();
  }
  const bool v0_per_channel = v0.has_value() && v0->dim() == 1 && v0->numel() == C;
  std::vector<int64_t> mshape{T, N};
  for (int64_t d = 3; d < x.dim(); ++d) mshape.push_back(x.size(d));
  mshape.push_back(Cw);
  auto masks = at::empty(mshape, x.options().dtype(at::kLong));
  auto vT = at::empty(x.sizes().slice(1), x.options().dtype(at::kFloat));
  const int64_t blocks = N * Cw * ((P + kMaskPix - 1) / kMaskPix);
  if (blocks > 0) {
    TORCH_CHECK(blocks < (int64_t(1) << 31), "neuron_fwd_masks (cuda): too many pixels");
    auto stream = c10::cuda::getCurrentCUDAStream();
    SPK_DISPATCH_FLOATS(x.scalar_type(), "neuron_fwd_masks_cuda", [&] {
      neuron_fwd_masks_kernel<scalar_t><<<blocks, kMaskPix * kMaskGroups, 0, stream>>>(
          x.data_ptr<scalar_t>(), v0p,
          reinterpret_cast<unsigned long long*>(masks.data_ptr<int64_t>()),
          vT.data_ptr<float>(), theta.data_ptr<float>(), v0_per_channel, theta.numel() > 1,
          static_cast<float>(reuse_alpha), reuse_step, T, N, C, P, Cw,
          x.size(0) == 1 ? 0 : N * C * P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {masks, vT};
}

}  // namespace

TORCH_LIBRARY_IMPL(spikingir, CUDA, m) {
  m.impl("neuron_fwd", &neuron_fwd_cuda);
  m.impl("neuron_bwd", &neuron_bwd_cuda);
  m.impl("neuron_fwd_masks", &neuron_fwd_masks_cuda);
}

}  // namespace spikingir
