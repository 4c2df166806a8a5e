// CPU kernels of spikingir::spike_conv2d_fwd / spike_conv2d_bwd (schemas: csrc/ops.cpp).
//
// Event-driven convolution of binary spike maps (DESIGN.md section 4):
//   0. rate: the firing rate of every 8th input row picks the path; above
//      `dense_rate` the dense oneDNN convolution is faster and runs instead
//      (the caller sets it per layer shape from measured crossovers:
//      spikingir/ops/spike_conv.py dense_rates; < 0 always dense, >= 1 never).
//   1. pack: one pass over s writes 1 bit per spike along W ([N, Cin, H,
//      ceil(W/8)] uint8, bit b of byte j = pixel 8 j + b: what backward keeps)
//      and, by 8x8 bit transposes, the channel mask of every pixel (Cin bits);
//      it also checks that s is binary.
//   2. accumulate, tap by tap (see accumulate_rows): one task per output row
//      (n, oy); for each tap (ky, kx) every output pixel adds, for every spike
//      ci under that tap, the weight column wt[ky kx][ci][:] (weights
//      pre-transposed to [kh kw, Cin, Cout], contiguous over Cout) to its
//      accumulator. Adds only; work proportional to the number of spikes. The
//      row is then written to the NCHW output by 8x8 transposes. The adds run
//      16 channels per instruction with AVX-512 (measured on an Intel Xeon, two
//      threads, [16, 64, 96, 96] 3x3: 1.14x the AVX2 kernel at 10 % firing, 1.3x
//      at 30 %, 1.4x at 70 %; benchmarks/RESULTS.md), else 8 with AVX2
//      (accumulate_isa, isa.h).
// Each output value is summed in a fixed order ((ky, kx, ci), then bias) that does
// not depend on the thread count: the result is bitwise reproducible.
//
// Backward: grad_s is dense (at::conv_transpose2d); grad_weight walks the
// packed spikes: grad_w[ci][ky][kx][:] = sum of grad_out_cl[n][oy][ox][:] over
// the spikes under each tap, summed in registers over bands of output rows,
// input channels split across threads (fixed order), float partial sums per
// image folded into double; above its dense_rate oneDNN's weight gradient runs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "../spike_conv.h"
#include "isa.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace spikingir {
namespace {



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

int64_t popcount_bytes(const uint8_t* bits, int64_t n) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += __builtin_popcount(bits[i]);
  return total;
}

// Transposes an 8x8 bit matrix: bit j of byte i <-> bit i of byte j.
inline uint64_t transpose8x8(uint64_t x) {
  uint64_t t;
  t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
  x = x ^ t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
  x = x ^ t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
  x = x ^ t ^ (t << 28);
  return x;
}

// Forward pass 1 for input rows [iy0, iy1) of image n: packs each channel's
// rows to bits (into `rows`: row iy0 + y of channel ci at rows + ci * ch_stride
// + y * Wb; the saved tensor itself when backward needs it), then transposes
// them, 8 channels x 8 pixels at a time, into the channel masks of each pixel:
// masks[n][iy][ix] is Cw words, bit c of word k = spike of channel 64 k + c.
// Several rows at a time, so that each channel's plane is read in runs of
// (iy1 - iy0) W contiguous values rather than one row each (one row: 64
// concurrent 384-byte streams for 64 channels of width 96, which the hardware
// prefetchers follow poorly). Returns the spike count, sets `bad` when a value
// is neither 0 nor 1. (kPackRows 16 against one row: 84.4 -> 77.2 ms a call from
// float spikes, AVX2 EPYC, one thread, [16, 64, 96, 96] at 10 % firing.)
constexpr int64_t kPackRows = 16;
template <typename scalar_t>
int64_t masks_rows(const scalar_t* s, uint8_t* rows, int64_t ch_stride, uint64_t* masks,
                   const Geometry& g, int64_t Cw, int64_t n, int64_t iy0, int64_t iy1, bool avx2,
                   bool& bad) {
  int64_t count = 0;
  for (int64_t ci = 0; ci < g.Cin; ++ci) {
    count += pack_rows_best(s + ((n * g.Cin + ci) * g.H + iy0) * g.W, rows + ci * ch_stride,
                            g.W, g.Wb, 0, iy1 - iy0, bad, avx2);
  }
  for (int64_t iy = iy0; iy < iy1; ++iy) {
    const uint8_t* r = rows + (iy - iy0) * g.Wb;
    uint8_t* m = reinterpret_cast<uint8_t*>(masks + (n * g.H + iy) * g.W * Cw);
    std::fill(m, m + g.W * Cw * 8, uint8_t{0});
    for (int64_t cg = 0; cg < (g.Cin + 7) / 8; ++cg) {
      const int64_t nc = std::min<int64_t>(8, g.Cin - 8 * cg);
      for (int64_t j = 0; j < g.Wb; ++j) {
        uint64_t x = 0;
        for (int64_t i = 0; i < nc; ++i) x |= static_cast<uint64_t>(r[(8 * cg + i) * ch_stride + j]) << (8 * i);
        if (!x) continue;
        x = transpose8x8(x);  // byte b: channels 8 cg .. 8 cg + 7 of pixel 8 j + b
        const int64_t nb = std::min<int64_t>(8, g.W - 8 * j);
        for (int64_t b = 0; b < nb; ++b) m[(8 * j + b) * Cw * 8 + cg] = static_cast<uint8_t>(x >> (8 * b));
      }
    }
  }
  return count;
}

