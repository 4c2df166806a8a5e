"""Triton kernel of the spike-sparse convolution (DESIGN.md section 4).

Three layers: the ``@triton.jit`` kernel, the launchers ``spike_conv2d_fwd_triton``
/ ``spike_conv2d_bwd_triton`` (same contract as the compiled ops
spikingir::spike_conv2d_fwd / _bwd, see csrc/ops.cpp), and the autograd /
registration in spikingir/ops/spike_conv.py.

Forward: implicit GEMM, M = output pixels (one program: a TILE_H x TILE_W tile of
one image, BLOCK_N output channels), N = Cout, K = (tap, input channel). The
spikes are int8 in a zero-padded channels-last copy [N, Hp, Wp, Cin_p]; the
weights are a per-output-channel fixed point w = q * 2^(e_co - 23) with
|q| < 2^23, split into three balanced int8 digits q = q0 + 2^8 q1 + 2^16 q2.
Three int8 dots accumulate exactly in int32 (|acc| <= K * 128), the digits are
recombined exactly in int64 and rounded to float32 once: the result does not
depend on the summation order (bitwise reproducible) and differs from the
float64 convolution of w only by the quantisation of w, at most one float32
ulp (2^-23 relative) of the channel's largest weight per weight.

The weight planes are written by one more kernel, ``_quantize_weight_kernel``
(the fixed point of the readable ``quantize_weight_torch``, bit for bit): a call
is two launches, where the torch ops of the fixed point were 50 (37 kernels): host
time, the suspected cause of a fixed ~0.8 ms per call on an H200 (benchmarks/
RESULTS.md, "Host work per Triton spike_conv2d call").

Sparsity: K is walked in blocks of (tap, BLOCK_K channels); a block-occupancy
map occ[n, tile_y, tile_x, tap, channel group] (built with torch ops from the
spikes, no im2col) says which blocks hold a spike, and empty blocks are skipped.
Above a firing rate ``dense_rate`` the map is not built and every block runs
(same result: a skipped block adds exactly zero).

Channel masks (``spike_conv2d_fwd_masks``, the neurons' ``emit="masks"``): the same
kernel with MASKS set reads one int64 word per output pixel and tap and unpacks the
K-block's 32 or 64 channel bits into the int8 tile in registers (no int8 copy of
the spikes); the occupancy map comes from the masks (``mask_groups``). Bitwise the
result of the float-input launcher.

Backward: grad_s is the dense transposed convolution (cuDNN); grad_weight a GEMM
of grad_out and the bit-packed spikes over the output pixels
(``_spike_conv2d_grad_weight_kernel``: M = Cout, N = Cin per tap, K = pixels),
which skips pixel blocks whose spike tile is empty before it reads grad_out;
split along K with the partials added in a fixed order (reproducible, no atomics).
"""
import torch
import triton
import triton.language as tl

from . import checks

#: Bits of the per-output-channel fixed point (|q| <= 2^FRAC_BITS).
FRAC_BITS = 23
#: Largest |q| three balanced int8 digits hold.
QMAX = 127 * (1 + 256 + 65536)
TILE_H, TILE_W = 8, 16


