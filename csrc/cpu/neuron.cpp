// CPU kernels of spikingir::neuron_fwd / neuron_bwd (schemas: csrc/ops.cpp).
//
// Layout: x is [T, M] (M neurons per step, contiguous). Work is split over
// neurons with at::parallel_for; each task walks a chunk of kChunk neurons
// through all T steps, keeping membrane potentials in a local array so the
// inner loop is a branch-free, auto-vectorised pass over contiguous memory.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "../neuron.h"
#include "../neuron_math.h"

namespace spikingir {
namespace {

constexpr int64_t kChunk = 1024;

// The per-range loops are compiled twice, for AVX2 and the baseline ISA, and
// the loader picks the clone the CPU supports (GCC function multi-versioning):
// 8-wide vectors halve the sigmoid backward (35 -> 16 ms for T=10, N=1M, 1 thread).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SPK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPK_CPU_CLONES
#endif


// Gathers per-channel parameters of neurons [m0, m0 + n) into local arrays.
SPK_HD void gather(const Params& p, int64_t m0, int64_t n, float* th, float* be, float* al) {
  if (p.C == 1) {  // scalar parameters: a fill
    std::fill(th, th + n, p.theta[0]);
    std::fill(be, be + n, p.beta[0]);
    std::fill(al, al + n, p.alpha[0]);
    return;
  }
  // Channel of neuron m is (m / inner) % C: divide once, then step a counter.
  int64_t c = (m0 / p.inner) % p.C;
  int64_t left = p.inner - m0 % p.inner;  // neurons left in channel c
  for (int64_t i = 0; i < n; ++i) {
    th[i] = p.theta[c];
    be[i] = p.beta[c];
    al[i] = p.alpha[c];
    if (--left == 0) {
      left = p.inner;
      c = c + 1 == p.C ? 0 : c + 1;
    }
  }
}

template <typename scalar_t, typename save_t>
SPK_CPU_CLONES void fwd_range(const scalar_t* __restrict__ x, const float* v0,
                              scalar_t* __restrict__ y, float* __restrict__ vT,
                              save_t* __restrict__ saved, int64_t T, int64_t M, const Params& p,
                              int64_t begin, int64_t end) {
  const int64_t T_if = p.reuse_step ? T - 1 : T;
  const bool scale = p.scale_output;
  {
    float v[kChunk], th[kChunk], be[kChunk], al[kChunk];
    for (int64_t m0 = begin; m0 < end; m0 += kChunk) {
      const int64_t n = std::min(kChunk, end - m0);
      gather(p, m0, n, th, be, al);
      for (int64_t i = 0; i < n; ++i) v[i] = v0 ? v0[m0 + i] : 0.0f;
      for (int64_t t = 0; t < T; ++t) {
        const bool reuse = t >= T_if;
        // Threshold thr = thr_scale * theta, spike size k (theta; beta on the reuse
        // step; 1 when the output is not scaled).
        const float thr_scale = reuse ? p.reuse_alpha : 1.0f;
        const float* __restrict__ k = reuse ? be : th;
        const float k_on = scale ? 1.0f : 0.0f;
        const scalar_t* __restrict__ xt = x + t * M + m0;
        scalar_t* __restrict__ yt = y + t * M + m0;
        save_t* __restrict__ st = saved ? saved + t * M + m0 : nullptr;
        for (int64_t i = 0; i < n; ++i) {
          // h = v + x; u = h - thr; s = H(u); v = h - theta s (soft reset).
          const float h = v[i] + static_cast<float>(xt[i]);
          const float u = h - thr_scale * th[i];
          const float s = u >= 0.0f ? 1.0f : 0.0f;
          v[i] = h - th[i] * s;
          yt[i] = static_cast<scalar_t>(s * (k_on * k[i] + (1.0f - k_on)));
          store_saved(st, i, u);
        }
      }
      std::copy(v, v + n, vT + m0);
    }
  }
}

template <typename scalar_t, typename save_t>
void fwd_impl(const scalar_t* __restrict__ x, const float* v0, scalar_t* __restrict__ y,
              float* __restrict__ vT, save_t* __restrict__ saved, int64_t T, int64_t M,
              const Params& p) {
  at::parallel_for(0, M, kChunk, [&](int64_t begin, int64_t end) {
    fwd_range(x, v0, y, vT, saved, T, M, p, begin, end);
  });
}

template <typename scalar_t, typename save_t, int kSurrogate>
SPK_CPU_CLONES void bwd_range(const scalar_t* __restrict__ gy, const float* gvT,
                              const save_t* __restrict__ saved, scalar_t* __restrict__ gx,
                              float* __restrict__ gv0, float* gtheta_buf, float* gbeta_buf,
                              int64_t T, int64_t M, const Params& p, int64_t begin, int64_t end) {
  const int64_t T_if = p.reuse_step ? T - 1 : T;
  const bool scale = p.scale_output, detach = p.detach_reset;
  {
    float gv[kChunk], th[kChunk], be[kChunk], al[kChunk], gth[kChunk], gbe[kChunk];
    for (int64_t m0 = begin; m0 < end; m0 += kChunk) {
      const int64_t n = std::min(kChunk, end - m0);
      gather(p, m0, n, th, be, al);
      for (int64_t i = 0; i < n; ++i) {
        gv[i] = gvT ? gvT[m0 + i] : 0.0f;
        gth[i] = 0.0f;
        gbe[i] = 0.0f;
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        const bool reuse = t >= T_if;
        const float thr_scale = reuse ? p.reuse_alpha : 1.0f;
        const scalar_t* __restrict__ gyt = gy + t * M + m0;
        const save_t* __restrict__ st = saved + t * M + m0;
        scalar_t* __restrict__ gxt = gx + t * M + m0;
        const float* __restrict__ k = reuse ? be : th;
        // dL/dk goes to beta on the reuse step, to theta on IF steps.
        const float to_beta = reuse ? 1.0f : 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          const float u = static_cast<float>(st[i]);
          const float s = u >= 0.0f ? 1.0f : 0.0f;
          const float sg = surrogate_grad<kSurrogate>(u, al[i]);
          float gh, g_theta, g_k;
          step_backward(static_cast<float>(gyt[i]), gv[i], s, sg, th[i], k[i], thr_scale,
                        scale, detach, gh, g_theta, g_k);
          gxt[i] = static_cast<scalar_t>(gh);
          gv[i] = gh;
          gth[i] += g_theta + (1.0f - to_beta) * g_k;
          gbe[i] += to_beta * g_k;
        }
      }
      std::copy(gv, gv + n, gv0 + m0);
      if (gtheta_buf) std::copy(gth, gth + n, gtheta_buf + m0);
      if (gbeta_buf) std::copy(gbe, gbe + n, gbeta_buf + m0);
    }
  }
}

template <typename scalar_t, typename save_t, int kSurrogate>
void bwd_impl(const scalar_t* __restrict__ gy, const float* gvT, const save_t* __restrict__ saved,
              scalar_t* __restrict__ gx, float* __restrict__ gv0, float* gtheta_buf,
              float* gbeta_buf, int64_t T, int64_t M, const Params& p) {
  at::parallel_for(0, M, kChunk, [&](int64_t begin, int64_t end) {
    bwd_range<scalar_t, save_t, kSurrogate>(gy, gvT, saved, gx, gv0, gtheta_buf, gbeta_buf, T, M,
                                            p, begin, end);
  });
}

// Sums a per-neuron buffer [B, C, inner] (flattened) over all but the channel
// axis. Each channel is summed in a fixed order in double, so the result does
// not depend on the number of threads.
at::Tensor channel_sum(const at::Tensor& buf, int64_t C, int64_t inner) {
  auto out = at::zeros({C}, buf.options());
  const float* b = buf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t M = buf.numel();
  const int64_t B = M / (C * inner);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0.0;
      for (int64_t bi = 0; bi < B; ++bi) {
        const float* row = b + (bi * C + c) * inner;
        for (int64_t j = 0; j < inner; ++j) acc += row[j];
      }
      o[c] = static_cast<float>(acc);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> neuron_fwd_cpu(
    const at::Tensor& x, const at::Tensor& theta, const at::Tensor& beta,
    const std::optional<at::Tensor>& v0, const at::Tensor& alpha, int64_t surrogate,
    double reuse_alpha, bool reuse_step, bool scale_output, bool detach_reset, int64_t inner,
    int64_t save_bytes) {
  check_common(x, theta, beta, alpha, inner, at::kCPU);
  TORCH_CHECK(save_bytes == 0 || save_bytes == 2 || save_bytes == 4,
              "neuron_fwd: save_bytes must be 0, 2 or 4");
  const int64_t T = x.size(0);
  const int64_t M = x.numel() / T;
  TORCH_CHECK(!reuse_step || T >= 2, "neuron_fwd: the MPRN reuse step needs T + 1 >= 2 steps");
  const float* v0p = nullptr;
  if (v0.has_value()) {
    TORCH_CHECK(v0->scalar_type() == at::kFloat && v0->is_contiguous() && v0->numel() == M,
                "neuron_fwd: v0 must be contiguous float32 with one value per neuron");
    v0p = v0->data_ptr<float>();
  }
  auto y = at::empty_like(x);
  auto vT = at::empty(x.sizes().slice(1), x.options().dtype(at::kFloat));
  auto saved = save_bytes == 0 ? at::empty({0}, x.options().dtype(at::kFloat))
                               : at::empty_like(x, x.options().dtype(save_bytes == 2 ? at::kBFloat16 : at::kFloat));
  const Params p = make_params(theta, beta, alpha, inner, reuse_alpha, reuse_step, scale_output,
                               detach_reset);
  SPK_DISPATCH_FLOATS(x.scalar_type(), "neuron_fwd_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    float* vTp = vT.data_ptr<float>();
    if (save_bytes == 2) {
      fwd_impl(xp, v0p, yp, vTp, saved.data_ptr<c10::BFloat16>(), T, M, p);
    } else if (save_bytes == 4) {
      fwd_impl(xp, v0p, yp, vTp, saved.data_ptr<float>(), T, M, p);
    } else {
      fwd_impl(xp, v0p, yp, vTp, static_cast<NoSave*>(nullptr), T, M, p);
    }
  });
  return {y, vT, saved};
}

template <typename scalar_t, typename save_t>
void bwd_dispatch(int64_t surrogate, const scalar_t* gy, const float* gvT, const save_t* saved,
                  scalar_t* gx, float* gv0, float* gth, float* gbe, int64_t T, int64_t M,
                  const Params& p) {
  switch (surrogate) {
    case kSigmoid: return bwd_impl<scalar_t, save_t, kSigmoid>(gy, gvT, saved, gx, gv0, gth, gbe, T, M, p);
    case kAtan: return bwd_impl<scalar_t, save_t, kAtan>(gy, gvT, saved, gx, gv0, gth, gbe, T, M, p);
    case kTriangle: return bwd_impl<scalar_t, save_t, kTriangle>(gy, gvT, saved, gx, gv0, gth, gbe, T, M, p);
    case kRectangle: return bwd_impl<scalar_t, save_t, kRectangle>(gy, gvT, saved, gx, gv0, gth, gbe, T, M, p);
    default: TORCH_CHECK(false, "neuron_bwd: unknown surrogate id ", surrogate);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neuron_bwd_cpu(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_v, const at::Tensor& saved,
    const at::Tensor& theta, const at::Tensor& beta, const at::Tensor& alpha, int64_t surrogate,
    double reuse_alpha, bool reuse_step, bool scale_output, bool detach_reset, int64_t inner,
    bool need_theta_grad, bool need_beta_grad) {
  check_common(grad_y, theta, beta, alpha, inner, at::kCPU);
  TORCH_CHECK(saved.sizes() == grad_y.sizes() && saved.is_contiguous(),
              "neuron_bwd: saved must be contiguous and shaped like grad_y");
  const int64_t T = grad_y.size(0);
  const int64_t M = grad_y.numel() / T;
  const float* gvp = nullptr;
  if (grad_v.has_value()) {
    TORCH_CHECK(grad_v->scalar_type() == at::kFloat && grad_v->is_contiguous() && grad_v->numel() == M,
                "neuron_bwd: grad_v must be contiguous float32 with one value per neuron");
    gvp = grad_v->data_ptr<float>();
  }
  auto gx = at::empty_like(grad_y);
  auto gv0 = at::empty(grad_y.sizes().slice(1), grad_y.options().dtype(at::kFloat));
  const auto fopt = grad_y.options().dtype(at::kFloat);
  at::Tensor gth_buf = need_theta_grad ? at::empty({M}, fopt) : at::Tensor();
  at::Tensor gbe_buf = need_beta_grad ? at::empty({M}, fopt) : at::Tensor();
  const Params p = make_params(theta, beta, alpha, inner, reuse_alpha, reuse_step, scale_output,
                               detach_reset);
  float* gth = need_theta_grad ? gth_buf.data_ptr<float>() : nullptr;
  float* gbe = need_beta_grad ? gbe_buf.data_ptr<float>() : nullptr;
  SPK_DISPATCH_FLOATS(grad_y.scalar_type(), "neuron_bwd_cpu", [&] {
    if (saved.scalar_type() == at::kBFloat16) {
      bwd_dispatch<scalar_t, c10::BFloat16>(surrogate, grad_y.data_ptr<scalar_t>(), gvp,
                                            saved.data_ptr<c10::BFloat16>(), gx.data_ptr<scalar_t>(),
                                            gv0.data_ptr<float>(), gth, gbe, T, M, p);
    } else {
      TORCH_CHECK(saved.scalar_type() == at::kFloat, "neuron_bwd: saved must be float32 or bfloat16");
      bwd_dispatch<scalar_t, float>(surrogate, grad_y.data_ptr<scalar_t>(), gvp,
                                    saved.data_ptr<float>(), gx.data_ptr<scalar_t>(),
                                    gv0.data_ptr<float>(), gth, gbe, T, M, p);
    }
  });
  const int64_t C = theta.numel();
  auto g_theta = need_theta_grad ? channel_sum(gth_buf, C, inner) : at::zeros({C}, fopt);
  auto g_beta = need_beta_grad ? channel_sum(gbe_buf, C, inner) : at::zeros({C}, fopt);
  return {gx, gv0, g_theta, g_beta};
}

// neuron_fwd_masks: one task per (image n, tile of kMaskTile pixels) walks all
// T steps over every channel. The potentials of the tile (C x kMaskTile floats)
// stay in a local buffer; each step's spikes are ORed into the tile's channel
// words (bit c % 64 of word c / 64), written once per step: 1/32 of the bytes
// of a float32 spike tensor. The arithmetic is that of fwd_range, so the
// spikes are bitwise those of neuron_fwd.
// The tile reads x as C short runs per step, one per channel plane, planes
// P floats apart: the hardware prefetchers do not follow 64 such streams, and
// the loads waited on memory. Hence 256-pixel tiles (1 KB runs) and a software
// prefetch of the run kMaskPrefetch channels ahead. Measured on the AVX2 EPYC,
// one thread, the s25 DnCNN's [11, 1, 64, 256, 256] layers: 106-134 -> 43-53 ms
// a call (64-pixel tiles without prefetch before; 256 alone: 73-90 ms).
constexpr int64_t kMaskTile = 256;
constexpr int64_t kMaskPrefetch = 4;

struct MaskShape {
  int64_t T, N, C, P, Cw;  // x [T, N, C, P] (or [1, ...]), masks [T, N, P, Cw]
  int64_t x_step;          // elements between steps of x: N C P, or 0 (one input for all)
};

template <typename scalar_t>
SPK_CPU_CLONES void fwd_masks_tile(const scalar_t* __restrict__ x, const float* v0,
                                   uint64_t* __restrict__ masks, float* __restrict__ vT,
                                   bool v0_per_channel, const float* theta,
                                   bool per_channel, float reuse_alpha,
                                   bool reuse_step, const MaskShape& d, int64_t n, int64_t p0,
                                   int64_t np, float* __restrict__ v,
                                   uint64_t* __restrict__ words) {
  const int64_t T_if = reuse_step ? d.T - 1 : d.T;
  for (int64_t c = 0; c < d.C; ++c) {
    const int64_t off = (n * d.C + c) * d.P + p0;
    for (int64_t i = 0; i < np; ++i) {
      v[c * kMaskTile + i] = v0 ? (v0_per_channel ? v0[c] : v0[off + i]) : 0.0f;
    }
  }
  for (int64_t t = 0; t < d.T; ++t) {
    const float thr_scale = t >= T_if ? reuse_alpha : 1.0f;
    std::fill(words, words + np * d.Cw, uint64_t{0});
    for (int64_t c = 0; c < d.C; ++c) {
      const float th = theta[per_channel ? c : 0];
      const scalar_t* __restrict__ xt = x + t * d.x_step + (n * d.C + c) * d.P + p0;
      float* __restrict__ vc = v + c * kMaskTile;
#if defined(__GNUC__)
      {  // the run of channel c + kMaskPrefetch (past the last channel: of the next step)
        const int64_t ahead = c + kMaskPrefetch, pt = t + ahead / d.C, pc = ahead % d.C;
        if (pt < d.T) {
          const char* next = reinterpret_cast<const char*>(x + pt * d.x_step +
                                                           (n * d.C + pc) * d.P + p0);
          for (int64_t b = 0; b < np * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
            __builtin_prefetch(next + b);
          }
        }
      }
#endif
      uint64_t* __restrict__ wc = words + c / 64;
      const int bit = static_cast<int>(c % 64);
      for (int64_t i = 0; i < np; ++i) {
        // h = v + x; u = h - thr; s = H(u); v = h - theta s (as fwd_range)
        const float h = vc[i] + static_cast<float>(xt[i]);
        const float u = h - thr_scale * th;
        const float s = u >= 0.0f ? 1.0f : 0.0f;
        vc[i] = h - th * s;
        wc[i * d.Cw] |= static_cast<uint64_t>(u >= 0.0f) << bit;
      }
    }
    std::copy(words, words + np * d.Cw, masks + ((t * d.N + n) * d.P + p0) * d.Cw);
  }
  for (int64_t c = 0; c < d.C; ++c) {
    std::copy(v + c * kMaskTile, v + c * kMaskTile + np, vT + (n * d.C + c) * d.P + p0);
  }
}

std::tuple<at::Tensor, at::Tensor> neuron_fwd_masks_cpu(const at::Tensor& x,
                                                        const at::Tensor& theta,
                                                        const std::optional<at::Tensor>& v0,
                                                        double reuse_alpha, bool reuse_step,
                                                        int64_t steps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 3 && x.is_contiguous() && steps >= 1 &&
                  (x.size(0) == steps || x.size(0) == 1),
              "neuron_fwd_masks (cpu): x must be a contiguous CPU tensor [steps or 1, N, C, ...], "
              "steps >= 1");
  TORCH_CHECK(!reuse_step || steps >= 2,
              "neuron_fwd_masks: the MPRN reuse step needs T + 1 >= 2 steps");
  const int64_t C = x.size(2);
  TORCH_CHECK(theta.device().is_cpu() && theta.scalar_type() == at::kFloat && theta.dim() == 1 &&
                  theta.is_contiguous() && (theta.numel() == 1 || theta.numel() == C),
              "neuron_fwd_masks (cpu): theta must be contiguous float32 [C] or [1]");
  MaskShape d{steps, x.size(1), C, 1, (C + 63) / 64, 0};
  for (int64_t i = 3; i < x.dim(); ++i) d.P *= x.size(i);
  d.x_step = x.size(0) == 1 ? 0 : d.N * C * d.P;
  const float* v0p = nullptr;
  if (v0.has_value()) {
    TORCH_CHECK(v0->device().is_cpu() && v0->scalar_type() == at::kFloat && v0->is_contiguous() &&
                    (v0->numel() == d.N * C * d.P || (v0->dim() == 1 && v0->numel() == C)),
                "neuron_fwd_masks: v0 must be contiguous float32 with one value per neuron or "
                "per channel");
    v0p = v0->data_ptr<float>();
  }
  const bool v0_per_channel = v0.has_value() && v0->dim() == 1 && v0->numel() == C;
  std::vector<int64_t> mshape{d.T, d.N};
  for (int64_t i = 3; i < x.dim(); ++i) mshape.push_back(x.size(i));
  mshape.push_back(d.Cw);
  auto masks = at::empty(mshape, x.options().dtype(at::kLong));
  auto vT = at::empty(x.sizes().slice(1), x.options().dtype(at::kFloat));
  uint64_t* mp = reinterpret_cast<uint64_t*>(masks.data_ptr<int64_t>());
  float* vTp = vT.data_ptr<float>();
  const float* th = theta.data_ptr<float>();
  const bool per_channel = theta.numel() > 1;
  const int64_t tiles = (d.P + kMaskTile - 1) / kMaskTile;
  SPK_DISPATCH_FLOATS(x.scalar_type(), "neuron_fwd_masks_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, d.N * tiles, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> v(C * kMaskTile);
      std::vector<uint64_t> words(kMaskTile * d.Cw);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / tiles, p0 = (r % tiles) * kMaskTile;
        fwd_masks_tile(xp, v0p, mp, vTp, v0_per_channel, th, per_channel,
                       static_cast<float>(reuse_alpha),
                       reuse_step, d, n, p0, std::min(kMaskTile, d.P - p0), v.data(),
                       words.data());
      }
    });
  });
  return {masks, vT};
}

}  // namespace

TORCH_LIBRARY_IMPL(spikingir, CPU, m) {
  m.impl("neuron_fwd", &neuron_fwd_cpu);
  m.impl("neuron_bwd", &neuron_bwd_cpu);
  m.impl("neuron_fwd_masks", &neuron_fwd_masks_cpu);
}

}  // namespace spikingir