// f(std::integral_constant<int, NV>{}) for NV = width / kW in 1 .. 64 / kW: the
// number of kW-float vectors (8: AVX2, 16: AVX-512) a kernel keeps in registers
// for a block of up to 64 output channels is a template argument.
template <int kW, typename F, int... I>
void with_vectors_of(int64_t nv, const F& f, std::integer_sequence<int, I...>) {
  const bool done = ((nv == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
  TORCH_CHECK(done, "spike_conv2d (cpu): bad channel block width ", nv * kW);
}

template <int kW, typename F>
void with_vectors(int64_t width, const F& f) {
  with_vectors_of<kW>(width / kW, f, std::make_integer_sequence<int, 64 / kW>{});
}

// Forward pass 2 (event-driven sum, tap by tap): output row (n, oy) lives in
// a [Wo, Cout_p] scratch row that starts at zero. For each tap (ky, kx) the
// weight slice wt[tap][:, c0 : c0 + 8 NV] (weights pre-transposed to
// [kh kw, Cin, Cout_p], contiguous over output channels; 16 KB for 64 -> 64)
// stays in L1 while every output pixel of the row adds, for each spike ci under
// that tap, the column wt[tap][ci][c0 : c0 + 8 NV] to its accumulator (NV
// vector registers, loaded from and stored to the scratch row once per pixel and
// tap that has a spike). Loads and adds only; work proportional to the spikes.
// Tap-major beats pixel-major (all 9 taps per pixel in registers) by 15-35 %
// at 10-30 % firing: pixel-major streams the whole 147 KB weight tensor from L2.
// Each output value is summed in the fixed order (ky, kx), ci, then the bias is
// added: bitwise reproducible for any thread count. (Starting from the bias, each
// add rounded to the bias's magnitude: up to 16x oneDNN's error where a large bias
// met hundreds of small terms, e.g. 127 -> 31 channels 7x7 on a 3-row image.)
//
// Output pixels ox in [lo, hi) read input column ix = ox * stride + kx - pad.
// (Divisions only of non-negative numbers: C++ rounds toward zero.)
inline void tap_range(const Geometry& g, int64_t kx, int64_t& lo, int64_t& hi) {
  lo = g.pad > kx ? (g.pad - kx + g.stride - 1) / g.stride : 0;
  const int64_t last = g.W - 1 + g.pad - kx;  // ox * stride <= last
  hi = last < 0 ? 0 : std::min<int64_t>(g.Wo, last / g.stride + 1);
}

#if defined(__GNUC__) && defined(__x86_64__)
// GCC vector types of 8 and 16 floats: the kernels below are written once over
// them and compiled into AVX2 and AVX-512 functions (the always_inline body takes
// the instruction set of the function it is inlined into), so the two paths
// cannot drift apart. Rows and weights are not vector-aligned: every load and
// store goes through memcpy (unaligned moves; a typedef's alignment attribute
// would be dropped as a template argument).
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec16 __attribute__((vector_size(64)));

template <typename V>
__attribute__((always_inline)) inline void load_vec(V& x, const float* p) {
  __builtin_memcpy(&x, p, sizeof(V));
}

template <typename V>
__attribute__((always_inline)) inline void store_vec(float* p, const V& x) {
  __builtin_memcpy(p, &x, sizeof(V));
}

// acc[v] += the weight column wc (NV vectors: one spike's contribution to a
// pixel's Cout_p outputs, in order).
template <typename V, int NV>
__attribute__((always_inline)) inline void add_column(V* acc, const float* __restrict__ wc) {
  constexpr int kW = sizeof(V) / sizeof(float);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    V w;
    load_vec(w, wc + kW * v);
    acc[v] += w;
  }
}

// acc[v] = row[8 NV] or [16 NV] floats at r, per pixel: the accumulation of
// one tap over the output pixels [lo, hi) of a row (see accumulate_rows).
template <typename V, int NV>
__attribute__((always_inline)) inline void tap_row_vec(const uint64_t* __restrict__ mrow,
                                                       const float* __restrict__ wtap,
                                                       float* __restrict__ row,
                                                       const Geometry& g, int64_t Cw,
                                                       int64_t Cout_p, int64_t kx, int64_t lo,
                                                       int64_t hi) {
  constexpr int kW = sizeof(V) / sizeof(float);
  // Cin <= 64: one word per pixel, and a loop without the loop over words (the
  // same adds in the same order). Measured on the AVX2 EPYC, one thread,
  // [16, 64, 96, 96] 3x3 at 10 % firing from masks: 36.9 -> 29.6 ms a call.
  if (Cw == 1) {
    for (int64_t ox = lo; ox < hi; ++ox) {
      uint64_t bits = mrow[ox * g.stride + kx - g.pad];
      if (!bits) continue;
      float* r = row + ox * Cout_p;
      V acc[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) load_vec(acc[v], r + kW * v);
      do {
        add_column<V, NV>(acc, wtap + __builtin_ctzll(bits) * Cout_p);
        bits &= bits - 1;
      } while (bits);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) store_vec(r + kW * v, acc[v]);
    }
    return;
  }
  for (int64_t ox = lo; ox < hi; ++ox) {
    const uint64_t* m = mrow + (ox * g.stride + kx - g.pad) * Cw;
    uint64_t any = 0;
    for (int64_t word = 0; word < Cw; ++word) any |= m[word];
    if (!any) continue;
    float* r = row + ox * Cout_p;
    V acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) load_vec(acc[v], r + kW * v);
    for (int64_t word = 0; word < Cw; ++word) {
      uint64_t bits = m[word];
      while (bits) {
        add_column<V, NV>(acc, wtap + (64 * word + __builtin_ctzll(bits)) * Cout_p);
        bits &= bits - 1;
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store_vec(r + kW * v, acc[v]);
  }
}

// NV vectors of 8 (AVX2) or 16 (AVX-512: half the loads and adds per spike)
// output channels. (Interleaving two output pixels, to give the adder two
// independent chains, measured slower: 36-68 against 30-37 ms at 10 % firing,
// Intel Xeon, one thread.)
template <int NV>
__attribute__((target("avx2"))) void tap_row_avx2(const uint64_t* mrow, const float* wtap,
                                                  float* row, const Geometry& g, int64_t Cw,
                                                  int64_t Cout_p, int64_t kx, int64_t lo,
                                                  int64_t hi) {
  tap_row_vec<Vec8, NV>(mrow, wtap, row, g, Cw, Cout_p, kx, lo, hi);
}

template <int NV>
__attribute__((target("avx512f"))) void tap_row_avx512(const uint64_t* mrow, const float* wtap,
                                                      float* row, const Geometry& g, int64_t Cw,
                                                      int64_t Cout_p, int64_t kx, int64_t lo,
                                                      int64_t hi) {
  tap_row_vec<Vec16, NV>(mrow, wtap, row, g, Cw, Cout_p, kx, lo, hi);
}

// out[co][x] = row[x][co] + b[co] for an 8 x 8 block: row has stride Cout_p,
// out (one output channel plane each) stride plane; b: the 8 channels' bias
// (zeros without one). The bias is added here, after the sum of the spikes as
// before, instead of in a pass of its own over the row: one add per value either
// way, so the same bits, and one pass over the row less.
__attribute__((target("avx2"))) inline void transpose8x8_store(const float* row, int64_t Cout_p,
                                                               float* out, int64_t plane,
                                                               __m256 b) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_add_ps(_mm256_loadu_ps(row + i * Cout_p), b);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // r[j] (j < 4): channel j of pixels 0-3 (low half) and channel j + 4 of
  // pixels 0-3 (high half); r[j + 4] the same for pixels 4-7.
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * plane, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * plane, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// row[ox][co] + bias[co] -> o[co][ox] (o: output plane of channel 0 at this
// row; bias: [Cout_p] or nullptr).
__attribute__((target("avx2"))) void store_row_avx2(const float* row, const float* bias, float* o,
                                                    const Geometry& g, int64_t Cout_p,
                                                    int64_t plane) {
  const int64_t co8 = g.Cout / 8 * 8, ox8 = g.Wo / 8 * 8;
  for (int64_t co = 0; co < co8; co += 8) {
    const __m256 b = bias ? _mm256_loadu_ps(bias + co) : _mm256_setzero_ps();
    for (int64_t ox = 0; ox < ox8; ox += 8) {
      transpose8x8_store(row + ox * Cout_p + co, Cout_p, o + co * plane + ox, plane, b);
    }
    for (int64_t c = co; c < co + 8; ++c) {
      for (int64_t ox = ox8; ox < g.Wo; ++ox) {
        o[c * plane + ox] = bias ? row[ox * Cout_p + c] + bias[c] : row[ox * Cout_p + c];
      }
    }
  }
  for (int64_t c = co8; c < g.Cout; ++c) {
    for (int64_t ox = 0; ox < g.Wo; ++ox) {
      o[c * plane + ox] = bias ? row[ox * Cout_p + c] + bias[c] : row[ox * Cout_p + c];
    }
  }
}

#define SPK_HAVE_AVX2_GATHER 1
#endif

// accumulate_isa() (isa.h) picks the kernels below; without the x86 ones
// (another compiler or CPU) it is kGeneric.

// The same without vector intrinsics (any CPU): `width` output channels.
void tap_row_generic(const uint64_t* __restrict__ mrow, const float* __restrict__ wtap,
                     float* __restrict__ row, const Geometry& g, int64_t Cw, int64_t Cout_p,
                     int64_t kx, int64_t lo, int64_t hi, int64_t width) {
  for (int64_t ox = lo; ox < hi; ++ox) {
    const uint64_t* m = mrow + (ox * g.stride + kx - g.pad) * Cw;
    float* r = row + ox * Cout_p;
    for (int64_t word = 0; word < Cw; ++word) {
      uint64_t bits = m[word];
      while (bits) {
        const float* wc = wtap + (64 * word + __builtin_ctzll(bits)) * Cout_p;
        bits &= bits - 1;
        for (int64_t c = 0; c < width; ++c) r[c] += wc[c];
      }
    }
  }
}

// Forward pass 2 for output rows [r0, r1) of [N * Ho]; row is a Wo * Cout_p scratch;
// bias: [Cout_p] or nullptr.
void accumulate_rows(const uint64_t* masks, const float* wt, const float* bias, float* out,
                     float* row, const Geometry& g, int64_t Cw, int64_t Cout_p, Isa isa,
                     int64_t r0, int64_t r1) {
  const bool avx2 = isa >= Isa::kAvx2;
  const int64_t plane = g.Ho * g.Wo;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, oy = r % g.Ho;
    std::fill(row, row + g.Wo * Cout_p, 0.0f);
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.stride + ky - g.pad;
      if (iy < 0 || iy >= g.H) continue;
      const uint64_t* mrow = masks + (n * g.H + iy) * g.W * Cw;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        int64_t lo, hi;
        tap_range(g, kx, lo, hi);
        const float* wtap = wt + (ky * g.kw + kx) * g.Cin * Cout_p;
        for (int64_t c0 = 0; c0 < Cout_p; c0 += 64) {
          const int64_t width = std::min<int64_t>(64, Cout_p - c0);
#ifdef SPK_HAVE_AVX2_GATHER
          if (isa == Isa::kAvx512 && width % 16 == 0) {
            with_vectors<16>(width, [&](auto nv) {
              tap_row_avx512<decltype(nv)::value>(mrow, wtap + c0, row + c0, g, Cw, Cout_p, kx,
                                                  lo, hi);
            });
            continue;
          }
          if (avx2) {
            with_vectors<8>(width, [&](auto nv) {
              tap_row_avx2<decltype(nv)::value>(mrow, wtap + c0, row + c0, g, Cw, Cout_p, kx,
                                                lo, hi);
            });
            continue;
          }
#endif
          tap_row_generic(mrow, wtap + c0, row + c0, g, Cw, Cout_p, kx, lo, hi, width);
        }
      }
    }
    // row[ox][co] (+ bias[co]) -> out[n][co][oy][ox]. The bias is added last:
    // added first, it would set the rounding step of every add.
    float* o = out + n * g.Cout * plane + oy * g.Wo;
