// CPU kernels of spikingir::spike_conv2d_fwd / spike_conv2d_bwd (schemas: csrc/ops.cpp).
//
// Event-driven convolution of binary spike maps (DESIGN.md section 4):
//   1. pack: one pass over s writes 1 bit per spike ([N, Cin, H, ceil(W/8)]
//      uint8, bit b of byte j = pixel 8 j + b) and counts the spikes. The bits
//      are what backward keeps, and what the accumulation walks.
//   2. accumulate: one task per output row (n, oy) keeps a channels-last row
//      accumulator acc[Wo][Cout] (starts at the bias); for every spike
//      (ci, iy, ix) of the input rows that feed it, each tap (ky, kx) adds the
//      weight column wt[ci][ky][kx][:] (weights pre-transposed to
//      [Cin, kh, kw, Cout], contiguous over Cout) to acc[ox][:]. Adds only;
//      work proportional to the number of spikes. The row is then written to
//      the NCHW output.
// Each output value is summed in a fixed order (ky, ci, ix, kx) that does not
// depend on the thread count: the result is bitwise reproducible.
// Above the firing rate `dense_rate` the dense oneDNN convolution is faster and
// runs instead (benchmarks/bench_spike_conv.py measures the crossover).
//
// Backward: grad_s is dense (at::conv_transpose2d); grad_weight walks the
// packed spikes: grad_w[ci][ky][kx][:] += grad_out_cl[n][oy][ox][:] per spike
// and tap, one task per input channel (fixed order), float partial sums per
// image folded into double.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/conv_transpose2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

#include "../dispatch.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace spikingir {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SPK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPK_CPU_CLONES
#endif

struct Geometry {
  int64_t N, Cin, H, W, Wb, Cout, kh, kw, Ho, Wo, stride, pad;
};

Geometry geometry(int64_t N, int64_t Cin, int64_t H, int64_t W, const at::Tensor& weight,
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

// Pass 1 over rows [r0, r1) of s viewed as [N * Cin * H, W]: writes the bits,
// returns the spike count and sets `bad` when a value is neither 0 nor 1.
template <typename scalar_t>
int64_t pack_rows(const scalar_t* __restrict__ s, uint8_t* __restrict__ bits, int64_t W,
                  int64_t Wb, int64_t r0, int64_t r1, bool& bad) {
  int64_t count = 0;
  bool nonbinary = false;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = s + r * W;
    uint8_t* out = bits + r * Wb;
    for (int64_t j = 0; j < Wb; ++j) {
      uint32_t byte = 0;
      for (int64_t b = 0; b < 8 && 8 * j + b < W; ++b) {
        const float v = static_cast<float>(row[8 * j + b]);
        byte |= static_cast<uint32_t>(v != 0.0f) << b;
        nonbinary |= v != 0.0f && v != 1.0f;
      }
      out[j] = static_cast<uint8_t>(byte);
      count += __builtin_popcount(byte);
    }
  }
  bad = bad || nonbinary;
  return count;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define SPK_HAVE_AVX2_PACK 1
// float32 rows, 8 values per compare + movemask.
__attribute__((target("avx2,popcnt"))) int64_t pack_rows_avx2(const float* __restrict__ s,
                                                              uint8_t* __restrict__ bits,
                                                              int64_t W, int64_t Wb, int64_t r0,
                                                              int64_t r1, bool& bad) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  __m256 nonbinary = _mm256_setzero_ps();
  int64_t count = 0;
  const int64_t full = W / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = s + r * W;
    uint8_t* out = bits + r * Wb;
    for (int64_t j = 0; j < full; ++j) {
      const __m256 x = _mm256_loadu_ps(row + 8 * j);
      const __m256 nz = _mm256_cmp_ps(x, zero, _CMP_NEQ_UQ);  // NaN: set
      nonbinary = _mm256_or_ps(nonbinary, _mm256_and_ps(nz, _mm256_cmp_ps(x, one, _CMP_NEQ_UQ)));
      const uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(nz));
      out[j] = static_cast<uint8_t>(m);
      count += _mm_popcnt_u32(m);
    }
    if (full < Wb) {
      uint32_t byte = 0;
      bool nb = false;
      for (int64_t b = 0; b < W - 8 * full; ++b) {
        const float v = row[8 * full + b];
        byte |= static_cast<uint32_t>(v != 0.0f) << b;
        nb |= v != 0.0f && v != 1.0f;
      }
      out[full] = static_cast<uint8_t>(byte);
      count += _mm_popcnt_u32(byte);
      bad = bad || nb;
    }
  }
  bad = bad || _mm256_movemask_ps(nonbinary) != 0;
  return count;
}
#endif

