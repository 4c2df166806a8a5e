"""Triton kernels of the fused multi-timestep IF / MPRN neuron.

Three layers (Liger-Kernel style): the ``@triton.jit`` kernels, the launchers
``neuron_fwd_triton`` / ``neuron_bwd_triton`` (same contract as the compiled
ops spikingir::neuron_fwd / neuron_bwd, see csrc/ops.cpp), and the autograd /
registration in spikingir/ops/neuron.py.

One program handles BLOCK neurons through all T steps; the membrane potential
stays in registers, each step reads x once and writes y and the saved
u = h - threshold once. Pointers advance by M per step, so addresses are 64-bit
even when T * M passes 2^31.

``neuron_fwd_masks_triton`` (inference, ``emit="masks"``): one program takes 64
channels x BLOCK_P pixels through all steps and writes each step's spikes as one
int64 channel mask per pixel (spikingir/ops/masks.py).
"""
import math
import os

import torch
import triton
import triton.language as tl

from . import checks

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: |a u| beyond which the sigmoid surrogate is 0; must match spikingir/ops/surrogate.py.
SIGMOID_CUTOFF = tl.constexpr(40.0)


@triton.jit
def _surrogate_grad(u, a, SURROGATE: tl.constexpr):
    # d/du of the smooth step; ids and formulas as in spikingir/ops/surrogate.py.
    if SURROGATE == 0:  # sigmoid: a e / (1 + e)^2, e = exp(-|a u|); 0 beyond the cutoff
        au = tl.abs(a * u)
        e = tl.exp(-au)
        g = tl.where(au > SIGMOID_CUTOFF, 0.0, a * e / ((1.0 + e) * (1.0 + e)))
    elif SURROGATE == 1:  # atan
        z = 1.5707963267948966 * a * u
        g = 0.5 * a / (1.0 + z * z)
    elif SURROGATE == 2:  # triangle
        g = tl.maximum(a * (1.0 - a * tl.abs(u)), 0.0)
    else:  # rectangle
        g = tl.where(tl.abs(u) < 0.5 / a, a, 0.0)
    return g


@triton.jit
def _step_backward(gy, gv, u, a, theta, k, thr_scale, SURROGATE: tl.constexpr,
                   SCALE: tl.constexpr, DETACH: tl.constexpr):
    # One step of backward through time (csrc/neuron_math.h: step_backward).
    s = tl.where(u >= 0.0, 1.0, 0.0)
    sg = _surrogate_grad(u, a, SURROGATE)
    if SCALE:
        gs = k * gy
        g_k = gy * s
    else:
        gs = gy
        g_k = gy * 0.0
    if not DETACH:
        gs = gs - theta * gv
    gh = gv + gs * sg
    g_theta = -gv * s - thr_scale * gs * sg
    return gh, g_theta, g_k