#ifdef SPK_HAVE_AVX2_GATHER
    if (avx2) {
      store_row_avx2(row, bias, o, g, Cout_p, plane);
      continue;
    }
#endif
    if (bias) {
      for (int64_t ox = 0; ox < g.Wo; ++ox) {
        float* r = row + ox * Cout_p;
        for (int64_t co = 0; co < Cout_p; ++co) r[co] += bias[co];
      }
    }
    for (int64_t co = 0; co < g.Cout; ++co) {
      for (int64_t ox = 0; ox < g.Wo; ++ox) o[co * plane + ox] = row[ox * Cout_p + co];
    }
  }
}

// grad_weight, event-driven: gw[ci][ky][kx][co] = sum over spikes (n, ci, iy,
// ix) of grad_out[n][co][oy][ox] with oy = (iy + pad - ky) / stride (and ox
// alike) when that divides and lies in range. go_cl is grad_out channels-last
// and zero-padded: [N, Ho, Wo, Cout_p]. For one (ci, tap, image) the spike walk
// lists the go_cl pixels to add (`pixel_list`); then, 8 NV output channels at a
// time, their sum stays in NV vector registers (8 loads and adds per spike, no
// stores), then added to the image's float partial sum, which is folded into a
// double total. The order
// (n, iy, ix) is fixed: bitwise reproducible.
int64_t pixel_list(const uint8_t* bits, const Geometry& g, int64_t n, int64_t ci, int64_t ky,
                   int64_t kx, int64_t oy0, int64_t oy1, int64_t* pix) {
  int64_t count = 0;
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const int64_t iy = oy * g.stride - g.pad + ky;
    if (iy < 0 || iy >= g.H) continue;
    const uint8_t* row = bits + ((n * g.Cin + ci) * g.H + iy) * g.Wb;
    for (int64_t j = 0; j < g.Wb; ++j) {
      uint32_t byte = row[j];
      while (byte) {
        const int64_t ix = 8 * j + __builtin_ctz(byte);
        if (ix >= g.W) break;  // the last byte's padding bits: no pixel (as unpack)
        const int64_t tx = ix + g.pad - kx;
        byte &= byte - 1;
        if (tx < 0 || tx % g.stride) continue;
        const int64_t ox = tx / g.stride;
        if (ox < g.Wo) pix[count++] = (n * g.Ho + oy) * g.Wo + ox;
      }
    }
  }
  return count;
}