template <typename scalar_t>
int64_t pack_rows_best(const scalar_t* s, uint8_t* bits, int64_t W, int64_t Wb, int64_t r0,
                       int64_t r1, bool& bad, bool /*avx2*/) {
  return pack_rows(s, bits, W, Wb, r0, r1, bad);
}

inline int64_t pack_rows_best(const float* s, uint8_t* bits, int64_t W, int64_t Wb, int64_t r0,
                              int64_t r1, bool& bad, bool avx2) {
#ifdef SPK_HAVE_AVX2_PACK
  if (avx2) return pack_rows_avx2(s, bits, W, Wb, r0, r1, bad);
#endif
  return pack_rows(s, bits, W, Wb, r0, r1, bad);
}

// Packs all of s; returns the spike count, sets `bad` as pack_rows.
int64_t pack(const at::Tensor& s, uint8_t* bits, int64_t W, int64_t Wb, bool& bad) {
  const int64_t rows = s.numel() / std::max<int64_t>(W, 1);
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(rows, 256));
  std::vector<int64_t> counts(nchunks, 0);
  std::vector<char> bads(nchunks, 0);
#ifdef SPK_HAVE_AVX2_PACK
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#else
  const bool avx2 = false;
#endif
  SPK_DISPATCH_FLOATS(s.scalar_type(), "spike_conv2d_pack", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = rows * c / nchunks, r1 = rows * (c + 1) / nchunks;
        bool b = false;
        counts[c] = pack_rows_best(sp, bits, W, Wb, r0, r1, b, avx2);
        bads[c] = b;
      }
    });
  });
  int64_t total = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    total += counts[c];
    bad = bad || bads[c];
  }
  return total;
}

int64_t popcount_bytes(const uint8_t* bits, int64_t n) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += __builtin_popcount(bits[i]);
  return total;
}

// dst[0..n) += src[0..n): the only arithmetic of the event-driven paths.
inline void add_column(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Pass 2 for output rows [r0, r1) of [N * Ho]: acc is a Wo * Cout scratch row.
// The stride is a template parameter: no integer division per spike and tap.
template <int64_t st>
SPK_CPU_CLONES void accumulate_rows(const uint8_t* __restrict__ bits, const float* __restrict__ wt,
                                    const float* bias, float* __restrict__ out, float* acc,
                                    const Geometry& g, int64_t r0, int64_t r1) {
  const int64_t Cout = g.Cout, pad = g.pad;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, oy = r % g.Ho;
    for (int64_t ox = 0; ox < g.Wo; ++ox) {
      float* a = acc + ox * Cout;
      if (bias) {
        std::memcpy(a, bias, Cout * sizeof(float));
      } else {
        std::fill(a, a + Cout, 0.0f);
      }
    }
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * st + ky - pad;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t ci = 0; ci < g.Cin; ++ci) {
        const uint8_t* row = bits + ((n * g.Cin + ci) * g.H + iy) * g.Wb;
        const float* wk = wt + (ci * g.kh + ky) * g.kw * Cout;
        for (int64_t j = 0; j < g.Wb; ++j) {
          uint32_t byte = row[j];
          while (byte) {
            const int64_t ix = 8 * j + __builtin_ctz(byte);
            byte &= byte - 1;
            // Output column ox receives tap kx when ox * st = ix + pad - kx.
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t t = ix + pad - kx;
              if (t < 0) break;
              if (t % st) continue;
              const int64_t ox = t / st;
              if (ox >= g.Wo) continue;
              add_column(acc + ox * Cout, wk + kx * Cout, Cout);
            }
          }
        }
      }
    }
    // acc[ox][co] -> out[n][co][oy][ox]
    float* o = out + n * Cout * g.Ho * g.Wo + oy * g.Wo;
    for (int64_t co = 0; co < Cout; ++co) {
      float* oc = o + co * g.Ho * g.Wo;
      for (int64_t ox = 0; ox < g.Wo; ++ox) oc[ox] = acc[ox * Cout + co];
    }
  }
}