@triton.jit
def _spike_conv2d_fwd_kernel(s_ptr, wq_ptr, scale_ptr, bias_ptr, occ_ptr, out_ptr,
                             Hp, Wp, Cin_p, Cout_p, Cout, Ho, Wo, n_th, n_tw, G, H, W, Cw, PAD,
                             STRIDE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                             TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, MASKS: tl.constexpr,
                             B_KMAJOR: tl.constexpr, UNPACK32: tl.constexpr = False):
    # MASKS: s_ptr holds channel masks int64 [N, H, W, Cw] (unpadded; Hp, Wp
    # unused): the int8 spike tile of a K-block is unpacked in registers
    # from one word per output pixel (BLOCK_K divides 64).
    # UNPACK32: the same masks read as int32 words [N, H, W, Cw] (Cw: 32-bit
    # words per pixel; little-endian, so channel c is bit c % 32 of word c // 32),
    # unpacked with 32-bit shifts (a 64-bit shift is several instructions).
    # B_KMAJOR: the weight planes are [3, Cout_p, KH*KW*Cin_p] (K contiguous)
    # instead of [3, KH, KW, Cin_p, Cout_p] (see quantize_weight).
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = pid_m // (n_th * n_tw)
    tile = pid_m % (n_th * n_tw)
    ty0 = (tile // n_tw) * TILE_H
    tx0 = (tile % n_tw) * TILE_W
    m = tl.arange(0, BLOCK_M)
    oy = ty0 + m // TILE_W
    ox = tx0 + m % TILE_W
    valid = (oy < Ho) & (ox < Wo)
    k = tl.arange(0, BLOCK_K)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # 64-bit base offsets: N * Hp * Wp * Cin_p can pass 2^31, and so can the weights'
    # three int8 digit planes of KH KW Cin_p Cout_p each (from 2^30: 4800 -> 4800 channels, 7x7).
    plane = tl.cast(KH * KW * Cin_p, tl.int64) * Cout_p  # elements per int8 digit plane
    if B_KMAJOR:  # the program's first output channel; offsets from it fit 32 bits
        wq_ptr += tl.cast(pid_n * BLOCK_N, tl.int64) * (KH * KW * Cin_p)
    pix = (n.to(tl.int64) * Hp + oy * STRIDE) * Wp + ox * STRIDE  # top-left tap, padded coords
    occ_base = occ_ptr + pid_m.to(tl.int64) * (KH * KW * G)
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    # One flat loop over the K-blocks (tap, channel group g): a single loop is what
    # Triton software-pipelines (num_stages: the next blocks' spike and weight
    # loads in flight during this block's dots); nested tap / group loops left only
    # the G-long inner one to pipeline. Integer accumulation: the order is free.
    for kb in range(KH * KW * G):
        tap = kb // G
        g = kb % G
        ky = tap // KW
        kx = tap % KW
        if SKIP:
            occupied = tl.load(occ_base + kb) != 0
        else:
            occupied = True
        if occupied:
            c0 = g * BLOCK_K
            if MASKS:
                iy = oy * STRIDE + ky - PAD
                ix = ox * STRIDE + kx - PAD
                inside = valid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                m_row = ((n.to(tl.int64) * H + iy) * W + ix) * Cw
                if UNPACK32:
                    lo = tl.load(s_ptr + m_row + c0 // 32, mask=inside, other=0)
                    if BLOCK_K > 32:  # 64 channels: two words, bit k % 32 of word k // 32
                        hi = tl.load(s_ptr + m_row + c0 // 32 + 1, mask=inside, other=0)
                        word = tl.where(k[None, :] < 32, lo[:, None], hi[:, None])
                        a = ((word >> (k % 32)[None, :]) & 1).to(tl.int8)
                    else:
                        a = ((lo[:, None] >> ((c0 % 32) + k)[None, :]) & 1).to(tl.int8)
                else:
                    word = tl.load(s_ptr + m_row + c0 // 64, mask=inside, other=0)
                    a = ((word[:, None] >> ((c0 % 64) + k)[None, :].to(tl.int64)) & 1
                         ).to(tl.int8)
            else:
                a_row = (pix + ky * Wp + kx) * Cin_p
                a = tl.load(s_ptr + a_row[:, None] + (c0 + k)[None, :], mask=valid[:, None],
                            other=0)
            if B_KMAJOR:
                w_ptr = wq_ptr + (tl.arange(0, BLOCK_N)[None, :] * (KH * KW * Cin_p)
                                  + (tap * Cin_p + c0 + k)[:, None])
            else:  # the K-block's first row at a 64-bit offset
                w_ptr = (wq_ptr + tl.cast(tap * Cin_p + c0, tl.int64) * Cout_p
                         + (k[:, None] * Cout_p + co[None, :]))
            acc0 += tl.dot(a, tl.load(w_ptr))
            acc1 += tl.dot(a, tl.load(w_ptr + plane))
            acc2 += tl.dot(a, tl.load(w_ptr + 2 * plane))
    total = acc0.to(tl.int64) + acc1.to(tl.int64) * 256 + acc2.to(tl.int64) * 65536
    cmask = co < Cout
    out = total.to(tl.float32) * tl.load(scale_ptr + co, mask=cmask, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + co, mask=cmask, other=0.0)[None, :]
    o_off = ((n.to(tl.int64) * Cout + co[None, :]) * Ho + oy[:, None]) * Wo + ox[:, None]
    tl.store(out_ptr + o_off, out, mask=valid[:, None] & cmask[None, :])


def _round_up(n, multiple):
    """``n`` rounded up to a multiple of ``multiple`` (a padded channel count)."""
    return triton.cdiv(n, multiple) * multiple


def _channel_block(channels):
    """Channels per program along a dot's N (or the weight gradient's M / N): the
    count rounded up to a power of two, 16..64."""
    return max(16, min(64, triton.next_power_of_2(channels)))


@triton.jit
def _pow2(k):
    """2^k as float32 for an int32 k in [-126, 127], built from its bit pattern."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled(x, k):
    """x * 2^k exactly (no rounding unless the result is subnormal), k in
    [-252, 254]: two power-of-two factors, each a normal float32."""
    half = k >> 1  # floor, here and under the interpreter alike
    return (x * _pow2(half)) * _pow2(k - half)


@triton.jit
def _rint(x):
    """Round half to even for |x| < 2^23: x + 2^23 lies in [2^23, 2^24), where
    float32 spacing is 1, so the addition itself rounds (to nearest even, the
    parity of x's integer part being that of the sum's); subtracting 2^23 back is
    exact. (No libdevice: the same code runs under the Triton interpreter.)"""
    c = tl.where(x >= 0, 8388608.0, -8388608.0)
    return (x + c) - c


@triton.jit
def _quantize_weight_kernel(w_ptr, planes_ptr, scale_ptr, Cout, Cin, Cin_p, Cout_p,
                            TAPS: tl.constexpr, K_MAJOR: tl.constexpr, BLOCK_CO: tl.constexpr,
                            BLOCK: tl.constexpr, FRAC: tl.constexpr, Q_MAX: tl.constexpr):
    # One program per BLOCK_CO padded output channels: the fixed point of
    # quantize_weight_torch, written straight into the padded digit planes
    # (zeros past Cin and Cout), so a call needs no other op.
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    KP = TAPS * Cin_p  # padded K of one channel: (tap, input channel)
    # elements per digit plane (both layouts); int64: three planes can pass 2^31
    plane = tl.cast(Cout_p, tl.int64) * KP
    # weights to read per channel: none for a padding channel (co >= Cout)
    row = tl.where(co < Cout, Cin * TAPS, 0)
    w_row = w_ptr + co.to(tl.int64) * (Cin * TAPS)
    j = tl.arange(0, BLOCK)
    # pass 1: m = max |w[co]|, and whether the channel holds a NaN or an inf
    wmax = tl.zeros([BLOCK_CO, BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK_CO, BLOCK], dtype=tl.int32)
    for k0 in range(0, Cin * TAPS, BLOCK):
        kk = k0 + j
        a = tl.abs(tl.load(w_row[:, None] + kk[None, :], mask=kk[None, :] < row[:, None],
                           other=0.0))
        bad = bad | ((a != a) | (a > 3.4028234663852886e38)).to(tl.int32)
        wmax = tl.maximum(wmax, a)
    m = tl.max(wmax, axis=1)
    nbad = tl.max(bad, axis=1)
    # e with m < 2^e (frexp's exponent; 0 for m = 0): from the float32 bit
    # pattern, a subnormal m first scaled up by 2^64 (exact)
    tiny = m < 1.1754943508222875e-38
    mn = m * tl.where(tiny, 18446744073709551616.0, 1.0)
    e = ((mn.to(tl.int32, bitcast=True) >> 23) & 255) - 126 - tl.where(tiny, 64, 0)
    e = tl.where((m == 0) | (nbad != 0), 0, e)  # a NaN / inf channel: any e, scale NaN
    # the few channels whose max rounds past the three digits' range: one bit less
    e = tl.where(_rint(_scaled(m, FRAC - e)) > Q_MAX, e + 1, e)
    scale = tl.where(nbad != 0, float("nan"), _scaled(tl.full([BLOCK_CO], 1.0, tl.float32),
                                                      e - FRAC))
    tl.store(scale_ptr + co, scale, mask=co < Cout)
    # pass 2: q = round(w 2^(FRAC - e)), |q| <= Q_MAX, as balanced int8 digits
    # q = d0 + 2^8 d1 + 2^16 d2 over the padded K range (tap, channel)
    cin = tl.where((co < Cout) & (nbad == 0), Cin, 0)  # channels to read (others: zeros)
    for k0 in range(0, KP, BLOCK):
        kk = k0 + j
        tap = kk // Cin_p
        ci = kk % Cin_p
        inside = (kk[None, :] < KP) & (ci[None, :] < cin[:, None])
        w = tl.load(w_row[:, None] + (ci * TAPS + tap)[None, :], mask=inside, other=0.0)
        q = _rint(_scaled(w, (FRAC - e)[:, None])).to(tl.int32)
        d0 = ((q + 128) & 255) - 128
        q = (q - d0) >> 8
        d1 = ((q + 128) & 255) - 128
        d2 = (q - d1) >> 8
        if K_MAJOR:
            off = co.to(tl.int64)[:, None] * KP + kk[None, :]
        else:
            off = kk.to(tl.int64)[None, :] * Cout_p + co[:, None]
        keep = (kk[None, :] < KP) & (co[:, None] < Cout_p)
        tl.store(planes_ptr + off, d0.to(tl.int8), mask=keep)
        tl.store(planes_ptr + plane + off, d1.to(tl.int8), mask=keep)
        tl.store(planes_ptr + 2 * plane + off, d2.to(tl.int8), mask=keep)


def quantize_weight(weight, block_k, block_n, k_major=False):
    """weight [Cout, Cin, kh, kw] float32 -> (int8 digit planes [3, kh, kw, Cin_p,
    Cout_p], or with ``k_major`` [3, Cout_p, kh, kw, Cin_p], float32 scale [Cout]):
    :func:`quantize_weight_torch` bit for bit, in one kernel launch (the torch
    ops are 50, 37 of them kernels: host time on a GPU)."""
    Cout, Cin, kh, kw = weight.shape
    w = weight.detach().float().contiguous()
    Cin_p = _round_up(Cin, block_k)
    Cout_p = _round_up(Cout, block_n)
    dims = (3, Cout_p, kh, kw, Cin_p) if k_major else (3, kh, kw, Cin_p, Cout_p)
    planes = torch.empty(dims, dtype=torch.int8, device=w.device)
    scale = torch.empty(Cout, dtype=torch.float32, device=w.device)
    # 16 channels x up to 256 weights a program: few programs (the interpreter's
    # cost grows with their number), 16 values a thread on the GPU.
    block_co = 16
    block = min(256, triton.next_power_of_2(kh * kw * Cin_p))
    _quantize_weight_kernel[(triton.cdiv(Cout_p, block_co),)](
        w, planes, scale, Cout, Cin, Cin_p, Cout_p, TAPS=kh * kw, K_MAJOR=bool(k_major),
        BLOCK_CO=block_co, BLOCK=block, FRAC=FRAC_BITS, Q_MAX=QMAX, num_warps=4)
    return planes, scale


def quantize_weight_torch(weight, block_k, block_n, k_major=False):
    """The readable definition of the weight fixed point (the reference of
    :func:`quantize_weight`, which the launchers use).

    weight [Cout, Cin, kh, kw] -> (int8 digit planes [3, kh, kw, Cin_p, Cout_p],
    or with ``k_major`` [3, Cout_p, kh, kw, Cin_p], float32 scale [Cout]) with
    weight ~= (q0 + 2^8 q1 + 2^16 q2) * scale.

    The layouts are the GEMM's B operand (K = (tap, channel), N = Cout) N-major
    or K-major. Hopper's int8 wgmma reads both operands K-major from shared
    memory (Triton transposes other layouts for 8-bit types only), so the
    K-major planes can be copied there without a transpose.

    scale is a power of two per output channel, 2^(e - FRAC_BITS) with
    max|w| < 2^e, so |q| <= 2^23 and the error of each weight is at most
    2^-24 * 2^e <= 2^-23 * max|w[co]| (one fp32 ulp of the channel's largest
    weight). Three balanced int8 digits reach QMAX = 127 * (1 + 2^8 + 2^16); the
    few channels whose max|w| lies within 0.4% below 2^e get one bit less.
    A channel holding a NaN or an infinite weight gets scale NaN and zero
    digits: all its outputs are NaN, where F.conv2d's are NaN or inf (inf * 0
    is NaN), rather than finite values that would hide the bad weight."""
    Cout, Cin, kh, kw = weight.shape
    w = weight.detach().float().double()
    wmax = w.abs().amax(dim=(1, 2, 3))
    finite = torch.isfinite(wmax)
    w = torch.where(finite[:, None, None, None], w, 0.0)
    wmax = torch.where(finite, wmax, 0.0)
    _, e = torch.frexp(wmax)  # wmax < 2^e
    q = torch.round(torch.ldexp(w, (FRAC_BITS - e)[:, None, None, None]))
    e = torch.where(q.abs().amax(dim=(1, 2, 3)) > QMAX, e + 1, e)
    scale = torch.ldexp(torch.ones_like(wmax), e - FRAC_BITS)
    scale = torch.where(finite, scale, float("nan"))
    q = torch.round(torch.ldexp(w, (FRAC_BITS - e)[:, None, None, None])).long()
    digits = []
    for _ in range(2):
        d = torch.remainder(q + 128, 256) - 128  # balanced digit in [-128, 127]
        digits.append(d)
        q = (q - d) // 256
    digits.append(q)  # in [-128, 127] since |q| <= QMAX
    Cin_p = _round_up(Cin, block_k)
    Cout_p = _round_up(Cout, block_n)
    if k_major:
        planes = torch.zeros(3, Cout_p, kh, kw, Cin_p, dtype=torch.int8, device=weight.device)
        for i, d in enumerate(digits):
            planes[i, :Cout, :, :, :Cin] = d.permute(0, 2, 3, 1).to(torch.int8)
    else:
        planes = torch.zeros(3, kh, kw, Cin_p, Cout_p, dtype=torch.int8, device=weight.device)
        for i, d in enumerate(digits):
            planes[i, :, :, :Cin, :Cout] = d.permute(2, 3, 1, 0).to(torch.int8)
    return planes.contiguous(), scale.float().contiguous()


def padded_spikes(s, padding, block_k):
    """s [N, Cin, H, W] -> int8 [N, H + 2p, W + 2p, Cin_p], zero-padded, channels last."""
    N, Cin, H, W = s.shape
    Cin_p = _round_up(Cin, block_k)
    out = torch.zeros(N, H + 2 * padding, W + 2 * padding, Cin_p, dtype=torch.int8,
                      device=s.device)
    out[:, padding:padding + H, padding:padding + W, :Cin] = (s != 0).permute(0, 2, 3, 1)
    return out


def occupancy_map(s8, kh, kw, stride, Ho, Wo, block_k, tile=(TILE_H, TILE_W)):
    """Block-occupancy map of the padded int8 spikes ``s8`` [N, Hp, Wp, Cin_p]:
    int8 [N, n_th, n_tw, kh * kw, G], 1 where output tile (n_th, n_tw) reads a
    spike through tap (ky, kx) from channel group g (BLOCK_K channels)."""
    return _tile_occupancy(spike_groups(s8, block_k), kh, kw, stride, Ho, Wo, tile)


def spike_groups(s8, block_k):
    """Padded int8 spikes [N, Hp, Wp, Cin_p] -> [N, Hp, Wp, G]: 1 where channel group
    g (block_k channels) of the pixel holds a spike."""
    N, Hp, Wp, Cin_p = s8.shape
    return s8.view(N, Hp, Wp, Cin_p // block_k, block_k).amax(-1)


def mask_groups(bits, Cin_p, block_k):
    """Channel masks int64 [N, H, W, Cw] -> int8 [N, H, W, G]: 1 where a group
    of block_k channels (block_k divides 64) holds a spike."""
    g = torch.arange(Cin_p // block_k, device=bits.device)
    words = bits[..., (g * block_k) // 64] >> ((g * block_k) % 64)  # arithmetic shift: the
    low = -1 if block_k == 64 else (1 << block_k) - 1  # mask drops the sign copies
    return ((words & low) != 0).to(torch.int8)


def _tile_occupancy(group_any, kh, kw, stride, Ho, Wo, tile):
    """[N, Hp, Wp, G] per-pixel group occupancy (padded) -> [N, n_th, n_tw, kh kw, G]."""
    N, _, _, G = group_any.shape
    th, tw = tile
    n_th, n_tw = triton.cdiv(Ho, th), triton.cdiv(Wo, tw)
    taps = []
    for ky in range(kh):
        for kx in range(kw):
            sl = group_any[:, ky:ky + stride * (Ho - 1) + 1:stride,
                           kx:kx + stride * (Wo - 1) + 1:stride]  # [N, Ho, Wo, G]
            sl = torch.nn.functional.pad(sl, (0, 0, 0, n_tw * tw - Wo, 0, n_th * th - Ho))
            taps.append(sl.view(N, n_th, th, n_tw, tw, G).amax(dim=(2, 4)))
    return torch.stack(taps, dim=3).contiguous()


#: Launch configuration of the forward kernel for float spikes. ``block_k``: the
#: channels of a K-block, >= 32 (an int8 tl.dot needs K >= 32 on the GPU: Triton
#: 3.6 on an H100 refused K = 16 for Cin = 5; channels are zero-padded up to a
#: multiple of it); None: 64 for Cin > 32, else 32 (less zero padding). ``tile`` =
#: (TILE_H, TILE_W) output pixels per program (their product is BLOCK_M).
#: Measured on an H100 (benchmarks/RESULTS.md, GPU runs 2026-11-27, the launch
#: sweep; [80, 64, 128, 128] 64 -> 64 3x3 at 10 %): 64-channel K-blocks, 16x16
#: tiles and 8 warps 1.55 ms; 32-channel blocks, 8x16 tiles, 4 warps (the first
#: default) 2.53 ms; results identical (integer accumulation). ``b_kmajor``: the
#: weight planes K-major (:func:`quantize_weight`), on by default since the sweep on
#: an H200 (RESULTS.md, GPU runs 2026-11-28): the default above 1.47 ms -> 1.06 ms
#: with them (0.999 ms with 8x16 tiles and 4 warps), and the shipped DnCNN SNN at
#: T=10 from masks 43.2 -> 29.3 ms end to end, the same PSNR. ``block_n``: output
#: channels per program, a power of two >= 16 (None: Cout rounded up, 16..64);
#: each program holds three int32 accumulators of BLOCK_M x BLOCK_N.
DEFAULT_CONFIG = dict(block_k=None, tile=(16, 16), num_warps=8, num_stages=None, b_kmajor=True,
                      block_n=None)
#: The same for SpikeMasks input: here each K-block unpacks one 64-bit word per
#: output pixel into a BLOCK_M x BLOCK_K int8 tile in registers, which grows with
#: both. H200 sweep (same run, [80, 64, 128, 128] at 10 %): 1.65 ms with the first
#: default (32-channel K-blocks, 8x16 tiles, 4 warps, N-major planes), 0.97 ms with
#: K-major planes, **0.85 ms** with K-major planes, 64-channel K-blocks, 16x16 tiles
#: and 8 warps: that last one is the default since (the float default's shape; the
#: same block_k rule). The sweep ran on random spikes, but the time does not depend
#: on the spike map: the triton backend never skips blocks (DENSE_RATE, spikingir/
#: ops/spike_conv.py), so every tile does the same work. Not yet timed end to end
#: (``benchmarks/bench_snn.py``); ``bench_spike_conv.py --triton-sweep`` times both.
#: ``unpack32``: unpack the masks with 32-bit shifts (two words per 64 channels)
#: instead of 64-bit ones; the same result bit for bit. Written without a GPU at
#: hand (off until a sweep times it): per K-block each program unpacks
#: BLOCK_M x BLOCK_K bits, about as many integer instructions as its int8 MMAs take
#: cycles at this layer's shape.
MASKS_CONFIG = dict(DEFAULT_CONFIG, unpack32=False)


def _with_overrides(base, config):
    """``base`` updated by ``config`` (None or a dict of some of its keys)."""
    unknown = set(config or {}) - set(base)
    if unknown:
        raise ValueError(f"config: unknown launch options {sorted(unknown)}; expected some of "
                         f"{sorted(base)}")
    return dict(base, **(config or {}))


def launch_config(base, config, cin):
    """``base`` updated by ``config`` (None or a dict), ``block_k`` resolved for
    ``cin`` input channels."""
    cfg = _with_overrides(base, config)
    if cfg["block_k"] is None:
        cfg["block_k"] = 64 if cin > 32 else 32
    bn = cfg["block_n"]
    if bn is not None and (bn < 16 or bn & (bn - 1)):
        raise ValueError(f"config: block_n must be a power of two >= 16, got {bn}")
    return cfg


def spike_conv2d_fwd_triton(s, weight, bias, stride, padding, dense_rate, validate, save, *,
                            config=None):
    """Launcher with the contract of spikingir::spike_conv2d_fwd (csrc/ops.cpp).
    ``config`` overrides :data:`DEFAULT_CONFIG` (benchmarks/bench_spike_conv.py
    --triton-sweep times alternatives; results are identical by construction)."""
    op = "spike_conv2d_fwd_triton"
    checks.tensor(op, "s", s, checks.FLOATS, s, dim=4)
    Ho, Wo = checks.conv_geometry(op, s.shape[0], s.shape[2], s.shape[3], weight, s.shape[1],
                                  bias, stride, padding, s)
    cfg = launch_config(DEFAULT_CONFIG, config, s.shape[1])
    if validate and bool(((s != 0) & (s != 1)).any()):
        raise ValueError("s: expected a binary spike map (only 0 and 1), found other values "
                         "(validate=False skips this check for inputs known to be binary)")
    N, _, H, W = s.shape
    block_k = cfg["block_k"]
    s8 = padded_spikes(s, padding, block_k)
    out = _launch(op, s8, False, N, H, W, Ho, Wo, weight, bias, stride, padding, dense_rate,
                  lambda: float(s8.count_nonzero()) / max(1, s.numel()),
                  lambda: spike_groups(s8, block_k), None, cfg)
    packed = pack_bits(s) if save else torch.empty(0, dtype=torch.uint8, device=s.device)
    return out, packed


def spike_conv2d_fwd_masks_out_triton(masks, channels, weight, bias, stride, padding, dense_rate,
                                      out):
    """Launcher with the contract of spikingir::spike_conv2d_fwd_masks_out (csrc/ops.cpp)."""
    spike_conv2d_fwd_masks_triton(masks, channels, weight, bias, stride, padding, dense_rate,
                                  out=out)


def spike_conv2d_fwd_masks_triton(masks, channels, weight, bias, stride, padding, dense_rate, *,
                                  config=None, out=None):
    """Launcher with the contract of spikingir::spike_conv2d_fwd_masks (csrc/ops.cpp):
    the kernel of :func:`spike_conv2d_fwd_triton` reading the channel masks
    directly (no int8 copy of the spikes); same result bit for bit. ``out``: a
    contiguous float32 [N, Cout, Ho, Wo] to write into. ``config`` overrides
    :data:`MASKS_CONFIG`."""
    # imported here: spikingir.ops imports this module when it registers the ops
    from spikingir.ops.masks import popcount
    op = "spike_conv2d_fwd_masks" + ("_out" if out is not None else "") + "_triton"
    checks.masks(op, masks, channels, masks)
    N, H, W, _ = masks.shape
    Ho, Wo = checks.conv_geometry(op, N, H, W, weight, channels, bias, stride, padding, masks)
    if out is not None:
        checks.tensor(op, "out", out, checks.F32, masks, shape=(N, weight.shape[0], Ho, Wo))
    cfg = launch_config(MASKS_CONFIG, config, channels)
    block_k = cfg["block_k"]
    if 64 % block_k:
        raise ValueError(f"block_k must divide 64 to read channel masks, got {block_k}")
    Cin_p = _round_up(channels, block_k)
    pad = (0, 0, padding, padding, padding, padding)
    return _launch(op, masks, True, N, H, W, Ho, Wo, weight, bias, stride, padding, dense_rate,
                   lambda: float(popcount(masks).sum()) / max(1, N * H * W * channels),
                   lambda: torch.nn.functional.pad(mask_groups(masks, Cin_p, block_k), pad),
                   out, cfg)


def _launch(op, src, masks, N, H, W, Ho, Wo, weight, bias, stride, padding, dense_rate, rate,
            groups, out, cfg):
    """The part both launchers share: weight planes, output, occupancy map, launch.

    ``src``: the zero-padded int8 spikes [N, Hp, Wp, Cin_p], or (``masks``) the
    channel masks [N, H, W, Cw]. ``groups()``: the per-pixel channel-group
    occupancy [N, Hp, Wp, G] of the padded input, built only when the firing rate
    ``rate()`` is at most ``dense_rate`` (the map pays off). ``rate()`` is only
    called for 0 <= dense_rate < 1: on a GPU it reads a count back, which
    synchronises. ``Ho``, ``Wo``: the output size (checks.conv_geometry). ``out``: None
    or the tensor to write (checked by the launcher)."""
    Cout, _, kh, kw = weight.shape
    BLOCK_K, BLOCK_N = cfg["block_k"], cfg["block_n"] or _channel_block(Cout)
    # the output-channel blocks are grid axis 1, at most MAX_GRID_YZ programs on CUDA
    checks.require(triton.cdiv(Cout, BLOCK_N) <= checks.MAX_GRID_YZ, op,
                   f"at most {checks.MAX_GRID_YZ * BLOCK_N} output channels ({checks.MAX_GRID_YZ} "
                   f"blocks of {BLOCK_N}), got {Cout}")
    tile_h, tile_w = cfg["tile"]
    planes, scale = quantize_weight(weight, BLOCK_K, BLOCK_N, cfg["b_kmajor"])
    Cin_p = _round_up(weight.shape[1], BLOCK_K)
    Cout_p = _round_up(Cout, BLOCK_N)
    if out is None:
        out = torch.empty(N, Cout, Ho, Wo, dtype=torch.float32, device=src.device)
    n_th, n_tw = triton.cdiv(Ho, tile_h), triton.cdiv(Wo, tile_w)
    skip = dense_rate >= 1.0 or (dense_rate >= 0.0 and rate() <= dense_rate)
    occ = _tile_occupancy(groups(), kh, kw, stride, Ho, Wo, (tile_h, tile_w)) if skip \
        else src  # dummy when dense
    launch = dict(num_warps=cfg["num_warps"])
    if cfg["num_stages"] is not None:
        launch["num_stages"] = cfg["num_stages"]
    unpack32 = masks and cfg.get("unpack32", False)
    if unpack32:  # the same bits as int32 words (little-endian: low word first)
        src = src.view(torch.int32)
    # the padded int8 layout's Hp, Wp, or (masks) the words per pixel Cw
    Hp, Wp, Cw = (1, 1, src.shape[3]) if masks else (src.shape[1], src.shape[2], 1)
    grid = (N * n_th * n_tw, Cout_p // BLOCK_N)
    _spike_conv2d_fwd_kernel[grid](
        src, planes, scale, bias, occ, out, Hp, Wp, Cin_p, Cout_p, Cout, Ho, Wo, n_th,
        n_tw, Cin_p // BLOCK_K, H, W, Cw, padding, STRIDE=stride, KH=kh, KW=kw, TILE_H=tile_h,
        TILE_W=tile_w, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SKIP=skip, HAS_BIAS=bias is not None,
        MASKS=masks, B_KMAJOR=bool(cfg["b_kmajor"]), UNPACK32=unpack32, **launch)
    return out


def pack_bits(s):
    """s [N, C, H, W] -> uint8 [N, C, H, ceil(W / 8)], bit b of byte j = pixel 8 j + b."""
    W = s.shape[3]
    Wb = (W + 7) // 8
    bits = torch.nn.functional.pad((s != 0).to(torch.uint8), (0, 8 * Wb - W))
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=s.device)
    return (bits.view(*s.shape[:3], Wb, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed, width):
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.flatten(-2)[..., :width].float()


@triton.jit
def _spike_conv2d_grad_weight_kernel(go_ptr, bits_ptr, part_ptr, Cout, Cin, H, W, Wb, Ho, Wo,
                                     P, PAD, blocks_per_split,
                                     STRIDE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                                     BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                                     BLOCK_P: tl.constexpr, PRECISION: tl.constexpr):
    # grad_w[co, ci, ky, kx] = sum_p go[n, co, oy, ox] * s[n, ci, oy S + ky - PAD, ox S + kx - PAD]
    # over the output pixels p = (n, oy, ox): a GEMM with M = Cout, N = Cin (one tap per
    # program), K = the pixels, walked in blocks of BLOCK_P flat pixels. A block whose
    # spike tile is all zero adds exactly zero and is skipped before grad_out is read:
    # the work follows the spikes at block granularity. Program (co/ci block, tap,
    # split) sums its own run of pixel blocks in a fixed order into its own partial
    # part[split, co, ci, tap]; the launcher adds the partials in a fixed order: no
    # atomics, bitwise reproducible.
    pid_c = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    n_ci = tl.cdiv(Cin, BLOCK_CI)
    co = (pid_c // n_ci) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = (pid_c % n_ci) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ky = tap // KW
    kx = tap % KW
    HoWo = tl.cast(Ho, tl.int64) * Wo  # int64: one image can have 2^31 output pixels
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split  # int64: N Ho Wo can pass 2^31
    last = tl.minimum(first + blocks_per_split, tl.cdiv(P, BLOCK_P))
    for b in range(first, last):
        p = b * BLOCK_P + tl.arange(0, BLOCK_P)
        n = p // HoWo
        r = p % HoWo
        oy = r // Wo
        ox = r % Wo
        iy = oy * STRIDE + ky - PAD
        ix = ox * STRIDE + kx - PAD
        inside = (p < P) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        ix = tl.where(inside, ix, 0)  # no shift by a negative amount off the image
        byte_off = ((n[:, None] * Cin + ci[None, :]) * H + iy[:, None]) * Wb + (ix // 8)[:, None]
        byte = tl.load(bits_ptr + byte_off, mask=inside[:, None] & (ci < Cin)[None, :], other=0)
        spike = (byte.to(tl.int32) >> (ix % 8).to(tl.int32)[:, None]) & 1
        if tl.max(spike) != 0:
            g_off = (n * Cout * HoWo + r)[None, :] + co[:, None].to(tl.int64) * HoWo
            g = tl.load(go_ptr + g_off, mask=(co < Cout)[:, None] & (p < P)[None, :], other=0.0)
            # spikes are exact at any precision; PRECISION sets how grad_out's float32
            # mantissa enters the products ("tf32x3": three TF32 passes, ~fp32 accurate)
            acc += tl.dot(g, spike.to(tl.float32), input_precision=PRECISION)
    # int64: part holds split x Cout x Cin x KH KW floats, which can pass 2^31
    part_off = ((split.to(tl.int64) * Cout + co[:, None]) * Cin + ci[None, :]) * (KH * KW) + tap
    tl.store(part_ptr + part_off, acc, mask=(co < Cout)[:, None] & (ci < Cin)[None, :])


#: Launch of the weight-gradient kernel: ``block_p`` flat output pixels per
#: K-block; ``split``: programs along K per (channel block, tap), their partials
#: added afterwards (None: enough for ~4 programs per SM on a GPU, 1 on the CPU
#: interpreter); ``precision``: tl.dot's input_precision for the float32 grad_out
#: ("tf32x3" ~ float32 accuracy on tensor cores; "ieee" exact float32 FMAs).
GRAD_WEIGHT_CONFIG = dict(block_p=128, split=None, num_warps=4, precision="tf32x3")


def spike_conv2d_grad_weight_triton(grad_out, packed, weight_shape, height, width, stride,
                                    padding, *, config=None):
    """grad_weight of the convolution from the bit-packed spikes (:func:`pack_bits`)
    and a contiguous float32 grad_out [N, Cout, Ho, Wo]: the GEMM of grad_out and
    the spikes over the output pixels, skipping pixel blocks without a spike."""
    cfg = _with_overrides(GRAD_WEIGHT_CONFIG, config)
    N, Cout, Ho, Wo = grad_out.shape
    Cin, kh, kw = weight_shape[1:]
    P = N * Ho * Wo
    block_co, block_ci = _channel_block(Cout), _channel_block(Cin)
    channel_blocks = triton.cdiv(Cout, block_co) * triton.cdiv(Cin, block_ci)
    blocks = max(1, triton.cdiv(P, cfg["block_p"]))
    split = cfg["split"]
    if split is None:
        if grad_out.device.type == "cuda":
            sms = torch.cuda.get_device_properties(grad_out.device).multi_processor_count
            split = max(1, 4 * sms // (channel_blocks * kh * kw))
        else:
            split = 1
    split = max(1, min(int(split), blocks, checks.MAX_GRID_YZ))  # grid axis 2's limit on CUDA
    per_split = triton.cdiv(blocks, split)
    split = triton.cdiv(blocks, per_split)  # no program without pixels
    part = torch.empty(split, Cout, Cin, kh * kw, dtype=torch.float32, device=grad_out.device)
    _spike_conv2d_grad_weight_kernel[(channel_blocks, kh * kw, split)](
        grad_out, packed, part, Cout, Cin, height, width, packed.shape[3], Ho, Wo, P, padding,
        per_split, STRIDE=stride, KH=kh, KW=kw, BLOCK_CO=block_co, BLOCK_CI=block_ci,
        BLOCK_P=cfg["block_p"], PRECISION=cfg["precision"], num_warps=cfg["num_warps"])
    gw = part[0] if split == 1 else part.sum(0)  # a fixed order: reproducible
    return gw.view(Cout, Cin, kh, kw)


def spike_conv2d_bwd_triton(grad_out, packed, weight, height, width, stride, padding, dense_rate,
                            need_s, need_weight, need_bias):
    """Launcher with the contract of spikingir::spike_conv2d_bwd (csrc/ops.cpp)."""
    op = "spike_conv2d_bwd_triton"
    checks.tensor(op, "grad_out", grad_out, checks.F32, grad_out, dim=4)
    N, Cout, Ho, Wo = grad_out.shape
    checks.tensor(op, "weight", weight, checks.F32, grad_out, dim=4)
    kh, kw = weight.shape[2:]
    checks.require(Cout == weight.shape[0] and (Ho, Wo) == checks.conv_geometry(
        op, N, height, width, weight, weight.shape[1], None, stride, padding, grad_out), op,
        f"grad_out {tuple(grad_out.shape)} does not match a {height}x{width} input through "
        f"the {kh}x{kw} kernel at stride {stride}, padding {padding}")
    if need_weight:
        checks.tensor(op, "packed", packed, (torch.uint8,), grad_out,
                      shape=(N, weight.shape[1], height, (width + 7) // 8))
    empty = grad_out.new_empty(0, dtype=torch.float32)
    gs = gw = gb = empty
    if need_s:
        oph = height - ((Ho - 1) * stride - 2 * padding + kh)
        opw = width - ((Wo - 1) * stride - 2 * padding + kw)
        gs = torch.nn.functional.conv_transpose2d(grad_out, weight, None, stride, padding,
                                                  (oph, opw)).contiguous()
    if need_weight:
        if dense_rate < 0:  # dense: the unpacked spikes through the library's weight gradient
            s = unpack_bits(packed, width)
            gw = torch.nn.grad.conv2d_weight(s, weight.shape, grad_out, stride, padding)
        else:
            gw = spike_conv2d_grad_weight_triton(grad_out, packed, weight.shape, height, width,
                                                 stride, padding)
        gw = gw.contiguous()
    if need_bias:
        gb = grad_out.sum((0, 2, 3))
    return gs, gw, gb
