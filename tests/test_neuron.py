"""Tests of the fused IF / MPRN neuron ops against the float64 reference."""
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from spikingir import ops
from spikingir.nn import IFNeuron, MPRNeuron
from spikingir.ops import backends
from spikingir.ops.reference import neuron_reference
from spikingir.ops.surrogate import SURROGATES

from helpers import assert_close, ran_ops, dyadic

CPU_FUSED = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
GPU = torch.cuda.is_available()
GPU_FUSED = [b for b in ("cuda", "triton") if GPU and b in ops.available_backends("cuda")]


def run(op, backend, x, theta, beta=None, **kw):
    if op == "if":
        return ops.if_multistep(x, theta, backend=backend, **kw)
    return ops.mprn_multistep(x, theta, beta, backend=backend, **kw)


def loss_of(y, v, gen):
    """A scalar with random weights on every output, so every gradient path counts."""
    wy = torch.randn(y.shape, generator=gen).to(y.device)
    wv = torch.randn(v.shape, generator=gen).to(v.device)
    return (y.double() * wy).sum() + (v.double() * wv).sum()


def compare_with_reference(op, backend, x, theta, beta=None, v0=None, device="cpu",
                           tol=(1e-5, 1e-4), seed=0, **kw):
    """Forward equal, gradients (x, theta, beta, v0) within tol of the float64 reference."""
    def leaves(dtype):
        def leaf(t):
            if t is None or not isinstance(t, torch.Tensor):
                return t
            return t.detach().to(device=device, dtype=dtype).requires_grad_()
        return leaf
    outs = {}
    for name, dtype, be in (("fused", x.dtype, backend), ("ref", torch.float64, "torch")):
        leaf = leaves(dtype)
        xs = leaf(x)
        if not x.is_contiguous():  # keep the fused input non-contiguous
            xs = x.detach().to(device).clone().transpose(-1, -2).contiguous().transpose(-1, -2)
            xs = xs.to(dtype).requires_grad_()
        th = leaf(theta) if isinstance(theta, torch.Tensor) else theta
        bt = leaf(beta) if isinstance(beta, torch.Tensor) else beta
        v = leaf(v0)
        pd = torch.float64 if name == "ref" else torch.float32
        if isinstance(theta, torch.Tensor):
            th = theta.detach().to(device=device, dtype=pd).requires_grad_()
        if isinstance(beta, torch.Tensor):
            bt = beta.detach().to(device=device, dtype=pd).requires_grad_()
        if v0 is not None:
            v = v0.detach().to(device=device, dtype=pd).requires_grad_()
        if "alpha" in kw and isinstance(kw["alpha"], torch.Tensor):
            kw = dict(kw, alpha=kw["alpha"].to(device=device, dtype=pd))
        y, vT = run(op, be, xs, th, bt, v0=v, **kw)
        loss_of(y, vT, torch.Generator().manual_seed(seed)).backward()
        outs[name] = dict(y=y, v=vT, gx=xs.grad,
                          gth=th.grad if isinstance(th, torch.Tensor) else None,
                          gbe=bt.grad if isinstance(bt, torch.Tensor) else None,
                          gv0=v.grad if v0 is not None else None)
    f, r = outs["fused"], outs["ref"]
    assert f["y"].dtype == x.dtype and f["y"].shape == x.shape
    assert f["v"].dtype == torch.float32
    assert_close(f["y"], r["y"], 0, 0, "y")  # inputs are exact: spikes must agree
    atol, rtol = tol
    assert_close(f["v"], r["v"], atol, rtol, "v_final")
    for k in ("gx", "gth", "gbe", "gv0"):
        if r[k] is not None:
            scale = max(1.0, r[k].abs().max().item())
            assert_close(f[k], r[k], atol * scale, rtol, k)
    return f, r