// grad_weight of input channels [c0, c1): gw is [Cin, kh, kw, Cout] float32.
template <int64_t st>
SPK_CPU_CLONES void grad_weight_channels(const uint8_t* __restrict__ bits,
                                         const float* __restrict__ go_cl, float* __restrict__ gw,
                                         const Geometry& g, int64_t c0, int64_t c1) {
  const int64_t Cout = g.Cout, pad = g.pad;
  const int64_t taps = g.kh * g.kw * Cout;
  std::vector<float> part(taps);
  std::vector<double> total(taps);
  for (int64_t ci = c0; ci < c1; ++ci) {
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t n = 0; n < g.N; ++n) {
      std::fill(part.begin(), part.end(), 0.0f);
      bool any = false;
      for (int64_t iy = 0; iy < g.H; ++iy) {
        const uint8_t* row = bits + ((n * g.Cin + ci) * g.H + iy) * g.Wb;
        for (int64_t j = 0; j < g.Wb; ++j) {
          uint32_t byte = row[j];
          while (byte) {
            const int64_t ix = 8 * j + __builtin_ctz(byte);
            byte &= byte - 1;
            any = true;
            for (int64_t ky = 0; ky < g.kh; ++ky) {
              const int64_t ty = iy + pad - ky;
              if (ty < 0) break;
              if (ty % st) continue;
              const int64_t oy = ty / st;
              if (oy >= g.Ho) continue;
              const float* grow = go_cl + (n * g.Ho + oy) * g.Wo * Cout;
              float* pk = part.data() + ky * g.kw * Cout;
              for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t tx = ix + pad - kx;
                if (tx < 0) break;
                if (tx % st) continue;
                const int64_t ox = tx / st;
                if (ox >= g.Wo) continue;
                add_column(pk + kx * Cout, grow + ox * Cout, Cout);
              }
            }
          }
        }
      }
      if (any) {
        for (int64_t i = 0; i < taps; ++i) total[i] += part[i];
      }
    }
    float* dst = gw + ci * taps;
    for (int64_t i = 0; i < taps; ++i) dst[i] = static_cast<float>(total[i]);
  }
}

at::Tensor unpack(const at::Tensor& packed, const Geometry& g) {
  auto s = at::empty({g.N, g.Cin, g.H, g.W}, packed.options().dtype(at::kFloat));
  const uint8_t* bits = packed.data_ptr<uint8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, g.N * g.Cin * g.H, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t x = 0; x < g.W; ++x) sp[r * g.W + x] = (bits[r * g.Wb + x / 8] >> (x % 8)) & 1;
    }
  });
  return s;
}

void check_weight(const at::Tensor& weight, int64_t Cin, int64_t stride, int64_t pad) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat &&
                  weight.dim() == 4 && weight.is_contiguous(),
              "spike_conv2d (cpu): weight must be a contiguous float32 CPU tensor [Cout, Cin, kh, kw]");
  TORCH_CHECK(weight.size(1) == Cin, "spike_conv2d: weight has ", weight.size(1),
              " input channels, the spikes ", Cin);
  TORCH_CHECK((stride == 1 || stride == 2) && pad >= 0,
              "spike_conv2d (cpu): stride must be 1 or 2 and padding >= 0");
}