#if defined(__GNUC__) && defined(__x86_64__)
// part[0 : W NV] += sum_i go[pix[i] * Cout_p : + W NV] (float sum, then double),
// W = 8 (AVX2) or 16 (AVX-512) floats per vector; written once, as tap_row_vec.
template <typename V, int NV>
__attribute__((always_inline)) inline void sum_pixels_vec(const float* __restrict__ go,
                                                          int64_t Cout_p, const int64_t* pix,
                                                          int64_t count, float* part) {
  constexpr int kW = sizeof(V) / sizeof(float);
  V acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  for (int64_t i = 0; i < count; ++i) {
    const float* src = go + pix[i] * Cout_p;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V x;
      load_vec(x, src + kW * v);
      acc[v] += x;
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    V total;
    load_vec(total, part + kW * v);
    store_vec(part + kW * v, total + acc[v]);
  }
}

template <int NV>
__attribute__((target("avx2"))) void sum_pixels_avx2(const float* go, int64_t Cout_p,
                                                     const int64_t* pix, int64_t count,
                                                     float* part) {
  sum_pixels_vec<Vec8, NV>(go, Cout_p, pix, count, part);
}

template <int NV>
__attribute__((target("avx512f"))) void sum_pixels_avx512(const float* go, int64_t Cout_p,
                                                         const int64_t* pix, int64_t count,
                                                         float* part) {
  sum_pixels_vec<Vec16, NV>(go, Cout_p, pix, count, part);
}
#endif