# ---------------------------------------------------------------------------
# The reference itself: gradcheck in float64 with the smooth surrogate.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
@pytest.mark.parametrize("reuse_step", [False, True])
@pytest.mark.parametrize("scale_output", [True, False])
def test_reference_gradcheck(surrogate, reuse_step, scale_output):
    """The true gradient of the smooth neuron (detach_reset is by definition not
    a true gradient: the fused-vs-reference tests cover it)."""
    g = torch.Generator().manual_seed(1)
    T, B, C, S = 4, 2, 3, 2
    x = torch.randn(T, B, C, S, dtype=torch.float64, generator=g).requires_grad_()
    theta = (torch.rand(C, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    beta = (torch.rand(C, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    v0 = torch.randn(B, C, S, dtype=torch.float64, generator=g).requires_grad_()
    alpha = torch.full((C,), 1.5 if surrogate != "sigmoid" else 2.0, dtype=torch.float64)

    def f(x, theta, beta, v0):
        return neuron_reference(x, theta, beta, v0, alpha, surrogate, 0.75, reuse_step,
                                scale_output, False, S, smooth=True)
    assert torch.autograd.gradcheck(f, (x, theta, beta, v0))


def test_reference_straight_through_gradient_is_the_surrogate():
    from spikingir.ops.surrogate import spike, surrogate_grad
    u = torch.linspace(-2, 2, 101, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(1.7, dtype=torch.float64)
    for name in SURROGATES:
        s = spike(u, a, name)
        assert torch.equal(s.detach(), (u >= 0).double())
        (g,) = torch.autograd.grad(s.sum(), u)
        assert_close(g, surrogate_grad(name, u.detach(), a), 1e-12, 1e-12, name)
        # sigma_a' written out is the derivative of the smooth step (off its kinks)
        from spikingir.ops.surrogate import smooth_step
        (g_smooth,) = torch.autograd.grad(smooth_step(name, u, a).sum(), u)
        off_kink = ((a * u).abs() - 0.5).abs().gt(1e-6) & ((a * u).abs() - 1).abs().gt(1e-6)
        assert_close(g_smooth[off_kink], g[off_kink], 1e-12, 1e-12, name)
        uu = torch.linspace(-30, 30, 200001, dtype=torch.float64)
        area = torch.trapezoid(surrogate_grad(name, uu, a), uu).item()
        ends = smooth_step(name, torch.tensor([-30.0, 30.0], dtype=torch.float64), a)
        assert abs(area - (ends[1] - ends[0]).item()) < 1e-3  # rectangle: grid error
        lim = smooth_step(name, torch.tensor([-1e9, 1e9], dtype=torch.float64), a)
        assert_close(lim, torch.tensor([0.0, 1.0]), 1e-8, 0, name)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("used", ["y", "v"])
def test_fused_gradient_from_one_output_only(backend, used):
    """Backward gets None, not materialised zeros, for an output without a
    gradient; with only y or only v_final in the loss, the gradients still equal
    the reference's."""
    g = torch.Generator().manual_seed(29)
    x = dyadic(5, 2, 3, 4, 5, generator=g)
    grads = {}
    for be, dt in ((backend, torch.float32), ("torch", torch.float64)):
        xs = x.to(dt).clone().requires_grad_()
        th = torch.tensor([0.5, 1.0, 1.25], dtype=dt, requires_grad=True)
        bt = torch.tensor([0.25, 0.75, 1.5], dtype=dt, requires_grad=True)
        y, v = ops.mprn_multistep(xs, th, bt, backend=be)
        w = torch.randn((y if used == "y" else v).shape, generator=g.manual_seed(1)).to(dt)
        ((y if used == "y" else v) * w).sum().backward()
        grads[be] = (xs.grad, th.grad, bt.grad)
    for f, r, name in zip(grads[backend], grads["torch"], ("x", "theta", "beta")):
        if r is None:  # v_final does not depend on beta (the reset subtracts theta)
            assert used == "v" and name == "beta" and f is None
            continue
        assert_close(f, r, 1e-5, 1e-4, name)


def test_sigmoid_surrogate_is_zero_beyond_the_cutoff():
    from spikingir.ops.surrogate import SIGMOID_CUTOFF, surrogate_grad
    from kernels.neuron import SIGMOID_CUTOFF as triton_cutoff
    assert triton_cutoff.value == SIGMOID_CUTOFF
    a = torch.tensor(2.0, dtype=torch.float64)
    u = torch.tensor([-20.5, -20.0, 0.0, 19.9, 20.0, 20.01, 100.0], dtype=torch.float64)
    g = surrogate_grad("sigmoid", u, a)  # |a u| = 41, 40, 0, 39.8, 40, 40.02, 200
    assert (g[[0, 5, 6]] == 0).all()
    sig = torch.sigmoid(a * u[[1, 2, 3, 4]])
    assert_close(g[[1, 2, 3, 4]], a * sig * (1 - sig), 0, 1e-12, "inside the cutoff")


@pytest.mark.parametrize("backend,dev", [(b, "cpu") for b in CPU_FUSED]
                         + [pytest.param(b, "cuda", marks=pytest.mark.gpu) for b in GPU_FUSED])
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_fused_sigmoid_gradient_has_no_subnormals(backend, dev, op):
    """Potentials far below threshold: the sigmoid surrogate (a e^-|au|) would be
    subnormal there, and subnormal gradients are ~5x slower through oneDNN's conv
    backward on Intel CPUs. Every backend gives exactly 0 beyond the cutoff, as
    the reference does, and no subnormal gradient anywhere."""
    g = torch.Generator().manual_seed(23)
    T, M = 4, 2048
    # u from -60 to +2 thresholds: a u = 4 u / theta spans the cutoff (|a u| = 40 at u = -10)
    x = (torch.rand(T, M, generator=g) * 62 - 60).to(dev)
    theta = torch.tensor(1.0, device=dev)
    beta = torch.tensor(0.5, device=dev) if op == "mprn" else None
    f, r = compare_with_reference(op, backend, x, theta, beta, device=dev, alpha=4.0)
    tiny = torch.finfo(torch.float32).tiny
    for k in ("gx", "gth", "gbe"):
        if f[k] is not None:
            v = f[k].abs()
            assert not ((v > 0) & (v < tiny)).any(), k
    assert ((f["gx"] == 0) == (r["gx"] == 0)).float().mean() > 0.99


# ---------------------------------------------------------------------------
# Fused backends against the reference.
# ---------------------------------------------------------------------------

SHAPES = [(1, 7), (3, 1023), (5, 2, 3, 5, 7), (32, 1, 4, 9)]


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_reference_shapes(backend, op, shape):
    if op == "mprn" and shape[0] < 2:
        shape = (2,) + shape[1:]
    g = torch.Generator().manual_seed(hash((backend, op, shape)) % 2**31)
    x = dyadic(*shape, generator=g)
    compare_with_reference(op, backend, x, 0.75, 0.5 if op == "mprn" else None)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("scale_output", [True, False])
def test_fused_matches_reference_options(backend, op, surrogate, detach_reset, scale_output):
    g = torch.Generator().manual_seed(7)
    T, B, C, H, W = 6, 2, 3, 4, 5
    x = dyadic(T, B, C, H, W, generator=g)
    theta = torch.tensor([0.5, 1.0, 1.25])
    beta = torch.tensor([0.25, 0.75, 1.5])
    v0 = dyadic(B, C, H, W, generator=g, spread=0.5)
    compare_with_reference(op, backend, x, theta, beta if op == "mprn" else None, v0=v0,
                           surrogate=surrogate, detach_reset=detach_reset,
                           scale_output=scale_output)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_fused_noncontiguous_tensor_alpha_per_channel(backend, op):
    g = torch.Generator().manual_seed(3)
    x = dyadic(5, 3, 4, 7, 6, generator=g).transpose(-1, -2)  # [T, B, C, 6, 7] non-contiguous
    assert not x.is_contiguous()
    theta = torch.tensor([0.5, 1.0, 1.5, 2.0])
    alpha = 4.0 / theta  # scale-free surrogate
    compare_with_reference(op, backend, x, theta, torch.tensor(0.5) if op == "mprn" else None,
                           alpha=alpha)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, (2e-3, 2e-3)), (torch.bfloat16, (2e-2, 2e-2))])
def test_fused_half_inputs(backend, dtype, tol):
    g = torch.Generator().manual_seed(5)
    x = dyadic(4, 2, 3, 5, generator=g, scale=8, spread=1.0).to(dtype)
    for op, beta in (("if", None), ("mprn", 0.5)):
        f, _ = compare_with_reference(op, backend, x, 1.0, beta, tol=tol)
        assert f["gx"].dtype == dtype


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
@pytest.mark.parametrize("shape", [(3, 2, 4, 0), (3, 0, 4, 5), (3, 2, 4, 0, 5)])
def test_empty_inputs_give_empty_outputs(backend, shape):
    """An empty batch or image (a zero-size spatial dimension): outputs of the
    input's shape, v_final of one step's, gradients flow (of the input's shape);
    masks too where they apply."""
    x = torch.randn(shape, requires_grad=True)
    for op in ("if", "mprn"):
        fn = ops.if_multistep if op == "if" else lambda *a, **k: ops.mprn_multistep(*a, 0.5, **k)
        y, v = fn(x, torch.ones(4), backend=backend)
        assert y.shape == x.shape and v.shape == x.shape[1:] and v.dtype == torch.float32
        (y.sum() + v.sum()).backward()
        assert x.grad.shape == x.shape
        if backend == "torch":  # float64 in, float64 state out, as for a non-empty input
            assert fn(x.detach().double(), torch.ones(4), backend=backend)[1].dtype == torch.float64
        if len(shape) == 5:
            with torch.no_grad():
                m, v = fn(x, torch.ones(4), backend=backend, emit="masks")
            assert m.shape == x.shape and m.count() == 0 and v.shape == x.shape[1:]


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_fused_random_inputs_away_from_threshold(backend):
    """Non-dyadic random inputs: spikes agree wherever every step's potential is
    at least 1e-3 away from the threshold (so rounding cannot flip a spike)."""
    g = torch.Generator().manual_seed(11)
    T, M = 10, 4001
    x = torch.randn(T, M, generator=g)
    theta = 0.9
    # margin of every neuron, from the float64 reference recursion
    v = torch.zeros(M, dtype=torch.float64)
    margin = torch.full((M,), math.inf, dtype=torch.float64)
    for t in range(T):
        h = v + x[t].double()
        margin = torch.minimum(margin, (h - theta).abs())
        v = h - theta * (h >= theta).double()
    keep = margin > 1e-3
    assert keep.float().mean() > 0.9
    y, vT = ops.if_multistep(x, theta, backend=backend)
    yr, vr = ops.if_multistep(x.double(), theta, backend="torch")
    assert_close(y[:, keep], yr[:, keep].float(), 0, 0, "y")
    assert_close(vT[keep], vr[keep], 1e-5, 1e-5, "v_final")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_bf16_saved_state(backend):
    """save_dtype=bfloat16 stores u = h - threshold in 2 bytes: spikes (its sign)
    are exact, the surrogate sees u with 8 mantissa bits. Measured gradient
    error: relative L2 error of grad_x about 1e-3 (bound: 1e-2)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 2, 4, 33, generator=g)
    theta = torch.tensor([0.5, 0.8, 1.0, 1.3])
    grads = {}
    for sd in (torch.float32, torch.bfloat16):
        xs, th = x.clone().requires_grad_(), theta.clone().requires_grad_()
        y, v = ops.if_multistep(xs, th, save_dtype=sd, backend=backend)
        loss_of(y, v, torch.Generator().manual_seed(0)).backward()
        grads[sd] = (y, xs.grad, th.grad)
    assert torch.equal(grads[torch.float32][0], grads[torch.bfloat16][0])
    for i in (1, 2):
        a, b = grads[torch.float32][i], grads[torch.bfloat16][i]
        rel = ((a - b).norm() / a.norm()).item()
        assert 0 < rel < 1e-2, rel


# ---------------------------------------------------------------------------
# MPRN semantics on hand-computed examples.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_mprn_hand_computed(backend):
    # theta = 1, beta = 0.5, reuse_alpha = 0.75; two neurons, T = 2 IF steps + reuse.
    x = torch.tensor([[0.625, 0.625],
                      [0.625, 0.625],
                      [0.5, 0.625]])
    y, v = ops.mprn_multistep(x, 1.0, 0.5, reuse_alpha=0.75, backend=backend)
    # step 0: h = .625 (no spike); step 1: h = 1.25 -> spike 1, v = .25;
    # reuse: neuron 0 h = .75 >= .75 -> spike of size .5, v = .75 - 1 = -.25;
    #        neuron 1 h = .875 -> spike .5, v = -.125.
    assert torch.equal(y, torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]]))
    assert torch.equal(v, torch.tensor([-0.25, -0.125]))
    x[2, 0] = 0.375  # h = .625 < .75: no reuse spike, v stays .625
    y, v = ops.mprn_multistep(x, 1.0, 0.5, reuse_alpha=0.75, backend=backend)
    assert y[2, 0] == 0 and v[0] == 0.625
    y, v = ops.mprn_multistep(x, 1.0, 0.5, reuse_alpha=0.75, scale_output=False, backend=backend)
    assert torch.equal(y[:, 1], torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_if_soft_reset_and_v0(backend):
    x = torch.tensor([[1.5], [0.25], [0.25], [2.5]])
    y, v = ops.if_multistep(x, 1.0, v0=torch.tensor([0.5]), backend=backend)
    # h: 2.0 -> spike, v 1.0; 1.25 -> spike, v .25; .5 -> no; 3.0 -> spike, v 2.0 (one spike/step)
    assert torch.equal(y.flatten(), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert v.item() == 2.0


# ---------------------------------------------------------------------------
# Op registration: opcheck, torch.compile, the chosen backend really runs.
# ---------------------------------------------------------------------------

def _op_samples(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, 4, generator=g).to(device)
    C = 3
    th = (torch.rand(C, generator=g) + 0.5).to(device)
    be = (torch.rand(C, generator=g) + 0.5).to(device)
    a = torch.full((C,), 2.0, device=device)
    v0 = torch.randn(2, 3, 4, generator=g).to(device)
    samples = []
    for reuse in (False, True):
        for with_v0 in (False, True):
            samples.append(((x.clone().requires_grad_(), th.clone().requires_grad_(),
                             be.clone().requires_grad_(),
                             v0.clone().requires_grad_() if with_v0 else None, a,
                             0, 0.75, reuse, True, False, 4, 4), {}))
    samples.append(((x, th, be, None, a, 2, 0.9, True, False, True, 4, 2), {}))
    samples.append(((x, th, be, None, a, 1, 0.9, False, True, False, 4, 0), {}))
    return samples


def _opcheck_all(fwd, device="cpu"):
    for args, kwargs in _op_samples(device):
        torch.library.opcheck(fwd, args, kwargs)


@pytest.mark.skipif(not backends.HAS_CPP_OPS, reason="spikingir._C not built")
def test_opcheck_cpp():
    _opcheck_all(torch.ops.spikingir.neuron_fwd.default)
    for args, _ in _op_samples()[:2]:
        y, vT, saved = (t.detach() for t in torch.ops.spikingir.neuron_fwd(*args))
        th, be = args[1].detach(), args[2].detach()
        bwd_args = (torch.randn_like(y), torch.randn_like(vT), saved, th, be, args[4]) + \
            args[5:11] + (True, True)
        torch.library.opcheck(torch.ops.spikingir.neuron_bwd.default, bwd_args)


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
def test_opcheck_triton():
    _opcheck_all(torch.ops.spikingir.neuron_fwd_triton.default)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_torch_compile_fullgraph():
    from spikingir.nn import IFNeuron, MPRNeuron, SeqToBatch
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        SeqToBatch(torch.nn.Conv2d(2, 4, 3, padding=1)),
        IFNeuron(1.0, num_channels=4, backend="cpp"),
        SeqToBatch(torch.nn.Conv2d(4, 4, 3, padding=1)),
        MPRNeuron(0.5, backend="cpp", v_init="half"),
    )
    x = torch.randn(4, 2, 2, 8, 8)
    eager = model(x)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert_close(out, eager, 1e-5, 1e-5, "compiled forward")
    for a, b in zip([p.grad for p in model.parameters()], g_eager):
        assert_close(a, b, 1e-4, 1e-4, "compiled grad")


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_torch_compile_symbolic_floats_and_sizes():
    """A float threshold or alpha that changes between calls is a symbolic float
    under torch.compile (math.isfinite of it failed the fullgraph trace), and with
    dynamic shapes a per-channel neuron's spatial size is symbolic (the check
    `numel in (1, C)` failed, and the ops' `inner` was an int the graph was
    specialised to)."""
    from spikingir.nn import IFNeuron, MPRNeuron
    x = torch.randn(4, 2, 3)
    f = torch.compile(lambda x, th, a: ops.if_multistep(x, th, alpha=a)[0], backend="eager",
                      fullgraph=True)
    for th, a in ((0.5, 4.0), (0.7, 5.0), (0.9, 2.0)):
        assert torch.equal(f(x, th, a), ops.if_multistep(x, th, alpha=a)[0])
    for cls in (IFNeuron, MPRNeuron):
        m = cls(0.5, num_channels=3, backend="cpp")
        cm = torch.compile(m, backend="eager", fullgraph=True, dynamic=True)
        for hw in ((5, 6), (7, 9), (4, 11)):
            xx = torch.randn(4, 2, 3, *hw, requires_grad=True)
            y = cm(xx)
            assert torch.equal(y, m(xx))
            y.sum().backward()
            assert xx.grad is not None and torch.isfinite(xx.grad).all()


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_chosen_backend_runs(backend):
    x = torch.randn(3, 5, requires_grad=True)

    def fn():
        y, _ = ops.if_multistep(x, 1.0, backend=backend)
        y.sum().backward()
    ran = ran_ops(fn)
    expected = {"torch": set(), "cpp": {"spikingir::neuron_fwd", "spikingir::neuron_bwd"},
                "triton": {"spikingir::neuron_fwd_triton", "spikingir::neuron_bwd_triton"}}
    assert ran == expected[backend]


def test_auto_backend_choice():
    assert backends.choose("if_multistep", "cpu", torch.float64, "auto") == "torch"
    if "cpp" in CPU_FUSED:
        assert backends.choose("if_multistep", "cpu", torch.float32, "auto") == "cpp"
        ran = ran_ops(lambda: ops.if_multistep(torch.randn(2, 3), 1.0))
        assert ran == {"spikingir::neuron_fwd"}


def test_auto_warns_when_the_extension_is_missing(monkeypatch):
    """``auto`` never hides a failure: with spikingir._C unimportable (a failed
    build) a CPU call falls back to the reference with a warning that says why,
    once per op and device."""
    monkeypatch.setattr(backends, "HAS_CPP_OPS", False)
    monkeypatch.setattr(backends, "_CPP_ERROR", "libfoo.so: cannot open shared object file")
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match=r"if_multistep on cpu \(the compiled extension "
                      r"spikingir._C failed to import \(libfoo.so"):
        assert backends.choose("if_multistep", "cpu", torch.float32, "auto") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is quiet
        assert backends.choose("if_multistep", "cpu", torch.float32, "auto") == "torch"
        assert backends.choose("if_multistep", "cpu", torch.float64, "auto") == "torch"


def test_extension_built_against_another_torch_is_explained():
    """An undefined symbol when spikingir._C loads almost always means it was built
    against another torch (e.g. by pip's isolated build): the message says so and
    how to rebuild; other import errors are passed on as they are."""
    msg = backends._explain_import_error("_C.so: undefined symbol: _ZN3c104impl8GPUTrace")
    assert "built against another torch" in msg and torch.__version__ in msg
    assert "--no-build-isolation" in msg
    other = "libfoo.so: cannot open shared object file"
    assert backends._explain_import_error(other) == other


def test_a_torch_older_than_the_floor_is_refused_at_import():
    """A torch older than the floor in pyproject.toml is one ImportError naming both
    versions (an older torch failed in the op registration with an AttributeError
    from torch.library); a pre-release or local build of a supported release passes."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject.read_text())
    assert tuple(map(int, floor.groups())) == backends.TORCH_MIN
    with pytest.raises(ImportError, match=r"needs torch >= 2\.6, found torch 2\.5\.1\+cu124"):
        backends._check_torch_version("2.5.1+cu124")
    for supported in ("2.6.0", "2.6.0a0+ecf3bae40a", "2.13.0+cpu", "3.0.0", torch.__version__):
        backends._check_torch_version(supported)


def test_building_without_torch_says_what_to_do(tmp_path):
    """setup.py in an environment without torch (pip's isolated build, where torch is
    deliberately not a build requirement) fails with one line saying what to do,
    not an ImportError traceback."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "torch.py").write_text("raise ImportError('No module named torch')\n")
    run = subprocess.run([sys.executable, str(root / "setup.py"), "--version"], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "install torch first" in run.stderr and "--no-build-isolation" in run.stderr
    assert "Traceback" not in run.stderr


def test_determinism_of_parameter_gradients():
    x = torch.randn(6, 4, 8, 16, 16)
    grads = []
    for _ in range(2):
        th = torch.full((8,), 0.7, requires_grad=True)
        y, v = ops.if_multistep(x, th)
        (y.sum() + v.sum()).backward()
        grads.append(th.grad)
    assert torch.equal(grads[0], grads[1])


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ---------------------------------------------------------------------------

X = torch.randn(4, 2, 3, 5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda b: ops.if_multistep(X.long(), 1.0, backend=b), TypeError, "x_seq"),
    (lambda b: ops.if_multistep([1.0], 1.0, backend=b), TypeError, "x_seq"),
    (lambda b: ops.if_multistep(X[:0], 1.0, backend=b), ValueError, "T >= 1"),
    (lambda b: ops.if_multistep(X[:1].squeeze(0)[0, 0], 1.0, backend=b), ValueError, "x_seq"),
    (lambda b: ops.mprn_multistep(X[:1], 1.0, 1.0, backend=b), ValueError, "T \\+ 1"),
    (lambda b: ops.if_multistep(X, torch.ones(4), backend=b), ValueError, "theta.*length C = .*3"),
    (lambda b: ops.if_multistep(X, torch.ones(2, 3), backend=b), ValueError, "theta"),
    (lambda b: ops.if_multistep(X, -1.0, backend=b), ValueError, "theta"),
    (lambda b: ops.if_multistep(X, float("nan"), backend=b), ValueError, "theta"),
    (lambda b: ops.if_multistep(X, torch.tensor([1.0, -1.0, 1.0]), backend=b), ValueError, "theta"),
    (lambda b: ops.if_multistep(X, torch.tensor([1.0, float("nan"), 1.0]), backend=b), ValueError, "theta"),
    (lambda b: ops.if_multistep(X, torch.ones(3, dtype=torch.int64), backend=b), TypeError, "theta"),
    (lambda b: ops.if_multistep(X, "1", backend=b), TypeError, "theta"),
    (lambda b: ops.if_multistep(X, 1.0, v0=torch.zeros(2, 3), backend=b), ValueError, "v0"),
    (lambda b: ops.if_multistep(X, 1.0, v0=torch.zeros(2, 3, 5, device="meta"), backend=b), ValueError, "v0"),
    (lambda b: ops.mprn_multistep(X, 1.0, 1.0, reuse_alpha=0.5, backend=b), ValueError, "reuse_alpha"),
    (lambda b: ops.mprn_multistep(X, 1.0, 1.0, reuse_alpha=1.2, backend=b), ValueError, "reuse_alpha"),
    (lambda b: ops.mprn_multistep(X, 1.0, float("inf"), backend=b), ValueError, "beta"),
    (lambda b: ops.if_multistep(X, 1.0, surrogate="relu", backend=b), ValueError, "surrogate"),
    (lambda b: ops.if_multistep(X, 1.0, alpha=0.0, backend=b), ValueError, "alpha"),
    (lambda b: ops.if_multistep(X, 1.0, save_dtype=torch.float16, backend=b), ValueError, "save_dtype"),
])
@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_bad_input(call, exc, match, backend):
    with pytest.raises(exc, match=match):
        call(backend)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.if_multistep(X, 1.0, backend="cudnn")
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        ops.if_multistep(X, 1.0, backend="cuda")
    if "cpp" in CPU_FUSED:
        with pytest.raises(TypeError, match="float64"):
            ops.if_multistep(X.double(), 1.0, backend="cpp")
    with pytest.raises(ValueError, match="op"):
        ops.available_backends("cpu", op="conv")


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_nan_input_silences_the_neuron(backend):
    x = torch.tensor([[0.5, 0.5], [float("nan"), 0.75], [2.0, 0.0]])
    y, v = ops.if_multistep(x, 1.0, backend=backend)
    assert torch.equal(y[:, 0], torch.tensor([0.0, 0.0, 0.0]))  # never fires after NaN
    assert torch.isnan(v[0]) and v[1] == 0.25
    assert torch.equal(y[:, 1], torch.tensor([0.0, 1.0, 0.0]))


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------

def test_modules():
    from spikingir.nn import IFNeuron, MPRNeuron, SeqToBatch
    n = IFNeuron(0.5, num_channels=3, v_init="half")
    x = torch.randn(4, 2, 3, 5, 5)
    y = n(x)
    assert y.shape == x.shape and n.v_final.shape == x.shape[1:]
    ref, vr = ops.if_multistep(x, torch.full((3,), 0.5), v0=torch.full(x.shape[1:], 0.25),
                               backend="torch")
    assert torch.equal(y, ref.float())
    y.sum().backward()
    assert n.theta.grad.shape == (3,)
    n.reset()
    assert n.v_final is None
    own = []  # this call's v_final, whatever another thread's call sets the attribute to
    for neuron in (n, MPRNeuron(1.0, num_channels=3)):
        own.clear()
        neuron(x, v_final_out=own)
        assert len(own) == 1 and own[0] is neuron.v_final
    with pytest.raises(TypeError, match="v_final_out: expected None or a list"):
        n(x, v_final_out=())
    frozen = IFNeuron(1.0, trainable=False)
    assert "theta" in frozen.state_dict() and not list(frozen.parameters())
    m = MPRNeuron(1.0, beta=0.5, num_channels=3)
    assert m.beta.shape == (3,) and m(x).shape == x.shape
    stateful = IFNeuron(1.0, stateful=True)
    stateful(x)
    v1 = stateful.v_final
    y2 = stateful(x)
    expect, _ = ops.if_multistep(x, 1.0, v0=v1, backend="torch")
    assert torch.equal(y2, expect)
    # thresholds stay above 1% of their initial value whatever the optimiser does
    low = IFNeuron(torch.tensor([0.5, 0.05, 1.0]), num_channels=3)
    with torch.no_grad():
        low.theta[1] = -0.2
    assert torch.allclose(low.effective_theta(), torch.tensor([0.5, 0.0005, 1.0]))
    assert low(x).shape == x.shape
    conv = SeqToBatch(torch.nn.Conv2d(3, 6, 3, padding=1))
    assert conv(x).shape == (4, 2, 6, 5, 5)


def test_stateful_neuron_in_chunks_and_tensor_alpha_moves_with_the_module():
    """Truncated BPTT: detach_state() keeps the potential but cuts the graph, so
    each chunk backpropagates on its own (the second backward failed before,
    with no way out but reset(), which forgets the state). A per-channel tensor
    alpha (a plain attribute) moves with .to() / .double() like the parameters
    (snn.to("cuda") left it on the CPU)."""
    n = IFNeuron(0.5, num_channels=3, stateful=True, alpha=torch.tensor([2.0, 4.0, 8.0]))
    x = torch.rand(8, 2, 3, 5, 5, requires_grad=True)
    whole, _ = ops.if_multistep(x, 0.5, backend="torch")
    chunks = []
    for part in x.split(4):
        y = n(part)
        y.sum().backward()
        n.detach_state()
        assert not n.v_final.requires_grad
        chunks.append(y.detach())
    assert torch.equal(torch.cat(chunks), whole.detach())  # the state carried over
    n.to("meta")
    assert n.alpha.device.type == "meta" and n.theta.device.type == "meta"
    d = IFNeuron(0.5, num_channels=3, alpha=torch.tensor([2.0, 4.0, 8.0])).double()
    assert d.alpha.dtype == torch.float64
    e = IFNeuron(0.5, num_channels=3, alpha=torch.tensor([2.0, 4.0, 8.0])).to_empty(device="cpu")
    assert torch.equal(e.alpha, torch.tensor([2.0, 4.0, 8.0]))  # not in the state dict: kept
    # also by to_empty of a module holding the neuron (an SNN): that reaches the
    # neuron's _apply only, which gave alpha uninitialised memory (lifecycle audit)
    net = torch.nn.Sequential(IFNeuron(0.5, num_channels=3, alpha=torch.tensor([2.0, 4.0, 8.0])))
    assert torch.equal(net.to_empty(device="cpu")[0].alpha, torch.tensor([2.0, 4.0, 8.0]))


@pytest.mark.parametrize("emit", ["values", "masks"])
@pytest.mark.parametrize("cls", [IFNeuron, MPRNeuron])
def test_module_continues_from_a_given_start_potential(cls, emit):
    """forward(v0=...) starts from the given potential instead of v_init (the SNNs'
    step chunks: each chunk starts where the one before left), and an MPRNeuron with
    reuse_step=False runs IF steps only: chunks give the whole run's spikes and
    final potential bit for bit, the reuse step ending the last chunk."""
    n = cls(0.3, num_channels=3, v_init="half", backend="cpp")
    x = torch.randn(6, 2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = n(x, emit=emit)
        v_whole = n.v_final
        parts, v = [], None
        reuse = cls is MPRNeuron  # its x holds 5 IF steps and the reuse step
        for a, b in ((0, 2), (2, 3), (3, 6)):
            kw = {"reuse_step": False} if reuse and b < 6 else {}
            out = []
            parts.append(n(x[a:b], emit=emit, v0=v, v_final_out=out, **kw))
            v = out[0]
    dense = [p.to_dense() if emit == "masks" else p for p in parts]
    assert torch.equal(torch.cat(dense), whole.to_dense() if emit == "masks" else whole)
    assert torch.equal(v, v_whole) and torch.equal(n.v_final, v_whole)
    if reuse:
        with pytest.raises(TypeError, match="reuse_step: expected True or False"):
            n(x, reuse_step=None)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("cls", [IFNeuron, MPRNeuron])
def test_checkpoint_recomputes_stateless_neurons_and_refuses_stateful_ones(cls, use_reentrant):
    """torch.utils.checkpoint reruns the neuron in backward. A stateless one gives the
    gradients of the plain run; a stateful one would restart from the v_final its first
    run left (silently wrong gradients, 10x off here): an error instead."""
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(4, 2, 3, 5, 5)
    grads = []
    for ckpt in (False, True):
        n = cls(0.5, num_channels=3, backend="cpp" if CPU_FUSED else "torch")
        xx = x.clone().requires_grad_()
        y = checkpoint(n, xx, use_reentrant=use_reentrant) if ckpt else n(xx)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append((xx.grad, n.theta.grad))
    for plain, ckpt in zip(*grads):
        assert torch.equal(plain, ckpt)
    n = cls(0.5, num_channels=3, stateful=True)
    xx = x.clone().requires_grad_()
    y = checkpoint(n, xx, use_reentrant=use_reentrant)
    with pytest.raises(RuntimeError, match="stateful neuron run during backward"):
        y.sum().backward()


# ---------------------------------------------------------------------------
# GPU (skipped without one).
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="no CUDA GPU / fused GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED or ["cuda"])
@pytest.mark.parametrize("op", ["if", "mprn"])
@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_gpu_matches_reference(backend, op, surrogate):
    g = torch.Generator().manual_seed(1)
    x = dyadic(7, 3, 5, 9, 11, generator=g)
    theta = torch.tensor([0.5, 0.75, 1.0, 1.25, 1.5])
    v0 = dyadic(3, 5, 9, 11, generator=g, spread=0.5)
    for detach in (False, True):
        compare_with_reference(op, backend, x, theta, torch.tensor(0.5) if op == "mprn" else None,
                               v0=v0, device="cuda", surrogate=surrogate, detach_reset=detach)
    compare_with_reference(op, backend, dyadic(1 if op == "if" else 2, 4097, generator=g), 1.0,
                           1.0 if op == "mprn" else None, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        compare_with_reference(op, backend, dyadic(4, 2, 3, 5, generator=g, scale=8, spread=1.0)
                               .to(dtype), 1.0, 0.5 if op == "mprn" else None, device="cuda",
                               tol=(2e-2, 2e-2))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="no CUDA GPU / fused GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED or ["cuda"])
def test_gpu_int64_offsets(backend):
    """T * M > 2^31: the last neurons' results match the reference on a slice."""
    free = torch.cuda.mem_get_info()[0]
    T, M = 3, (1 << 31) // 3 + 4099
    if free < 6 * 4 * T * M:
        pytest.skip("not enough GPU memory")
    x = torch.empty(T, M, device="cuda").uniform_(-0.5, 1.5)
    x = (x * 16).round() / 16
    xr = x.requires_grad_()
    y, v = ops.if_multistep(xr, 0.75, backend=backend)
    gy = torch.ones_like(y)
    (gx,) = torch.autograd.grad(y, xr, gy)
    tail = slice(M - 4099, M)
    yr, vr = ops.if_multistep(x[:, tail].detach().double(), 0.75, backend="torch")
    assert torch.equal(y[:, tail].double(), yr) and torch.equal(v[tail].double(), vr)
    xt = x[:, tail].detach().double().requires_grad_()
    yt, _ = ops.if_multistep(xt, 0.75, backend="torch")
    (gxt,) = torch.autograd.grad(yt, xt, torch.ones_like(yt))
    assert_close(gx[:, tail], gxt, 1e-5, 1e-4, "grad_x tail")


def _forward_backward(op, backend, seed, shape=(3, 2, 4, 5, 6)):
    """y, v_final and every gradient (x, theta, beta, v0) of one per-channel call."""
    g = torch.Generator().manual_seed(seed)
    C = shape[2]
    x = torch.randn(shape, generator=g).requires_grad_()
    theta = (torch.rand(C, generator=g) + 0.5).requires_grad_()
    beta = (torch.rand(C, generator=g) + 0.5).requires_grad_()
    v0 = (torch.rand(shape[1:], generator=g) * 0.3).requires_grad_()
    y, v = run(op, backend, x, theta, beta if op == "mprn" else None, v0=v0)
    loss_of(y, v, g).backward()
    out = [y.detach(), v.detach(), x.grad, theta.grad, v0.grad]
    return out + ([beta.grad] if op == "mprn" else [])


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_fused_ops_run_in_several_threads_at_once(backend):
    """Python threads calling a fused op at once, each on its own input, get what a
    single thread gets. Triton's interpreter is not thread-safe (it patches
    triton.language during a launch): concurrent launches failed with "Did you
    forget to add @triton.jit?" until spikingir serialised them."""
    import threading

    seeds = range(3)
    ref = {k: _forward_backward("mprn", backend, k) for k in seeds}
    got, errors = {}, []

    def work(k):
        try:
            got[k] = [_forward_backward("mprn", backend, k) for _ in range(2)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(k,)) for k in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in seeds:
        for outs in got[k]:
            assert all(torch.equal(a, b) for a, b in zip(outs, ref[k])), f"thread {k}"


@pytest.mark.skipif(not backends.HAS_CPP_OPS, reason="the C++ extension is not built")
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_cpp_results_do_not_depend_on_the_thread_count(op):
    """Every output and gradient of the cpp neurons is bitwise the same on 1, 2 and 3
    threads: each neuron is simulated by one task, and the per-channel sums of
    grad_theta / grad_beta run in a fixed order (channel_sum). 2 x 12 x 9 x 10 neurons
    per step: several kChunk = 1024 neuron tasks."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_forward_backward(op, "cpp", 4, shape=(4, 2, 12, 9, 10)))
    finally:
        torch.set_num_threads(threads)
    names = ["y", "v_final", "grad_x", "grad_theta", "grad_v0", "grad_beta"]
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            assert torch.equal(a, b), name


@pytest.mark.skipif(not backends.HAS_CPP_OPS, reason="the C++ extension is not built")
@pytest.mark.skipif("parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch does not use OpenMP here")
def test_cpp_kernels_are_compiled_with_openmp():
    # at::parallel_for is a header template: built without the OpenMP flag it
    # runs every CPU kernel (neuron and spike_conv2d) on one thread, silently.
    from spikingir import _C
    assert _C.openmp == 1


# ---------------------------------------------------------------------------
# emit="masks": the spikes as channel bit masks (inference only).
# ---------------------------------------------------------------------------

def _masks_vs_values(op, backend, x, theta, beta=None, **kw):
    """emit="masks" gives the spikes of emit="values" (scale_output=False) bit for
    bit, and the same v_final; the reference backend's values for "torch"."""
    with torch.no_grad():
        y, v = run(op, backend, x, theta, beta, scale_output=False, **kw)
        m, vm = run(op, backend, x, theta, beta, emit="masks", **kw)
    assert isinstance(m, ops.SpikeMasks) and m.shape == x.shape
    assert m.bits.shape == (*x.shape[:2], *x.shape[3:], (x.shape[2] + 63) // 64)
    assert torch.equal(m.to_dense(y.dtype), y), "masks differ from the values path"
    assert torch.equal(vm, v.float())
    return m


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 3, 5), (4, 1, 5, 7, 9), (3, 2, 64, 5, 6),
                                   (2, 1, 70, 3, 11), (3, 1, 130, 2, 3)])