@triton.jit
def _neuron_fwd_kernel(x_ptr, v0_ptr, y_ptr, vT_ptr, saved_ptr, theta_ptr, beta_ptr,
                       T_if, M, C, inner, reuse_alpha,
                        HAS_V0: tl.constexpr, REUSE: tl.constexpr, SCALE: tl.constexpr,
                       SAVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    c = (offs // inner) % C
    th = tl.load(theta_ptr + c, mask=mask, other=1.0)
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0)
    else:
        v = tl.zeros([BLOCK], dtype=tl.float32)
    xp = x_ptr + offs
    yp = y_ptr + offs
    if SAVE:
        sp = saved_ptr + offs
    for _ in range(T_if):
        # h = v + x; u = h - theta; s = H(u); v = h - theta s (soft reset)
        h = v + tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        u = h - th
        s = tl.where(u >= 0.0, 1.0, 0.0)
        v = h - th * s
        y = th * s if SCALE else s
        tl.store(yp, y.to(yp.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(sp, u.to(sp.dtype.element_ty), mask=mask)
            sp += M
        xp += M
        yp += M
    if REUSE:
        # MPRN reuse step: fires a spike of size beta when h >= reuse_alpha theta.
        be = tl.load(beta_ptr + c, mask=mask, other=0.0)
        h = v + tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        u = h - reuse_alpha * th
        s = tl.where(u >= 0.0, 1.0, 0.0)
        v = h - th * s
        y = be * s if SCALE else s
        tl.store(yp, y.to(yp.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(sp, u.to(sp.dtype.element_ty), mask=mask)
    tl.store(vT_ptr + offs, v, mask=mask)


@triton.jit
def _neuron_bwd_kernel(gy_last, gvT_ptr, saved_last, gx_last, gv0_ptr, gth_ptr, gbe_ptr,
                       theta_ptr, beta_ptr, alpha_ptr, T_if, M, C, inner, reuse_alpha,
                       HAS_GV: tl.constexpr, REUSE: tl.constexpr, SCALE: tl.constexpr,
                       DETACH: tl.constexpr, NEED_TH: tl.constexpr, NEED_BE: tl.constexpr,
                       SURROGATE: tl.constexpr, BLOCK: tl.constexpr):
    # *_last point at step T-1; the loop walks back in time.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    c = (offs // inner) % C
    th = tl.load(theta_ptr + c, mask=mask, other=1.0)
    a = tl.load(alpha_ptr + c, mask=mask, other=1.0)
    if HAS_GV:
        gv = tl.load(gvT_ptr + offs, mask=mask, other=0.0)
    else:
        gv = tl.zeros([BLOCK], dtype=tl.float32)
    gth = tl.zeros([BLOCK], dtype=tl.float32)
    gbe = tl.zeros([BLOCK], dtype=tl.float32)
    gyp = gy_last + offs
    sp = saved_last + offs
    gxp = gx_last + offs
    if REUSE:
        be = tl.load(beta_ptr + c, mask=mask, other=0.0)
        gy = tl.load(gyp, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(sp, mask=mask, other=-1.0).to(tl.float32)
        gh, g_theta, g_k = _step_backward(gy, gv, u, a, th, be, reuse_alpha,
                                          SURROGATE, SCALE, DETACH)
        tl.store(gxp, gh.to(gxp.dtype.element_ty), mask=mask)
        gv = gh
        gth += g_theta
        gbe += g_k
        gyp -= M
        sp -= M
        gxp -= M
    for _ in range(T_if):
        gy = tl.load(gyp, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(sp, mask=mask, other=-1.0).to(tl.float32)
        gh, g_theta, g_k = _step_backward(gy, gv, u, a, th, th, 1.0, SURROGATE, SCALE, DETACH)
        tl.store(gxp, gh.to(gxp.dtype.element_ty), mask=mask)
        gv = gh
        gth += g_theta + g_k
        gyp -= M
        sp -= M
        gxp -= M
    tl.store(gv0_ptr + offs, gv, mask=mask)
    if NEED_TH:
        tl.store(gth_ptr + offs, gth, mask=mask)
    if NEED_BE:
        tl.store(gbe_ptr + offs, gbe, mask=mask)


def _block(M: int) -> int:
    # The interpreter's cost grows with the number of programs: use few, large ones.
    if _INTERPRET:
        return min(1 << 16, max(1024, triton.next_power_of_2(M)))
    return 1024


def neuron_fwd_triton(x, theta, beta, v0, alpha, surrogate, reuse_alpha, reuse_step,
                      scale_output, detach_reset, inner, save_bytes):
    """Launcher with the contract of spikingir::neuron_fwd (csrc/ops.cpp)."""
    op = "neuron_fwd_triton"
    T, M, _ = checks.neuron_params(op, x, theta, beta, alpha, inner, surrogate, reuse_step)
    if v0 is not None:
        checks.tensor(op, "v0", v0, checks.F32, x, numel=M)
    y = torch.empty_like(x)
    vT = torch.empty(x.shape[1:], dtype=torch.float32, device=x.device)
    if save_bytes not in (0, 2, 4):
        raise ValueError(f"save_bytes must be 0, 2 or 4, got {save_bytes}")
    saved = torch.empty(0, dtype=torch.float32, device=x.device) if save_bytes == 0 else \
        torch.empty_like(x, dtype=torch.bfloat16 if save_bytes == 2 else torch.float32)
    if M > 0:
        BLOCK = _block(M)
        _neuron_fwd_kernel[(triton.cdiv(M, BLOCK),)](
            x, v0, y, vT, saved, theta, beta, T - int(reuse_step), M, theta.numel(), inner,
            float(reuse_alpha), HAS_V0=v0 is not None, REUSE=bool(reuse_step),
            SCALE=bool(scale_output), SAVE=save_bytes > 0, BLOCK=BLOCK, num_warps=4)
    return y, vT, saved


def neuron_bwd_triton(grad_y, grad_v, saved, theta, beta, alpha, surrogate, reuse_alpha,
                      reuse_step, scale_output, detach_reset, inner, need_theta_grad,
                      need_beta_grad):
    """Launcher with the contract of spikingir::neuron_bwd (csrc/ops.cpp)."""
    op = "neuron_bwd_triton"
    T, M, C = checks.neuron_params(op, grad_y, theta, beta, alpha, inner, surrogate, reuse_step)
    checks.tensor(op, "saved", saved, (torch.float32, torch.bfloat16), grad_y, shape=grad_y.shape)
    if grad_v is not None:
        checks.tensor(op, "grad_v", grad_v, checks.F32, grad_y, numel=M)
    f32 = dict(dtype=torch.float32, device=grad_y.device)
    gx = torch.empty_like(grad_y)
    gv0 = torch.empty(grad_y.shape[1:], **f32)
    gth = torch.empty(M, **f32) if need_theta_grad else None
    gbe = torch.empty(M, **f32) if need_beta_grad else None
    if M > 0:
        BLOCK = _block(M)
        _neuron_bwd_kernel[(triton.cdiv(M, BLOCK),)](
            grad_y[T - 1], grad_v, saved[T - 1], gx[T - 1], gv0, gth, gbe, theta, beta, alpha,
            T - int(reuse_step), M, C, inner, float(reuse_alpha),
            HAS_GV=grad_v is not None, REUSE=bool(reuse_step), SCALE=bool(scale_output),
            DETACH=bool(detach_reset), NEED_TH=bool(need_theta_grad),
            NEED_BE=bool(need_beta_grad), SURROGATE=int(surrogate), BLOCK=BLOCK, num_warps=4)

    # Per-channel sums of per-neuron partials, [B, C, inner] -> [C]: torch's
    # reductions use a fixed order for a given shape, so this is deterministic.
    def reduce(buf):
        return buf.view(-1, C, inner).sum((0, 2)) if buf is not None else torch.zeros(C, **f32)

    return gx, gv0, reduce(gth), reduce(gbe)


@triton.jit
def _neuron_fwd_masks_kernel(x_ptr, v0_ptr, masks_ptr, vT_ptr, theta_ptr, T_if, C, P, Cw,
                             n_pb, step, mstep, reuse_alpha, PER_CHANNEL: tl.constexpr,
                             HAS_V0: tl.constexpr, V0_PER_CHANNEL: tl.constexpr,
                             REUSE: tl.constexpr, BLOCK_P: tl.constexpr):
    # One program: 64 channels (mask word `word`) x BLOCK_P pixels of image n,
    # through all steps. The step arithmetic is that of _neuron_fwd_kernel, so
    # the spikes are bitwise the same; each step stores one int64 per pixel:
    # the OR (here: the sum of distinct powers of two) of its channels' bits.
    pid = tl.program_id(0)
    word = tl.program_id(1)
    n = pid // n_pb
    c = word * 64 + tl.arange(0, 64)
    p = (pid % n_pb).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # int64: P can pass 2^31
    cmask = c < C
    pmask = p < P
    mask = cmask[:, None] & pmask[None, :]
    if PER_CHANNEL:
        th = tl.load(theta_ptr + c, mask=cmask, other=1.0)
    else:
        th = tl.load(theta_ptr + c * 0)
    th = th[:, None]
    bit = tl.full([64], 1, tl.int64) << (c % 64).to(tl.int64)
    offs = (n.to(tl.int64) * C + c[:, None]) * P + p[None, :]  # neuron within a step
    if HAS_V0:
        if V0_PER_CHANNEL:
            v = tl.zeros([64, BLOCK_P], dtype=tl.float32) + tl.load(
                v0_ptr + c, mask=cmask, other=0.0)[:, None]
        else:
            v = tl.load(v0_ptr + offs, mask=mask, other=0.0)
    else:
        v = tl.zeros([64, BLOCK_P], dtype=tl.float32)
    # step, mstep: elements per step of x (N C P; 0: one input for every step)
    # and of the masks (N P Cw)
    xp = x_ptr + offs
    mp = masks_ptr + (n.to(tl.int64) * P + p) * Cw + word
    for _ in range(T_if):
        h = v + tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        u = h - th
        fired = (u >= 0.0) & mask
        v = h - th * tl.where(fired, 1.0, 0.0)
        tl.store(mp, tl.sum(tl.where(fired, bit[:, None], 0), axis=0), mask=pmask)
        xp += step
        mp += mstep
    if REUSE:
        h = v + tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        u = h - reuse_alpha * th
        fired = (u >= 0.0) & mask
        v = h - th * tl.where(fired, 1.0, 0.0)
        tl.store(mp, tl.sum(tl.where(fired, bit[:, None], 0), axis=0), mask=pmask)
    tl.store(vT_ptr + offs, v, mask=mask)


def neuron_fwd_masks_triton(x, theta, v0, reuse_alpha, reuse_step, steps):
    """Launcher with the contract of spikingir::neuron_fwd_masks (csrc/ops.cpp)."""
    op = "neuron_fwd_masks_triton"
    checks.tensor(op, "x", x, checks.FLOATS, x)
    checks.require(x.dim() >= 3 and steps >= 1 + bool(reuse_step) and x.shape[0] in (steps, 1),
                   op, f"x must be [steps or 1, N, C, ...] with steps >= {1 + bool(reuse_step)}, "
                   f"got {tuple(x.shape)} and steps {steps}")
    T = steps
    N, C = x.shape[1:3]
    P = math.prod(x.shape[3:])
    checks.tensor(op, "theta", theta, checks.F32, x, dim=1)
    checks.require(theta.numel() in (1, C), op, f"theta must have 1 or C = {C} values, got "
                   f"{theta.numel()}")
    if v0 is not None:
        checks.tensor(op, "v0", v0, checks.F32, x)
        checks.require(v0.numel() == N * C * P or (v0.dim() == 1 and v0.numel() == C), op,
                       f"v0 must hold one value per neuron ({N * C * P}) or per channel ({C}), "
                       f"got {tuple(v0.shape)}")
    Cw = triton.cdiv(C, 64)
    # the mask words are grid axis 1, at most MAX_GRID_YZ programs on CUDA
    checks.require(Cw <= checks.MAX_GRID_YZ, op, f"at most {64 * checks.MAX_GRID_YZ} channels "
                   f"({checks.MAX_GRID_YZ} words of 64), got {C}")
    masks = torch.empty((T, N) + tuple(x.shape[3:]) + (Cw,), dtype=torch.int64, device=x.device)
    vT = torch.empty(x.shape[1:], dtype=torch.float32, device=x.device)
    if N * P > 0 and C > 0:
        # The interpreter's cost grows with the number of programs: few, large ones there.
        BLOCK_P = min(1 << 12, max(64, triton.next_power_of_2(P))) if _INTERPRET else 64
        n_pb = triton.cdiv(P, BLOCK_P)
        _neuron_fwd_masks_kernel[(N * n_pb, Cw)](
            x, v0, masks, vT, theta, T - int(reuse_step), C, P, Cw, n_pb,
            0 if x.shape[0] == 1 else N * C * P, N * P * Cw,
            float(reuse_alpha),
            PER_CHANNEL=theta.numel() > 1, HAS_V0=v0 is not None,
            V0_PER_CHANNEL=v0 is not None and v0.dim() == 1 and v0.numel() == C,
            REUSE=bool(reuse_step),
            BLOCK_P=BLOCK_P, num_warps=4)
    return masks, vT