void sum_pixels_generic(const float* go, int64_t Cout_p, const int64_t* pix, int64_t count,
                        int64_t width, float* part) {
  float acc[64] = {};
  for (int64_t i = 0; i < count; ++i) {
    const float* src = go + pix[i] * Cout_p;
    for (int64_t c = 0; c < width; ++c) acc[c] += src[c];
  }
  for (int64_t c = 0; c < width; ++c) part[c] += acc[c];
}

// grad_weight of input channels [c0, c1): gw is [Cin, kh, kw, Cout] float32.
// Bands of kBand output rows: a band of go_cl (8 rows x 96 pixels x 64
// channels = 196 KB) stays in L2 while every (ci, tap) of the range sums its
// spikes over it. Per (ci, tap, channel) the order is fixed: images, bands,
// spikes in raster order (float per image, double across images).
constexpr int64_t kBand = 8;
void grad_weight_channels(const uint8_t* bits, const float* go_cl, float* gw, const Geometry& g,
                          int64_t Cout_p, Isa isa, int64_t c0, int64_t c1) {
  const int64_t taps = g.kh * g.kw, nc = c1 - c0;
  std::vector<double> total(nc * taps * Cout_p, 0.0);
  std::vector<float> part(nc * taps * Cout_p);
  std::vector<int64_t> pix(kBand * g.W);
  for (int64_t n = 0; n < g.N; ++n) {
    std::fill(part.begin(), part.end(), 0.0f);
    for (int64_t oy0 = 0; oy0 < g.Ho; oy0 += kBand) {
      const int64_t oy1 = std::min(g.Ho, oy0 + kBand);
      for (int64_t ci = c0; ci < c1; ++ci) {
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t count = pixel_list(bits, g, n, ci, t / g.kw, t % g.kw, oy0, oy1,
                                           pix.data());
          if (count == 0) continue;
          float* acc = part.data() + ((ci - c0) * taps + t) * Cout_p;
          for (int64_t o0 = 0; o0 < Cout_p; o0 += 64) {
            const int64_t width = std::min<int64_t>(64, Cout_p - o0);
#ifdef SPK_HAVE_AVX2_GATHER
            if (isa == Isa::kAvx512 && width % 16 == 0) {
              with_vectors<16>(width, [&](auto nv) {
                sum_pixels_avx512<decltype(nv)::value>(go_cl + o0, Cout_p, pix.data(), count,
                                                       acc + o0);
              });
              continue;
            }
            if (isa >= Isa::kAvx2) {
              with_vectors<8>(width, [&](auto nv) {
                sum_pixels_avx2<decltype(nv)::value>(go_cl + o0, Cout_p, pix.data(), count,
                                                     acc + o0);
              });
              continue;
            }
#endif
            sum_pixels_generic(go_cl + o0, Cout_p, pix.data(), count, width, acc + o0);
          }
        }
      }
    }
    for (size_t i = 0; i < total.size(); ++i) total[i] += part[i];
  }
  for (int64_t ci = c0; ci < c1; ++ci) {
    for (int64_t t = 0; t < taps; ++t) {
      const double* src = total.data() + ((ci - c0) * taps + t) * Cout_p;
      float* dst = gw + (ci * taps + t) * g.Cout;
      for (int64_t co = 0; co < g.Cout; ++co) dst[co] = static_cast<float>(src[co]);
    }
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

// Forward pass 2 over channel masks [N, H, W, Cw] (see accumulate_rows), into
// `out` (contiguous float32 [N, Cout, Ho, Wo]).
at::Tensor event_conv(const uint64_t* mp, int64_t Cw, const Geometry& g, const at::Tensor& weight,
                      const float* bp, at::Tensor out) {
  // [Cout, Cin, kh, kw] -> [kh kw, Cin, Cout_p], Cout zero-padded to a multiple of 8.
  const int64_t Cout_p = (g.Cout + 7) / 8 * 8;
  auto wt = at::zeros({g.kh * g.kw, g.Cin, Cout_p}, weight.options());
  wt.narrow(2, 0, g.Cout).copy_(weight.permute({2, 3, 1, 0}).reshape({g.kh * g.kw, g.Cin, g.Cout}));
  auto bias_p = at::zeros({Cout_p}, weight.options());
  if (bp) std::copy(bp, bp + g.Cout, bias_p.data_ptr<float>());
  const float* wtp = wt.data_ptr<float>();
  const float* bpp = bp ? bias_p.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const Isa isa = accumulate_isa();
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(g.Wo * Cout_p);
    accumulate_rows(mp, wtp, bpp, op, row.data(), g, Cw, Cout_p, isa, r0, r1);
  });
  return out;
}