def test_masks_match_values(backend, op, shape):
    if op == "mprn" and shape[0] == 1:
        shape = (2,) + shape[1:]
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 0.8 + 0.7
    C = shape[2]
    theta = torch.rand(C, generator=g) + 0.4
    beta = torch.rand(C, generator=g) + 0.2
    v0 = torch.randn(shape[1:], generator=g) * 0.3
    m = _masks_vs_values(op, backend, x, theta, beta, v0=v0)
    assert 0 < m.count() < x.numel()
    _masks_vs_values(op, backend, x, 0.7, 0.5 if op == "mprn" else None)  # scalar parameters


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="needs the C++ kernels")
@pytest.mark.parametrize("shape", [(3, 2, 3, 17, 19), (2, 1, 70, 20, 27), (5, 1, 1, 16, 33)])
def test_masks_over_several_pixel_tiles(shape):
    """The cpp kernel walks 256-pixel tiles and prefetches the input of the
    channel 4 ahead (of the next step past the last channel): images of several
    tiles with a partial last one, fewer channels than that distance, two mask
    words, give the values path's spikes and v_final bit for bit."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 0.8 + 0.7
    theta = torch.rand(shape[2], generator=g) + 0.4
    v0 = torch.randn(shape[1:], generator=g) * 0.3
    for op in ("if", "mprn"):
        m = _masks_vs_values(op, "cpp", x, theta, theta * 0.6, v0=v0)
        assert 0 < m.count() < x.numel()
    m = _masks_vs_values("mprn", "cpp", x[:1].expand(shape), theta, 0.5)  # one input, all steps
    assert 0 < m.count() < x.numel()


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_masks_noncontiguous_and_half(backend):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 3, 9, 7, generator=g) + 0.4).transpose(0, 1)  # [5, 2, 3, 9, 7]
    assert not x.is_contiguous()
    _masks_vs_values("mprn", backend, x, torch.tensor([0.5, 0.9, 1.3]), 0.4)
    _masks_vs_values("if", backend, x.to(torch.float16), 0.6)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_masks_of_an_input_constant_over_time(backend):
    """x expanded over the steps (stride 0, a first layer's image current) is read
    from one copy: the same spikes as the materialised input."""
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(1, 2, 70, 5, 6, generator=g) * 0.5 + 0.4
    theta = torch.rand(70, generator=g) + 0.3
    with torch.no_grad():
        m, v = ops.mprn_multistep(x1.expand(6, -1, -1, -1, -1), theta, 0.5, emit="masks",
                                  backend=backend)
        ref, vr = ops.mprn_multistep(x1.expand(6, -1, -1, -1, -1).contiguous(), theta, 0.5,
                                     scale_output=False, backend=backend)
    assert torch.equal(m.to_dense(), ref) and torch.equal(v, vr)
    assert len(m.shape) == 5 and m.shape[0] == 6


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_masks_with_a_per_channel_v0(backend):
    """v0 expanded from one value per channel (v_init="half") is read per channel,
    not materialised: the same spikes and v_final as the materialised v0."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 2, 70, 5, 6, generator=g) * 0.5 + 0.4
    theta = torch.rand(70, generator=g) + 0.3
    v0 = (theta / 2).reshape(-1, 1, 1).expand(x.shape[1:])
    with torch.no_grad():
        m, v = ops.mprn_multistep(x, theta, 0.5, v0=v0, emit="masks", backend=backend)
        mr, vr = ops.mprn_multistep(x, theta, 0.5, v0=v0.contiguous(), emit="masks",
                                    backend=backend)
    assert torch.equal(m.bits, mr.bits) and torch.equal(v, vr)


def test_masks_bad_input():
    x = torch.randn(3, 2, 4, 5, 5)
    with pytest.raises(ValueError, match="emit: expected 'values' or 'masks'"):
        ops.if_multistep(x, 1.0, emit="bits")
    with pytest.raises(ValueError, match=r"emit='masks' takes \[T, N, C, H, W\]"):
        ops.if_multistep(x[:, 0], 1.0, emit="masks")
    with pytest.raises(ValueError, match="emit='masks' is for inference"):
        ops.if_multistep(x.requires_grad_(), 1.0, emit="masks")
    theta = torch.ones(4, requires_grad=True)
    with pytest.raises(ValueError, match="no_grad"):
        ops.mprn_multistep(x.detach(), theta, 1.0, emit="masks")
    with torch.no_grad():  # fine without autograd
        ops.mprn_multistep(x.detach(), theta, 1.0, emit="masks")


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
def test_triton_masks_refuse_more_channels_than_a_grid_axis_holds():
    """The Triton kernel's mask words are grid axis 1, at most 65535 programs on CUDA:
    more than 64 x 65535 channels get a clear error before any launch (not a failed one)."""
    C = 64 * 65535 + 1
    x = torch.zeros(1, 1, C, 1, 1)  # 16 MB
    with torch.no_grad(), pytest.raises(RuntimeError,
                                        match=f"at most {64 * 65535} channels .*got {C}"):
        ops.if_multistep(x, 1.0, emit="masks", backend="triton")


def _mask_op_samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 70, 3, 5, generator=g)
    th = torch.rand(70, generator=g) + 0.3
    v0 = torch.randn(2, 70, 3, 5, generator=g)
    return [(x, th, None, 0.75, False, 3), (x, th, v0, 0.75, True, 3),
            (x, th[:1], None, 0.9, True, 3), (x[:1], th, v0, 0.75, True, 4),
            (x, th, th / 2, 0.75, True, 3)]


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_opcheck_masks(backend):
    name = "neuron_fwd_masks" + ("_triton" if backend == "triton" else "")
    for args in _mask_op_samples():
        torch.library.opcheck(getattr(torch.ops.spikingir, name).default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_gpu_masks_match_values(backend, op):
    g = torch.Generator().manual_seed(5)
    for C in (3, 64, 70):
        x = (torch.randn(4, 2, C, 17, 13, generator=g) + 0.3).cuda()
        theta = (torch.rand(C, generator=g) + 0.4).cuda()
        _masks_vs_values(op, backend, x, theta, 0.5 if op == "mprn" else None,
                         v0=torch.zeros(x.shape[1:], device="cuda"))


def test_validate_false_skips_value_checks():
    """validate=False: the caller vouches for the parameter values (the modules
    check their own parameters); shapes and types are still checked."""
    x = torch.randn(4, 2, 3)
    bad = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="theta: expected finite positive"):
        ops.if_multistep(x, bad)
    ops.if_multistep(x, bad, validate=False)
    with pytest.raises(ValueError, match="theta: expected a float, a 0-d tensor"):
        ops.if_multistep(x, torch.ones(5), validate=False)