std::tuple<at::Tensor, at::Tensor> spike_conv2d_fwd_cpu(const at::Tensor& s,
                                                       const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       int64_t stride, int64_t padding,
                                                       double dense_rate, bool validate,
                                                       bool save) {
  TORCH_CHECK(s.device().is_cpu() && s.dim() == 4 && s.is_contiguous(),
              "spike_conv2d (cpu): s must be a contiguous 4-d CPU tensor [N, Cin, H, W]");
  check_weight(weight, s.size(1), stride, padding);
  const Geometry g = geometry(s.size(0), s.size(1), s.size(2), s.size(3), weight, stride, padding);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "spike_conv2d: kernel larger than the padded input");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                    bias->numel() == g.Cout && bias->device().is_cpu(),
                "spike_conv2d (cpu): bias must be a contiguous float32 CPU tensor [Cout]");
    bp = bias->data_ptr<float>();
  }
  const auto u8 = s.options().dtype(at::kByte);
  auto packed = at::empty({g.N, g.Cin, g.H, g.Wb}, u8);
  bool nonbinary = false;
  const int64_t spikes = s.numel() ? pack(s, packed.data_ptr<uint8_t>(), g.W, g.Wb, nonbinary) : 0;
  TORCH_CHECK_VALUE(!validate || !nonbinary,
                    "s: expected a binary spike map (only 0 and 1), found other values; pass "
                    "validate=False to skip this check");
  const double rate = s.numel() ? static_cast<double>(spikes) / s.numel() : 0.0;
  at::Tensor out;
  if (rate > dense_rate) {
    out = at::conv2d(s.to(at::kFloat), weight, bias, {stride, stride}, {padding, padding})
              .contiguous();
  } else {
    out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, s.options().dtype(at::kFloat));
    const at::Tensor wt = weight.permute({1, 2, 3, 0}).contiguous();  // [Cin, kh, kw, Cout]
    const float* wtp = wt.data_ptr<float>();
    const uint8_t* bits = packed.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> acc(g.Wo * g.Cout);
      if (g.stride == 1) {
        accumulate_rows<1>(bits, wtp, bp, op, acc.data(), g, r0, r1);
      } else {
        TORCH_CHECK(g.stride == 2, "spike_conv2d (cpu): stride must be 1 or 2");
        accumulate_rows<2>(bits, wtp, bp, op, acc.data(), g, r0, r1);
      }
    });
  }
  if (!save) packed = at::empty({0}, u8);
  return {out, packed};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spike_conv2d_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& weight,
    int64_t height, int64_t width, int64_t stride, int64_t padding, double dense_rate,
    bool need_s, bool need_weight, bool need_bias) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == at::kFloat &&
                  grad_out.dim() == 4 && grad_out.is_contiguous(),
              "spike_conv2d_bwd (cpu): grad_out must be contiguous float32 [N, Cout, Ho, Wo]");
  const int64_t Cin = weight.size(1);
  check_weight(weight, Cin, stride, padding);
  const Geometry g = geometry(grad_out.size(0), Cin, height, width, weight, stride, padding);
  TORCH_CHECK(grad_out.size(1) == g.Cout && grad_out.size(2) == g.Ho && grad_out.size(3) == g.Wo,
              "spike_conv2d_bwd: grad_out has the wrong shape");
  const auto f32 = grad_out.options().dtype(at::kFloat);
  at::Tensor gs = at::empty({0}, f32), gw = at::empty({0}, f32), gb = at::empty({0}, f32);
  if (need_s) {
    // The transposed convolution maps [Ho, Wo] back to [H, W] with output_padding.
    const int64_t oph = height - ((g.Ho - 1) * stride - 2 * padding + g.kh);
    const int64_t opw = width - ((g.Wo - 1) * stride - 2 * padding + g.kw);
    gs = at::conv_transpose2d(grad_out, weight, {}, {stride, stride}, {padding, padding},
                              {oph, opw})
             .contiguous();
  }
  if (need_weight) {
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                    packed.dim() == 4 && packed.size(0) == g.N && packed.size(1) == Cin &&
                    packed.size(2) == height && packed.size(3) == g.Wb,
                "spike_conv2d_bwd: packed must be uint8 [N, Cin, height, ceil(width / 8)]");
    const uint8_t* bits = packed.data_ptr<uint8_t>();
    const int64_t numel = g.N * Cin * height * width;
    const double rate = numel ? static_cast<double>(popcount_bytes(bits, packed.numel())) / numel : 0.0;
    if (rate > dense_rate) {
      gw = std::get<1>(at::convolution_backward(grad_out, unpack(packed, g), weight, std::nullopt,
                                                {stride, stride}, {padding, padding}, {1, 1},
                                                false, {0, 0}, 1, {false, true, false}))
               .contiguous();
    } else {
      const at::Tensor go_cl = grad_out.permute({0, 2, 3, 1}).contiguous();  // [N, Ho, Wo, Cout]
      auto gwt = at::empty({Cin, g.kh, g.kw, g.Cout}, f32);
      const float* gop = go_cl.data_ptr<float>();
      float* gwp = gwt.data_ptr<float>();
      at::parallel_for(0, Cin, 1, [&](int64_t c0, int64_t c1) {
        if (g.stride == 1) {
          grad_weight_channels<1>(bits, gop, gwp, g, c0, c1);
        } else {
          grad_weight_channels<2>(bits, gop, gwp, g, c0, c1);
        }
      });
      gw = gwt.permute({3, 0, 1, 2}).contiguous();
    }
  }
  if (need_bias) gb = grad_out.sum({0, 2, 3});
  return {gs, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(spikingir, CPU, m) {
  m.impl("spike_conv2d_fwd", &spike_conv2d_fwd_cpu);
  m.impl("spike_conv2d_bwd", &spike_conv2d_bwd_cpu);
}

}  // namespace spikingir