const float* check_bias(const std::optional<at::Tensor>& bias, const Geometry& g) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                  bias->numel() == g.Cout && bias->device().is_cpu(),
              "spike_conv2d (cpu): bias must be a contiguous float32 CPU tensor [Cout]");
  return bias->data_ptr<float>();
}

// The dense/event switch of every op here: dense_rate < 0 always dense, >= 1
// never (no rate taken), else dense when firing_rate() > dense_rate.
template <typename F>
bool dense_path(double dense_rate, const F& firing_rate) {
  if (dense_rate < 0.0) return true;
  if (dense_rate >= 1.0) return false;
  return firing_rate() > dense_rate;
}

// The forward's firing-rate sample: input rows 0, 8, 16, ... of every image
// (1/8 of a pass over the spikes); `sampled` spikes in them.
inline int64_t sampled_rows(const Geometry& g) { return (g.H + 7) / 8; }
inline double sampled_rate(int64_t sampled, const Geometry& g) {
  return static_cast<double>(sampled) /
         std::max<int64_t>(1, g.N * sampled_rows(g) * g.Cin * g.W);
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
  const float* bp = check_bias(bias, g);
  const auto u8 = s.options().dtype(at::kByte);
#ifdef SPK_HAVE_AVX2_PACK
  const bool avx2_pack = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#else
  const bool avx2_pack = false;
#endif
  at::Tensor packed = save ? at::empty({g.N, g.Cin, g.H, g.Wb}, u8) : at::empty({0}, u8);
  uint8_t* pk = save ? packed.data_ptr<uint8_t>() : nullptr;
  const char* binary_msg =
      "s: expected a binary spike map (only 0 and 1), found other values (the cpp kernel "
      "refuses them even with validate=False, since it reads any nonzero as a spike; a neuron "
      "feeding spike_conv2d needs scale_output=False)";
  // The path is chosen from the firing rate of every 8th input row, so that
  // above dense_rate nothing else reads s before oneDNN.
  const bool dense = dense_path(dense_rate, [&] {
    const int64_t H8 = sampled_rows(g);
    std::vector<int64_t> sample(g.N * H8, 0);
    SPK_DISPATCH_FLOATS(s.scalar_type(), "spike_conv2d_rate", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      at::parallel_for(0, g.N * H8, 1, [&](int64_t r0, int64_t r1) {
        std::vector<uint8_t> scratch(g.Wb);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / H8, iy = 8 * (r % H8);
          bool ignored = false;
          for (int64_t ci = 0; ci < g.Cin; ++ci) {
            sample[r] += pack_rows_best(sp + ((n * g.Cin + ci) * g.H + iy) * g.W,
                                        scratch.data(), g.W, g.Wb, 0, 1, ignored, avx2_pack);
          }
        }
      });
    });
    int64_t sampled = 0;
    for (int64_t c : sample) sampled += c;
    return sampled_rate(sampled, g);
  });
  at::Tensor out;
  if (dense) {
    if (validate || save) {  // one packing pass: the saved bits and/or the check
      const int64_t rows = g.N * g.Cin * g.H;
      std::vector<char> bads(rows, 0);
      SPK_DISPATCH_FLOATS(s.scalar_type(), "spike_conv2d_pack", [&] {
        const scalar_t* sp = s.data_ptr<scalar_t>();
        at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
          std::vector<uint8_t> scratch(save ? 0 : g.Wb);
          bool b = false;
          for (int64_t r = r0; r < r1; ++r) {
            pack_rows_best(sp + r * g.W, save ? pk + r * g.Wb : scratch.data(), g.W, g.Wb, 0, 1,
                           b, avx2_pack);
          }
          bads[r0] = b;
        });
      });
      // Raised even with validate false: the packed bits would give a wrong weight
      // gradient, and the check costs nothing here.
      const bool nonbinary = std::any_of(bads.begin(), bads.end(), [](char c) { return c != 0; });
      TORCH_CHECK_VALUE(!nonbinary, binary_msg);
    }
    out = at::conv2d(s.to(at::kFloat), weight, bias, {stride, stride}, {padding, padding})
              .contiguous();
    return {out, packed};
  }
  // Pass 1: bits (written to the saved tensor when save), channel masks per
  // pixel, validation.
  const int64_t Cw = (g.Cin + 63) / 64;
  auto masks = at::empty({g.N, g.H, g.W, Cw}, s.options().dtype(at::kLong));
  uint64_t* mp = reinterpret_cast<uint64_t*>(masks.data_ptr<int64_t>());
  // Blocks of up to kPackRows input rows of one image (see masks_rows), at
  // least 4 blocks a thread.
  const int64_t block_rows =
      std::clamp<int64_t>(g.N * g.H / (4 * at::get_num_threads()), 1, kPackRows);
  const int64_t blocks = (g.H + block_rows - 1) / block_rows;
  std::vector<char> bads(g.N * blocks, 0);
  SPK_DISPATCH_FLOATS(s.scalar_type(), "spike_conv2d_masks", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * blocks, 1, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> local(save ? 0 : g.Cin * block_rows * g.Wb);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / blocks, iy0 = r % blocks * block_rows;
        const int64_t iy1 = std::min(g.H, iy0 + block_rows);
        uint8_t* rows = save ? pk + (n * g.Cin * g.H + iy0) * g.Wb : local.data();
        const int64_t ch_stride = save ? g.H * g.Wb : block_rows * g.Wb;
        bool b = false;
        masks_rows(sp, rows, ch_stride, mp, g, Cw, n, iy0, iy1, avx2_pack, b);
        bads[r] = b;
      }
    });
  });
  // Raised even with validate false: the event path reads any nonzero as a spike,
  // so the result would be silently wrong, and the check costs nothing here.
  const bool nonbinary = std::any_of(bads.begin(), bads.end(), [](char c) { return c != 0; });
  TORCH_CHECK_VALUE(!nonbinary, binary_msg);
  return {event_conv(mp, Cw, g, weight, bp,
                     at::empty({g.N, g.Cout, g.Ho, g.Wo}, s.options().dtype(at::kFloat))),
          packed};
}