@pytest.mark.parametrize("cls", [IFNeuron, MPRNeuron])
def test_module_checks_its_parameters(cls):
    """The modules check theta, beta and theta_floor themselves (the op gets the
    derived max(theta, theta_floor)): a non-finite value after an update is a
    clear error, whichever parameter it is in."""
    x = torch.randn(4, 2, 3, 5)
    for name in ("theta", "theta_floor") + (("beta",) if cls is MPRNeuron else ()):
        n = cls(1.0, num_channels=3)
        n(x)
        with torch.no_grad():
            getattr(n, name)[1] = float("inf") if name != "theta_floor" else 0.0
        with pytest.raises(ValueError, match=name):
            n(x)
    with pytest.raises(ValueError, match="alpha: expected a finite positive"):
        cls(1.0, alpha=-2.0)(x)


RAW_A = (0, 0.75, False, True, False)  # surrogate, reuse_alpha, reuse_step, scale_output, detach_reset


def _raw_neuron_calls(sfx):
    o = torch.ops.spikingir
    fwd, bwd, masks = (getattr(o, f"neuron_{k}{sfx}") for k in ("fwd", "bwd", "fwd_masks"))
    e, th = torch.ones(0), torch.ones(4)
    return [
        ("empty theta", lambda: fwd(torch.ones(2, 4), e, e, None, e, *RAW_A, 1, 4)),
        ("empty theta (bwd)", lambda: bwd(torch.ones(2, 4), None, torch.zeros(2, 4), e, e, e,
                                          *RAW_A, 1, True, False)),
        ("C x inner overflow", lambda: bwd(torch.ones(2, 4), None, torch.zeros(2, 4), th, th, th,
                                           *RAW_A, 2 ** 62, True, False)),
        ("M not a multiple of C x inner", lambda: bwd(torch.ones(1, 5), None, torch.zeros(1, 5),
                                                      torch.ones(1), torch.ones(1), torch.ones(1),
                                                      *RAW_A, 3, True, False)),
        ("short v0", lambda: fwd(torch.ones(2, 64), th, th, torch.zeros(1), th, *RAW_A, 1, 4)),
        ("masks: theta of another length", lambda: masks(torch.zeros(1, 1, 3, 4, 4), torch.ones(2),
                                                         None, 0.75, False, 1)),
        ("masks: more steps than x", lambda: masks(torch.zeros(2, 1, 3, 4, 4), torch.ones(3),
                                                   None, 0.75, False, 50)),
    ]


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_raw_ops_refuse_inconsistent_arguments(backend):
    """The ops themselves (torch.ops.spikingir.*, what torch.compile traces) check
    what their kernels trust: these calls used to crash (SIGFPE, SIGSEGV), read out
    of bounds or return wrong sums."""
    for what, call in _raw_neuron_calls("_triton" if backend == "triton" else ""):
        with pytest.raises(RuntimeError):
            call()
            pytest.fail(what)
    # a meta tensor among CPU ones: an error, not uninitialised CPU memory
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.spikingir.neuron_fwd(torch.ones(2, 4), torch.ones(4), torch.ones(4),
                                       torch.zeros(4, device="meta"), torch.ones(4), *RAW_A, 1, 4)


