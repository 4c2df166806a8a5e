// Per-neuron maths shared by the CPU (cpu/neuron.cpp) and CUDA (cuda/neuron.cu)
// kernels. The pure-torch reference is spikingir/ops/reference.py; the Triton
// twin is kernels/neuron.py. Equations: DESIGN.md section 3.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

// always_inline on the host: the CPU kernels are compiled in several ISA clones
// (cpu/neuron.cpp), and GCC only inlines across differing targets when forced.
#ifdef __CUDACC__
#define SPK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define SPK_HD inline __attribute__((always_inline))
#else
#define SPK_HD inline
#endif

namespace spikingir {

// Element type of the saved u when the forward keeps nothing (inference):
// stores to it compile to nothing.
struct NoSave {};
template <typename save_t>
SPK_HD void store_saved(save_t* p, int64_t i, float u) { p[i] = static_cast<save_t>(u); }
template <>
SPK_HD void store_saved<NoSave>(NoSave*, int64_t, float) {}

// Surrogate ids; must match spikingir/ops/surrogate.py.
enum Surrogate : int { kSigmoid = 0, kAtan = 1, kTriangle = 2, kRectangle = 3 };

// exp(x) for x <= 0 (the only use here), written so that gcc/clang vectorise it
// at the baseline ISA (SSE2/NEON): x = n ln2 + r, |r| <= ln2/2, exp(r) by a
// degree-6 polynomial (rel. error < 2e-7), 2^n built from the exponent bits.
SPK_HD float exp_nonpos(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest without floorf/rintf (which need SSE4.1 to vectorise).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

// Beyond |a u| = kSigmoidCutoff the sigmoid surrogate is exactly 0 (it would be at most
// a e^-40 ~ 4e-18 a): such values only ever turn into subnormal floats after a product or
// two, and subnormal gradients made CPU fine-tuning ~5x slower on Intel CPUs (oneDNN's
// conv backward on them). Must match SIGMOID_CUTOFF in spikingir/ops/surrogate.py.
constexpr float kSigmoidCutoff = 40.0f;

// d/du of the spike surrogate at u = h - threshold; each integrates to 1 over u.
//   sigmoid   a sig(a u) (1 - sig(a u)) = a e / (1 + e)^2, e = exp(-|a u|); 0 for |a u| > 40
//   atan      (a/2) / (1 + (pi a u / 2)^2)
//   triangle  a max(0, 1 - a|u|)
//   rectangle a [|u| < 1/(2a)]
template <int kSurrogate>
SPK_HD float surrogate_grad(float u, float a) {
  if (kSurrogate == kSigmoid) {
    const float au = fabsf(a * u);
    const float e = exp_nonpos(-au);
    const float d = 1.0f + e;
    return au > kSigmoidCutoff ? 0.0f : a * e / (d * d);
  } else if (kSurrogate == kAtan) {
    const float z = 1.57079632679489662f * a * u;
    return 0.5f * a / (1.0f + z * z);
  } else if (kSurrogate == kTriangle) {
    const float r = 1.0f - a * fabsf(u);
    return r > 0.0f ? a * r : 0.0f;
  } else {
    return fabsf(u) < 0.5f / a ? a : 0.0f;
  }
}

// One backward step, shared by IF steps and the MPRN reuse step.
// Forward of the step: u = h - thr, s = H(u), y = k s (or s), v = h - theta s,
// with thr = theta, k = theta (IF) or thr = reuse_alpha theta, k = beta (reuse).
// In: gy = dL/dy, gv = dL/dv (from the future), sg = surrogate'(u).
// Out: gh = dL/dh (= dL/dx and dL/dv of the previous step),
//      d_theta (dL/dtheta of this step), d_k (dL/dk of this step, k = theta or beta).

SPK_HD void step_backward(float gy, float gv, float s, float sg, float theta, float k,
                          float thr_per_theta, bool scale_output, bool detach_reset,
                          float& gh, float& g_theta, float& g_k) {
  // dL/ds: through the output (k gy, or gy unscaled) and, unless the reset is
  // detached, through v = h - theta s.
  // (Written with multiplications by 0/1 instead of branches so that it vectorises.)
  const float on_scale = scale_output ? 1.0f : 0.0f;
  const float on_reset = detach_reset ? 0.0f : 1.0f;
  const float gs = (on_scale * k + (1.0f - on_scale)) * gy - on_reset * theta * gv;
  gh = gv + gs * sg;
  // theta enters the reset (-s gv, also when detached) and the threshold
  // (du/dtheta = -thr_per_theta); k enters the output.
  g_theta = -gv * s - thr_per_theta * gs * sg;
  g_k = on_scale * gy * s;
}

}  // namespace spikingir