// Inference from channel masks (spikingir::spike_conv2d_fwd_masks, the output
// of neuron_fwd_masks): pass 1 of the forward is not needed. The rate is a
// popcount of the sampled rows (1/32 of the bytes of float spikes); the dense
// path unpacks the masks to float32 for oneDNN.
// `out`: where to write (spike_conv2d_fwd_masks_out), or undefined (a new tensor).
at::Tensor masks_conv(const at::Tensor& masks, int64_t channels, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t stride, int64_t padding,
                      double dense_rate, at::Tensor out) {
  check_weight(weight, channels, stride, padding);
  const Geometry g = masks_geometry(masks, channels, weight, stride, padding, at::kCPU, out);
  const int64_t Cw = masks.size(3);
  const float* bp = check_bias(bias, g);
  const uint64_t* mp = reinterpret_cast<const uint64_t*>(masks.data_ptr<int64_t>());
  if (channels % 64) {  // a bit past the last channel would index past the weights
    const uint64_t high = ~uint64_t{0} << (channels % 64);
    const int64_t pixels = g.N * g.H * g.W;
    const bool stray = at::parallel_reduce(
        0, pixels, 4096, false,
        [&](int64_t p0, int64_t p1, bool acc) {
          for (int64_t p = p0; p < p1; ++p) acc |= (mp[p * Cw + Cw - 1] & high) != 0;
          return acc;
        },
        std::logical_or<bool>());
    TORCH_CHECK_VALUE(!stray, "spike_conv2d: masks has bits set for channels >= ", channels);
  }
  // The path from the firing rate of every 8th input row, as spike_conv2d_fwd
  // samples it: the same spikes take the same path, so the result is bitwise
  // that of the float input.
  const bool dense = dense_path(dense_rate, [&] {
    const int64_t H8 = sampled_rows(g), row_words = g.W * Cw;
    const int64_t sampled = at::parallel_reduce(
        0, g.N * H8, 1, int64_t{0},
        [&](int64_t r0, int64_t r1, int64_t acc) {
          for (int64_t r = r0; r < r1; ++r) {
            const uint64_t* row = mp + ((r / H8) * g.H + 8 * (r % H8)) * row_words;
            for (int64_t w = 0; w < row_words; ++w) acc += __builtin_popcountll(row[w]);
          }
          return acc;
        },
        std::plus<int64_t>());
    return sampled_rate(sampled, g);
  });
  if (!dense) return event_conv(mp, Cw, g, weight, bp, out);
  auto s = at::empty({g.N, channels, g.H, g.W}, masks.options().dtype(at::kFloat));
  float* sp = s.data_ptr<float>();
  const int64_t plane = g.H * g.W;
  at::parallel_for(0, g.N * g.H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.H, iy = r % g.H;
      for (int64_t ci = 0; ci < channels; ++ci) {
        float* o = sp + (n * channels + ci) * plane + iy * g.W;
        const uint64_t* m = mp + r * g.W * Cw + ci / 64;
        for (int64_t ix = 0; ix < g.W; ++ix) o[ix] = static_cast<float>((m[ix * Cw] >> (ci % 64)) & 1);
      }
    }
  });
  return out.copy_(at::conv2d(s, weight, bias, {stride, stride}, {padding, padding}));
}