@pytest.mark.parametrize("cls", [IFNeuron, MPRNeuron])
def test_module_construction_checks(cls):
    """Thresholds are checked when the module is built; a per-channel tensor of
    thresholds sets num_channels; a stateful neuron fed a new shape says reset()."""
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="theta: expected finite positive"):
            cls(bad)
    with pytest.raises(ValueError, match=r"theta: expected .* shape \(4,\).*got shape \(3,\)"):
        cls(torch.ones(3), num_channels=4)
    n = cls(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    assert n.num_channels == 4 and n.theta.shape == (4,)
    assert n(torch.randn(3, 2, 4, 5)).shape == (3, 2, 4, 5)
    stateful = cls(1.0, stateful=True)
    stateful(torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="call reset"):
        stateful(torch.randn(3, 5, 4))
    stateful.reset()
    assert stateful(torch.randn(3, 5, 4)).shape == (3, 5, 4)
    # options the op would refuse at the first forward are refused when built
    for kwargs, exc, match in (
            (dict(surrogate="foo"), ValueError, "surrogate: expected one of"),
            (dict(backend="gpu"), ValueError, "backend: expected one of"),
            (dict(backend=None), ValueError, "backend: expected one of"),
            (dict(num_channels=0), ValueError, "num_channels: expected None or an int >= 1"),
            (dict(scale_output=None), TypeError, "scale_output: expected True or False"),
            (dict(detach_reset="yes"), TypeError, "detach_reset: expected True or False"),
            (dict(stateful=1), TypeError, "stateful: expected True or False"),
            (dict(save_dtype=torch.float16), ValueError, "save_dtype")):
        with pytest.raises(exc, match=match):
            cls(1.0, **kwargs)
    if cls is MPRNeuron:
        for bad in (2.0, 0.5, True):
            with pytest.raises(ValueError, match=r"reuse_alpha: expected a float in \(0.5, 1\]"):
                cls(1.0, reuse_alpha=bad)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_unused_beta_gets_no_gradient(backend):
    """beta acts only through the reuse step's scaled output: with
    scale_output=False it gets None, on every backend, as autograd of the
    reference gives; zeros would still be decayed by AdamW. The op refuses a
    non-bool flag at its boundary and takes a numpy bool."""
    x = torch.randn(4, 2, 3, 5)
    theta = torch.full((3,), 0.7, requires_grad=True)
    beta = torch.full((3,), 0.4, requires_grad=True)
    y, v = ops.mprn_multistep(x, theta, beta, scale_output=False, backend=backend)
    (y.sum() + v.sum()).backward()
    assert beta.grad is None and theta.grad is not None
    y, v = ops.mprn_multistep(x, theta, beta, backend=backend)
    (y.sum() + v.sum()).backward()
    assert beta.grad is not None and beta.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="detach_reset: expected True or False"):
        ops.if_multistep(x, theta, detach_reset="yes", backend=backend)
    y_np, _ = ops.if_multistep(x, theta, scale_output=np.False_, backend=backend)
    assert torch.equal(y_np, ops.if_multistep(x, theta, scale_output=False, backend=backend)[0])