at::Tensor spike_conv2d_fwd_masks_cpu(const at::Tensor& masks, int64_t channels,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t stride,
                                      int64_t padding, double dense_rate) {
  return masks_conv(masks, channels, weight, bias, stride, padding, dense_rate, at::Tensor());
}

void spike_conv2d_fwd_masks_out_cpu(const at::Tensor& masks, int64_t channels,
                                    const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t stride,
                                    int64_t padding, double dense_rate, at::Tensor& out) {
  masks_conv(masks, channels, weight, bias, stride, padding, dense_rate, out);
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
  check_backward_inputs(grad_out, packed, g, need_weight);
  const auto f32 = grad_out.options().dtype(at::kFloat);
  at::Tensor gs = at::empty({0}, f32), gw = at::empty({0}, f32), gb = at::empty({0}, f32);
  if (need_s) gs = grad_spikes_dense(grad_out, weight, g);
  if (need_weight) {
    const uint8_t* bits = packed.data_ptr<uint8_t>();
    const int64_t numel = g.N * Cin * height * width;
    const bool dense = dense_path(dense_rate, [&] {
      return numel ? static_cast<double>(popcount_bytes(bits, packed.numel())) / numel : 0.0;
    });
    if (dense) {
      gw = std::get<1>(at::convolution_backward(grad_out, unpack(packed, g), weight, std::nullopt,
                                                {stride, stride}, {padding, padding}, {1, 1},
                                                false, {0, 0}, 1, {false, true, false}))
               .contiguous();
    } else {
      // grad_out channels-last, channels zero-padded to a multiple of 8: [N, Ho, Wo, Cout_p]
      const int64_t Cout_p = (g.Cout + 7) / 8 * 8;
      auto go_cl = at::empty({g.N, g.Ho, g.Wo, Cout_p}, f32);
      go_cl.narrow(3, 0, g.Cout).copy_(grad_out.permute({0, 2, 3, 1}));
      if (Cout_p > g.Cout) go_cl.narrow(3, g.Cout, Cout_p - g.Cout).zero_();
      auto gwt = at::empty({Cin, g.kh, g.kw, g.Cout}, f32);
      const float* gop = go_cl.data_ptr<float>();
      float* gwp = gwt.data_ptr<float>();
      const Isa isa = accumulate_isa();
      at::parallel_for(0, Cin, 1, [&](int64_t c0, int64_t c1) {
        grad_weight_channels(bits, gop, gwp, g, Cout_p, isa, c0, c1);
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
  m.impl("spike_conv2d_fwd_masks", &spike_conv2d_fwd_masks_cpu);
  m.impl("spike_conv2d_fwd_masks_out", &spike_conv2d_fwd_masks_out_cpu);
}

}  // namespace spikingir