def test_module_copies_after_a_forward_with_grad():
    """v_final is in the forward's graph: deepcopy and pickle still work (the copy
    holds it detached)."""
    import copy
    import pickle
    n = MPRNeuron(0.7, num_channels=3)
    x = torch.randn(4, 2, 3, 5, requires_grad=True)
    n(x)
    assert n.v_final.grad_fn is not None  # the original keeps its graph (recycling)
    for twin in (copy.deepcopy(n), pickle.loads(pickle.dumps(n))):
        assert torch.equal(twin.v_final, n.v_final) and not twin.v_final.requires_grad
        assert torch.equal(twin(x.detach()), n(x.detach()))


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_double_backward_is_an_error(backend, op):
    """The fused backward is first order only: differentiating a gradient taken with
    create_graph=True raises instead of treating it as a constant (zero)."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    theta = torch.tensor(0.5, requires_grad=True)
    w = torch.randn(4, 3, 5)
    y, _ = run(op, backend, x, theta, 0.5 if op == "mprn" else None, surrogate="atan")
    g, = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad((g * w).sum(), theta)
    # first-order gradients under create_graph are unaffected
    y_ref, _ = run(op, "torch", x, theta, 0.5 if op == "mprn" else None, surrogate="atan")
    g_ref, = torch.autograd.grad((y_ref * w).sum(), x)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["if", "mprn"])
def test_reference_under_torch_func(op):
    """The reference runs under torch.func: grad and jacrev give autograd's gradients,
    jacfwd (forward mode) the same straight-through derivative, vmap the per-sample
    results (its surrogate autograd.Function lacked setup_context: every transform
    raised)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, generator=g)
    theta = torch.tensor([0.5, 0.7], dtype=torch.float64)

    def outputs(theta, x):
        y, v = run(op, "torch", x, theta, 1.2 * theta, surrogate="atan")
        return torch.cat([y.flatten(), v.flatten()])
    jac = torch.autograd.functional.jacobian(outputs, (theta, x))
    for argnum in (0, 1):
        for transform in (torch.func.jacrev, torch.func.jacfwd):
            assert_close(transform(outputs, argnums=argnum)(theta, x), jac[argnum], 1e-12, 1e-12,
                         transform.__name__)
    gx = torch.func.grad(lambda x: outputs(theta, x).sum())(x)
    assert_close(gx, jac[1].sum(0), 1e-12, 1e-12, "grad")
    batched = torch.func.vmap(lambda x: outputs(theta, x))(torch.stack([x, -x]))
    assert torch.equal(batched, torch.stack([outputs(theta, x), outputs(theta, -x)]))


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_fused_refuses_other_autodiff_with_a_clear_error(backend, op):
    """The fused ops have reverse-mode gradients only: forward-mode AD dropped the
    tangent silently (a zero derivative) and torch.func.grad failed deep in torch;
    both now raise saying what works. vmap, and grad of what does not flow through
    the op, still work."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(3, 2, 4)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD .* backend='torch'"):
            run(op, backend, dual, 0.5, 0.5)
    with pytest.raises(RuntimeError, match="torch.func.grad .* backend='torch'"):
        torch.func.grad(lambda t: run(op, backend, x, t, 0.5)[0].sum())(torch.tensor(0.5))
    w = torch.randn(2, 4)
    gw = torch.func.grad(lambda w: (run(op, backend, x, 0.5, 0.5)[0] * w).sum())(w)
    assert torch.equal(gw, run(op, "torch", x, 0.5, 0.5)[0].sum(0))
    batched = torch.func.vmap(lambda x: run(op, backend, x, 0.5, 0.5)[0])(torch.stack([x, -x]))
    assert torch.equal(batched[1], run(op, "torch", -x, 0.5, 0.5)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("emit", ["values", "masks"])
def test_gpu_no_sync_per_call(backend, emit):
    """A GPU parameter tensor's values are checked when first seen and after each
    in-place change, not on every call: later calls never synchronise the host with
    the GPU (torch's sync debug mode raises if one does); scalars are filled on the
    device."""
    x = torch.randn(4, 2, 3, 5, 6, device="cuda")
    theta = torch.rand(3, device="cuda") + 0.5
    beta = torch.rand(3, device="cuda") + 0.2
    with torch.no_grad():
        ops.mprn_multistep(x, theta, beta, backend=backend, emit=emit)  # first sight: checked
        ops.if_multistep(x, 0.75, backend=backend, emit=emit)  # (and kernels compiled)
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.mprn_multistep(x, theta, beta, backend=backend, emit=emit)
            ops.if_multistep(x, 0.75, backend=backend, emit=emit)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        theta.fill_(-1.0)  # an in-place change: checked again
        with pytest.raises(ValueError, match="theta: expected finite positive"):
            ops.mprn_multistep(x, theta, beta, backend=backend, emit=emit)


# ---------------------------------------------------------------------------
# Channels-last inputs (what a channels-last convolution returns).
# ---------------------------------------------------------------------------

def _channels_last(t):
    """The same values with the channel axis (dim -3) innermost in memory."""
    perm = (*range(t.dim() - 3), t.dim() - 2, t.dim() - 1, t.dim() - 3)
    inv = tuple(perm.index(d) for d in range(t.dim()))
    return t.permute(perm).contiguous().permute(inv)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
@pytest.mark.parametrize("op", ["if", "mprn"])
def test_channels_last_input(backend, op):
    """Same outputs and gradients as the contiguous input; the fused kernels run on
    the channels-last memory as it is (y comes back channels last: no copy)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 6, 5, 7, generator=g) + 0.3
    theta = (torch.rand(6, generator=g) + 0.5).requires_grad_()
    beta = (torch.rand(6, generator=g) + 0.2).requires_grad_() if op == "mprn" else None
    v0 = torch.randn(2, 6, 5, 7, generator=g) * 0.2
    xc = _channels_last(x)
    assert not xc.is_contiguous() and torch.equal(xc, x)
    results = []
    for inp, v in ((x, v0), (xc, _channels_last(v0))):
        xr = inp.detach().clone().requires_grad_() if inp is x else inp.requires_grad_()
        y, vf = run(op, backend, xr, theta, beta, v0=v)
        params = [xr, theta] + ([beta] if beta is not None else [])
        grads = torch.autograd.grad(loss_of(y, vf, torch.Generator().manual_seed(1)), params)
        results.append((y, vf, grads))
    (y, vf, grads), (yc, vfc, gradsc) = results
    assert torch.equal(yc, y) and torch.equal(vfc, vf)
    for a, b in zip(grads, gradsc):
        assert_close(b, a, 1e-5, 1e-5, "grad")
    if backend != "torch":
        assert yc.permute(0, 1, 3, 4, 2).is_contiguous()  # channels last, as it came


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_channels_last_expanded_over_time(backend):
    """A first layer's current: one channels-last step expanded over T."""
    x1 = _channels_last(torch.randn(1, 2, 6, 5, 7, generator=torch.Generator().manual_seed(2)))
    theta = torch.rand(6, generator=torch.Generator().manual_seed(3)) + 0.3
    y, v = ops.mprn_multistep(x1.expand(5, -1, -1, -1, -1), theta, 0.4, backend=backend)
    ref, vr = ops.mprn_multistep(x1.expand(5, -1, -1, -1, -1).contiguous(), theta, 0.4,
                                 backend=backend)
    assert torch.equal(y, ref) and torch.equal(v, vr)
