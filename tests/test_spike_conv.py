"""Tests of spike_conv2d (every backend) against float64 F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

from spikingir import ops
from spikingir.nn import IFNeuron, SeqToBatch, SpikeConv2d
from spikingir.ops import backends
from spikingir.ops.reference import spike_conv2d_reference

from helpers import assert_close, ran_ops

OP = "spike_conv2d"
CPU_FUSED = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu", op=OP)]
GPU = torch.cuda.is_available()
GPU_FUSED = [b for b in ("cuda", "triton") if GPU and b in ops.available_backends("cuda", op=OP)]
EPS32 = torch.finfo(torch.float32).eps
#: The Triton kernels on the CPU (interpreter) and on the GPU (marked gpu).
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif("triton" not in CPU_FUSED,
                                                 reason="Triton interpreter not available")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        "triton" not in GPU_FUSED, reason="no CUDA device with triton")])]


def spikes(*shape, rate, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < rate).to(dtype).to(device)


def conv_params(cout, cin, k, seed=1, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    return w.to(device), (b.to(device) if bias else None)


def check_conv(out, s, w, b, stride, padding, name="out", fixed_point=False):
    """out equals float64 F.conv2d to float32 rounding: per value, within a few
    float32 ulps of the sum of |terms| (the bound of any float32 summation order),
    and no worse than 4x torch's own float32 convolution plus that slack.

    fixed_point (the Triton kernel): each weight is exact to one float32 ulp of
    its output channel's largest weight (a per-channel 23-bit fixed point), so
    each active term may add 2^-23 max|w[co]| more."""
    ref = spike_conv2d_reference(s.double(), w.double(), None if b is None else b.double(),
                                 stride, padding)
    mag = spike_conv2d_reference(s.double(), w.double().abs(),
                                 None if b is None else b.double().abs(), stride, padding)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    err = (out.double().cpu() - ref.cpu()).abs()
    bound = (2 + k ** 0.5) * EPS32 * mag.cpu() + 1e-30
    if fixed_point:
        terms = spike_conv2d_reference(s.double(), torch.ones_like(w, dtype=torch.float64), None,
                                       stride, padding).cpu()
        wmax = w.double().abs().amax(dim=(1, 2, 3)).cpu()[None, :, None, None]
        bound = bound + terms * wmax * 2.0 ** -23
    if bool((err > bound).any()):
        assert_close(out, ref, 0, 0, name)  # prints the worst values
    torch_err = (F.conv2d(s.float(), w.float(), None if b is None else b.float(), stride,
                          padding).double().cpu() - ref.cpu()).abs().max().item()
    slack = 4 * EPS32 * mag.max().item() + (float(bound.max()) if fixed_point else 0.0)
    assert err.max().item() <= 4 * torch_err + slack, name


# ---------------------------------------------------------------------------
# Forward against the float64 reference.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_matches_reference_rates(backend, rate):
    s = spikes(2, 19, 13, 11, rate=rate)  # cpp: 19 input channels take the event path
    w, b = conv_params(5, 19, 3)
    out = ops.spike_conv2d(s, w, b, 1, 1, backend=backend)
    assert out.dtype == torch.float32
    check_conv(out, s, w, b, 1, 1, fixed_point=backend == "triton")


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1),
                                              (3, 2, 0), (5, 1, 2), (5, 2, 2), (7, 1, 3),
                                              (7, 2, 3), (3, 1, 4), (7, 1, 0)])
def test_kernel_sizes_strides_padding(backend, k, stride, padding):
    s = spikes(1, 3, 12, 9, rate=0.3, seed=k + stride)  # batch 1, odd width
    w, b = conv_params(4, 3, k)
    out = ops.spike_conv2d(s, w, b, stride, padding, backend=backend)
    check_conv(out, s, w, b, stride, padding, fixed_point=backend == "triton")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_wide_channels_and_no_bias(backend):
    """More channels than one K block (triton: BLOCK_K = 32) and Cout > BLOCK_N."""
    s = spikes(2, 40, 9, 10, rate=0.2, seed=3)
    w, _ = conv_params(70, 40, 3, bias=False)
    out = ops.spike_conv2d(s, w, None, 1, 1, backend=backend)
    check_conv(out, s, w, None, 1, 1, fixed_point=backend == "triton")


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("rate", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("dense_rate", [-1.0, 2.0])
def test_cpp_event_and_dense_paths(rate, dense_rate):
    """dense_rate -1: always oneDNN; 2: always event-driven, at any firing rate."""
    s = spikes(3, 6, 10, 17, rate=rate, seed=4)
    w, b = conv_params(9, 6, 3)
    for stride in (1, 2):
        out, packed = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, stride, 1, dense_rate, True,
                                                           True)
        check_conv(out, s, w, b, stride, 1)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 6, 10, 3)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("dense_rate", [-1.0, 2.0])
def test_cpp_more_than_64_input_channels(dense_rate):
    """Cin = 130: three 64-bit channel-mask words per pixel (event path) and the
    weight gradient over them; both paths against float64."""
    s = spikes(2, 130, 7, 9, rate=0.1, seed=9)
    w, b = conv_params(12, 130, 3)
    out, packed = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, 1, 1, dense_rate, True, True)
    check_conv(out, s, w, b, 1, 1)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    _, gw, _ = torch.ops.spikingir.spike_conv2d_bwd(go, packed, w, 7, 9, 1, 1, dense_rate,
                                                    False, True, False)
    wd = w.double().requires_grad_()
    F.conv2d(s.double(), wd, b.double(), 1, 1).backward(go.double())
    assert_close(gw, wd.grad, 1e-4, 1e-5, "grad_weight")


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("masks", [False, True])
def test_cpp_event_path_adds_the_bias_last(masks):
    """Found by a randomized differential run: 127 -> 31 channels, 7x7 kernel,
    padding 7 on a 3-row image at 5 % firing (~300 terms per output value).
    Summed from the bias, every add rounded at the bias's magnitude: 16x
    oneDNN's error there, beyond check_conv's bound. The event path (taken at
    this rate, from floats and from masks) now adds the bias after the spikes."""
    s = spikes(2, 127, 3, 17, rate=0.05, seed=3)
    w, b = conv_params(31, 127, 7, seed=4)
    x = ops.SpikeMasks.from_dense(s) if masks else s
    with torch.no_grad():
        out = ops.spike_conv2d(x, w, b, 1, 7, backend="cpp")
        no_bias = ops.spike_conv2d(x, w, None, 1, 7, backend="cpp")
    check_conv(out, s, w, b, 1, 7)
    assert torch.equal(out, no_bias + b[None, :, None, None])  # the bias added last


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 2, 1), (3, 2, 0),
                                              (5, 1, 2), (5, 2, 2), (7, 1, 3), (7, 2, 3),
                                              (3, 1, 4), (7, 1, 0), (7, 2, 5)])
def test_cpp_event_path_geometry(k, stride, padding):
    """The event-driven path (dense_rate 2) at every kernel size, stride and padding:
    output widths with and without a tail of the 8 x 8 transposes, Cout 19
    (two full groups of 8 and a tail), a tap range that is empty for some kx."""
    s = spikes(2, 6, 13, 21, rate=0.3, seed=k + 3 * stride + padding)
    w, b = conv_params(19, 6, k)
    out, _ = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, stride, padding, 2.0, True, False)
    check_conv(out, s, w, b, stride, padding)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("cout", [8, 16, 19, 48, 64, 72, 80])
def test_cpp_instruction_sets_agree_bitwise(cout, monkeypatch):
    """The event-driven kernels' AVX-512, AVX2 and scalar versions (capped by
    SPIKINGIR_CPU_ISA; on a CPU without AVX-512 the first two are the same code)
    give the same forward (float spikes and channel masks) and weight gradient
    bit for bit: every output value is the same sequence of float additions.
    Cout 72 and 80: a 64-channel block and an 8- / 16-channel one; 8 and 19:
    no 16-channel vector fits (AVX2 kernels then)."""
    s = spikes(2, 70, 11, 23, rate=0.2, seed=cout)
    w, b = conv_params(cout, 70, 3, seed=cout + 1)
    go = torch.randn(2, cout, 11, 23, generator=torch.Generator().manual_seed(5))
    masks, _ = ops.if_multistep(s[None] * 2.0, torch.tensor(1.0), emit="masks")
    results = {}
    for isa in ("native", "avx2", "generic"):
        if isa == "native":
            monkeypatch.delenv("SPIKINGIR_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("SPIKINGIR_CPU_ISA", isa)
        out, packed = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, 1, 1, 2.0, False, True)
        from_masks = ops.spike_conv2d(masks.flatten(0, 1), w, b, 1, 1, backend="cpp")
        _, gw, _ = torch.ops.spikingir.spike_conv2d_bwd(go, packed, w, 11, 23, 1, 1, 2.0,
                                                        False, True, False)
        results[isa] = (out, from_masks, gw)
    check_conv(results["native"][0], s, w, b, 1, 1)
    for isa in ("avx2", "generic"):
        for name, a, c in zip(("forward", "from masks", "grad_weight"), results["native"],
                              results[isa]):
            assert torch.equal(a, c), (isa, name, (a - c).abs().max().item())


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_event_path_reads_spikes_in_blocks_of_rows(threads):
    """The forward's first pass reads blocks of up to 16 input rows of an image
    (height 37: blocks of 16 rows on one thread, 13 on two, the last one
    shorter): the saved bits (bit b of byte j = pixel 8 j + b) and the forward
    are those of the whole input, and a value that is not 0 or 1 in the last
    row of the last block is still refused."""
    s = spikes(3, 70, 37, 21, rate=0.2, seed=4)
    w, b = conv_params(9, 70, 3, seed=5)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, packed = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, 1, 1, 2.0, False, True)
        bad = s.clone()
        bad[-1, -1, -1, -1] = 0.5
        with pytest.raises(ValueError, match="binary"):
            torch.ops.spikingir.spike_conv2d_fwd(bad, w, b, 1, 1, 2.0, False, False)
    finally:
        torch.set_num_threads(old)
    check_conv(out, s, w, b, 1, 1)
    bits = F.pad(s, (0, 3)).unflatten(-1, (3, 8)).to(torch.uint8) << torch.arange(8)
    assert torch.equal(packed, bits.sum(-1).to(torch.uint8))


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_spikes(backend, dtype):
    s = spikes(2, 5, 9, 8, rate=0.2, dtype=dtype)
    w, b = conv_params(4, 5, 3)
    out = ops.spike_conv2d(s, w, b, 1, 1, backend=backend)  # float32 weights: float32 out
    assert out.dtype == torch.float32
    check_conv(out, s, w, b, 1, 1, fixed_point=backend == "triton")
    out_h = ops.spike_conv2d(s, w.to(dtype), b.to(dtype), 1, 1, backend=backend)
    assert out_h.dtype == dtype
    ref = spike_conv2d_reference(s.double(), w.to(dtype).double(), b.to(dtype).double(), 1, 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(out_h, ref, tol, tol, "half out")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_noncontiguous_spikes(backend):
    s = spikes(2, 4, 11, 9, rate=0.3).transpose(2, 3)  # [2, 4, 9, 11] non-contiguous
    w, b = conv_params(3, 4, 3)
    check_conv(ops.spike_conv2d(s, w, b, 1, 1, backend=backend), s, w, b, 1, 1,
               fixed_point=backend == "triton")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_deterministic(backend):
    """Bitwise equal run to run (cpp: also with 1 and 2 threads)."""
    shape = (4, 16, 24, 24) if backend == "cpp" else (1, 8, 10, 12)
    s = spikes(*shape, rate=0.1, seed=5)
    w, b = conv_params(16, shape[1], 3)
    first = ops.spike_conv2d(s, w, b, 1, 1, backend=backend)
    assert torch.equal(first, ops.spike_conv2d(s, w, b, 1, 1, backend=backend))
    if backend == "cpp":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, ops.spike_conv2d(s, w, b, 1, 1, backend=backend))
        finally:
            torch.set_num_threads(threads)
        sw = s.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        gs = []
        for _ in range(2):
            sw.grad = wr.grad = None
            ops.spike_conv2d(sw, wr, b, 1, 1, backend=backend).square().sum().backward()
            gs.append((sw.grad.clone(), wr.grad.clone()))
        assert torch.equal(gs[0][0], gs[1][0]) and torch.equal(gs[0][1], gs[1][1])


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="the C++ extension is not built")
@pytest.mark.parametrize("rate", [0.1, 0.9])
def test_cpp_results_do_not_depend_on_the_thread_count(rate):
    """What the docstring promises across thread counts: the forward (event path at
    10 %, oneDNN's dense path at 90 %; from float spikes and from SpikeMasks) and,
    up to 25 % firing, the event kernel's weight gradient are bitwise the same on
    1, 2 and 3 threads. (grad_s and the dense weight gradient are oneDNN's, which
    may differ in the last bits between thread counts.)"""
    s = spikes(6, 24, 16, 16, rate=rate, seed=8)
    w, b = conv_params(32, 24, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            wr = w.clone().requires_grad_()
            y = ops.spike_conv2d(s, wr, b, 1, 1, backend="cpp")
            y.square().sum().backward()
            with torch.no_grad():
                ym = ops.spike_conv2d(ops.SpikeMasks.from_dense(s), w, b, 1, 1, backend="cpp")
            results.append((y.detach(), ym, wr.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        if rate <= 0.25:
            assert torch.equal(results[0][2], other[2])


# ---------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------

def compare_grads(backend, s, w, b, stride, padding, need=(True, True, True), device="cpu"):
    g = torch.Generator().manual_seed(7)
    outs = {}
    for name, dtype, be in (("fused", torch.float32, backend), ("ref", torch.float64, "torch")):
        ss = s.detach().to(device=device, dtype=dtype).requires_grad_(need[0])
        ww = w.detach().to(device=device, dtype=dtype).requires_grad_(need[1])
        bb = None if b is None else b.detach().to(device=device, dtype=dtype).requires_grad_(need[2])
        out = ops.spike_conv2d(ss, ww, bb, stride, padding, backend=be)
        wy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
        (out.double() * wy).sum().backward()
        g = torch.Generator().manual_seed(7)
        outs[name] = (ss.grad, ww.grad, None if bb is None else bb.grad)
    for i, key in enumerate(("grad_s", "grad_weight", "grad_bias")):
        f, r = outs["fused"][i], outs["ref"][i]
        if not need[i] or r is None:
            assert f is None, key
            continue
        assert f.dtype == torch.float32 and f.shape == r.shape, key
        scale = r.abs().max().item() + 1.0
        assert_close(f, r, 2e-5 * scale, 1e-5, key)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("rate", [0.1, 0.6])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 2, 2),
                                              (7, 1, 3)])
def test_gradients(backend, rate, k, stride, padding):
    s = spikes(2, 5, 11, 10, rate=rate, seed=k)
    w, b = conv_params(6, 5, k)
    compare_grads(backend, s, w, b, stride, padding)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False),
                                  (False, False, True), (False, True, True)])
def test_gradients_subsets(backend, need):
    s = spikes(2, 4, 9, 9, rate=0.2)
    w, b = conv_params(3, 4, 3)
    compare_grads(backend, s, w, b, 1, 1, need)


#: The compiled kernels of the plain spikingir::spike_conv2d_* ops: cpp on the CPU,
#: cuda on a GPU (marked gpu).
COMPILED_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif("cpp" not in CPU_FUSED,
                                                 reason="spikingir._C not built")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        "cuda" not in GPU_FUSED, reason="no CUDA device with the cuda kernels")])]


@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.parametrize("dense_rate", [-1.0, 2.0])
@pytest.mark.parametrize("cout,stride,H", [(6, 2, 12), (70, 1, 19)])
def test_compiled_backward_both_paths(dense_rate, cout, stride, H, device):
    """The dense weight gradient (-1: oneDNN / cuDNN) and the event-driven one (2;
    cuda's is off by default, so only this test runs it): several bands of 8
    output rows, Cout beyond one block of 64 and not a multiple of 8."""
    s = spikes(2, 5, H, 13, rate=0.3)
    w, b = conv_params(cout, 5, 3)
    out, packed = torch.ops.spikingir.spike_conv2d_fwd(s.to(device), w.to(device), b.to(device),
                                                       stride, 1, 2.0, True, True)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gs, gw, gb = torch.ops.spikingir.spike_conv2d_bwd(go.to(device), packed, w.to(device), H,
                                                          13, stride, 1, dense_rate, True, True,
                                                          True)
    gs, gw, gb = gs.cpu(), gw.cpu(), gb.cpu()
    sd, wd = s.double().requires_grad_(), w.double().requires_grad_()
    F.conv2d(sd, wd, b.double(), stride, 1).backward(go.double())
    assert_close(gs, sd.grad, 1e-5, 1e-5, "grad_s")
    assert_close(gw, wd.grad, 1e-4, 1e-5, "grad_weight")
    assert_close(gb, go.double().sum((0, 2, 3)), 1e-4, 1e-5, "grad_bias")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_spikes_saved_bit_packed(backend):
    """What autograd keeps of s is 1 bit per spike (and nothing when the weight
    needs no gradient)."""
    s = spikes(2, 6, 10, 13, rate=0.3)
    w, b = conv_params(4, 6, 3)
    for need_w, expected in ((True, 2 * 6 * 10 * 2), (False, 0)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            out = ops.spike_conv2d(s.clone().requires_grad_(), w.clone().requires_grad_(need_w),
                                   b, 1, 1, backend=backend)
        big = [t for t in saved if t.dtype != torch.uint8 and t.numel() >= s.numel()]
        assert not big, [(t.dtype, t.shape) for t in big]
        packed = [t for t in saved if t.dtype == torch.uint8]
        assert sum(t.numel() for t in packed) == expected
        out.sum().backward()


# ---------------------------------------------------------------------------
# Registration: opcheck, torch.compile, the chosen backend really runs.
# ---------------------------------------------------------------------------

def _fwd_samples():
    w, b = conv_params(3, 4, 3)
    for rate, stride, bias, save in ((0.2, 1, True, True), (0.6, 2, False, True),
                                     (0.1, 1, True, False)):
        s = spikes(2, 4, 7, 9, rate=rate)
        yield (s, w.clone().requires_grad_(save), b.clone() if bias else None, stride, 1, 0.3,
               True, save)


def _opcheck(fwd, bwd):
    for args in _fwd_samples():
        torch.library.opcheck(fwd, args)
        out, packed = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        if args[-1]:
            go = torch.randn_like(out)
            torch.library.opcheck(bwd, (go, packed, args[1].detach(), 7, 9, args[3], 1, 0.3,
                                        True, True, args[2] is not None))


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_opcheck_cpp():
    _opcheck(torch.ops.spikingir.spike_conv2d_fwd.default,
             torch.ops.spikingir.spike_conv2d_bwd.default)


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
def test_opcheck_triton():
    _opcheck(torch.ops.spikingir.spike_conv2d_fwd_triton.default,
             torch.ops.spikingir.spike_conv2d_bwd_triton.default)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_torch_compile_fullgraph():
    from spikingir.nn import IFNeuron
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        IFNeuron(0.5, backend="cpp", scale_output=False),
        SpikeConv2d(3, 4, 3, padding=1, validate=False, backend="cpp"),
    )
    x = torch.rand(3, 2, 3, 8, 8)
    eager = model(x)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    assert_close(out, eager, 1e-6, 1e-6, "compiled forward")
    for a, b in zip([p.grad for p in model.parameters()], g_eager):
        assert_close(a, b, 1e-5, 1e-5, "compiled grad")


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_chosen_backend_runs(backend):
    s = spikes(1, 2, 5, 5, rate=0.3)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)

    def fn():
        ops.spike_conv2d(s, w, None, 1, 1, backend=backend).sum().backward()
    expected = {"torch": set(),
                "cpp": {"spikingir::spike_conv2d_fwd", "spikingir::spike_conv2d_bwd"},
                "triton": {"spikingir::spike_conv2d_fwd_triton",
                           "spikingir::spike_conv2d_bwd_triton"}}
    assert ran_ops(fn) == expected[backend]


def test_auto_backend_choice():
    assert backends.choose(OP, "cpu", torch.float64, "auto") == "torch"
    if "cpp" in CPU_FUSED:
        assert backends.choose(OP, "cpu", torch.float32, "auto") == "cpp"
        ran = ran_ops(lambda: ops.spike_conv2d(spikes(1, 2, 5, 5, rate=0.5),
                                                torch.randn(2, 2, 3, 3)))
        assert ran == {"spikingir::spike_conv2d_fwd"}
    out = ops.spike_conv2d(spikes(1, 2, 5, 5, rate=0.5, dtype=torch.float64),
                           torch.randn(2, 2, 3, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    # On CUDA, auto runs cuDNN on float spikes (measured faster than both kernels
    # on an H100), whatever is installed, and Triton on SpikeMasks (measured
    # fastest in the SNN), or cuDNN without Triton; a named kernel still runs or
    # says why not.
    for dtype in (torch.float32, torch.bfloat16):
        assert backends.choose(OP, "cuda", dtype, "auto") == "torch"
    triton_ok = backends.why_unavailable("triton", "cuda", "spike_conv2d_masks") is None
    assert backends.choose("spike_conv2d_masks", "cuda", torch.float32, "auto") == \
        ("triton" if triton_ok else "torch")
    if "cpp" in CPU_FUSED:
        assert backends.choose("spike_conv2d_masks", "cpu", torch.float32, "auto") == "cpp"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' is not available"):
            backends.choose(OP, "cuda", torch.float32, "cuda")


def test_triton_conv_needs_compute_capability_8(monkeypatch):
    """The Triton spike_conv2d runs int8 tensor-core dots: on a GPU older than
    compute capability 8.0 it is unavailable (with the reason), and auto on
    SpikeMasks falls back to cuDNN instead of failing to compile."""
    if not (backends.HAS_TRITON and backends.HAS_CPP_OPS):
        pytest.skip("triton or the extension missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_capability", lambda index: (7, 5))
    assert "compute capability 8.0" in backends.why_unavailable("triton", "cuda", OP)
    assert backends.choose("spike_conv2d_masks", "cuda", torch.float32, "auto") == "torch"
    with pytest.raises(ValueError, match="this GPU is 7.5"):
        backends.choose(OP, "cuda:0", torch.float32, "triton")
    assert backends.why_unavailable("triton", "cuda", "if_multistep") is None  # no int8 dots
    monkeypatch.setattr(backends, "_capability", lambda index: (9, 0))
    assert backends.why_unavailable("triton", "cuda", OP) is None


def test_cuda_backend_needs_compute_capability_8(monkeypatch):
    """The CUDA kernels are built for sm_80 and newer (cp.async): on an older GPU
    (a T4 is 7.5) the cuda backend is unavailable with the reason, for every op,
    whether or not the extension has CUDA kernels, and auto picks another."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_capability", lambda index: (7, 5))
    for op in backends.OP_BACKENDS:
        if "cuda" in backends.OP_BACKENDS[op]:
            assert "this GPU is 7.5" in backends.why_unavailable("cuda", "cuda:0", op)
    assert backends.choose("if_multistep", "cuda", torch.float32, "auto") != "cuda"
    with pytest.raises(ValueError, match="compute capability 8.0"):
        backends.choose("if_multistep", "cuda", torch.float32, "cuda")
    monkeypatch.setattr(backends, "_capability", lambda index: (8, 9))
    assert "compute capability 8.0" not in str(backends.why_unavailable("cuda", "cuda", "if_multistep"))


# ---------------------------------------------------------------------------
# The Triton kernel's pieces (interpreter).
# ---------------------------------------------------------------------------

@pytest.mark.skipif(not backends.HAS_TRITON, reason="triton not installed")
def test_triton_fixed_point_planes():
    """The readable definition of the weight fixed point: each weight within one
    float32 ulp of its channel's largest weight, digits in int8 range."""
    from spikingir.kernels.spike_conv import quantize_weight_torch
    w, _ = conv_params(5, 3, 3)
    w[2] = 0.0  # an all-zero channel
    w[3] *= 1e-3
    planes, scale = quantize_weight_torch(w, 16, 16)
    assert planes.dtype == torch.int8 and planes.shape == (3, 3, 3, 16, 16)
    q = planes[0].long() + 256 * planes[1].long() + 65536 * planes[2].long()
    q = q[:, :, :3, :5].permute(3, 2, 0, 1)
    rel = ((q.double() * scale.double()[:, None, None, None] - w.double()).abs()
           / w.double().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30))
    assert rel.max() <= 2.0 ** -23  # one float32 ulp of the channel's largest weight
    # the digit range: a channel whose max lies just below a power of two
    w2 = torch.full((1, 1, 1, 1), 1.0 - 2.0 ** -20)
    planes, scale = quantize_weight_torch(w2, 16, 16)
    p = planes[:, 0, 0, 0, 0].long()
    q = p[0] + 256 * p[1] + 65536 * p[2]
    assert abs(q.item() * scale.item() - w2.item()) <= 2.0 ** -23


def _edge_weights(cout, cin, k, seed):
    """Random weights with the channels the fixed point treats specially."""
    w, _ = conv_params(cout, cin, k, seed=seed)
    edits = [lambda c: c.zero_(),                             # all zero: scale 2^-23
             lambda c: c.mul_(1e-41),                         # subnormal, few bits left
             lambda c: c.mul_(2.0 ** -130),                   # subnormal, larger
             lambda c: c.mul_(1e30),                          # huge
             lambda c: c.fill_(1.0 - 2.0 ** -20),             # rounds past QMAX: e + 1
             lambda c: c.view(-1)[0].fill_(float("nan")),     # NaN: scale NaN
             lambda c: c.view(-1)[-1].fill_(-float("inf")),   # inf: scale NaN
             lambda c: c.view(-1)[0].fill_(2.0 ** 20)]        # one large weight
    for co, edit in zip(range(cout), edits):
        edit(w[co])
    return w


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape, block_k, block_n", [((64, 64, 3, 3), 64, 64),
                                                     ((9, 3, 7, 7), 32, 16),
                                                     ((19, 37, 5, 5), 64, 32),
                                                     ((1, 1, 1, 1), 32, 16)])
@pytest.mark.parametrize("k_major", [True, False])
def test_triton_quantize_weight_kernel_is_the_reference(shape, block_k, block_n, k_major, device):
    """The one-launch quantisation kernel the launchers use writes the planes and
    scales of quantize_weight_torch bit for bit (padding included), on random
    weights and on every special channel (zero, subnormal, huge, NaN, inf, the
    digit-range edge), from a non-contiguous weight too. On the GPU this checks
    what the interpreter cannot: the rounding by adding 2^23 (no fast-math
    reassociation) and subnormals (no flush to zero)."""
    from spikingir.kernels.spike_conv import quantize_weight, quantize_weight_torch
    cout, cin, k, _ = shape
    for w in (conv_params(cout, cin, k, seed=7)[0], _edge_weights(cout, cin, k, seed=8),
              conv_params(cin, cout, k, seed=9)[0].transpose(0, 1)):
        w = w.to(device)
        planes, scale = quantize_weight(w, block_k, block_n, k_major)
        ref_planes, ref_scale = quantize_weight_torch(w, block_k, block_n, k_major)
        assert planes.dtype == torch.int8 and planes.shape == ref_planes.shape
        assert torch.equal(planes, ref_planes)
        assert torch.equal(scale.isnan(), ref_scale.isnan())
        assert torch.equal(scale.nan_to_num(), ref_scale.nan_to_num())


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
def test_triton_non_finite_weight_gives_nan_channel():
    """A NaN or infinite weight makes its whole output channel NaN, where
    F.conv2d gives NaN or inf (inf * 0 is NaN), never a finite value; the other
    channels are unaffected."""
    w, b = conv_params(4, 5, 3, seed=2)
    w[1, 2, 0, 0] = float("nan")
    w[3, 0, 1, 1] = float("inf")
    s = spikes(1, 5, 6, 7, rate=0.3, seed=3)
    out = ops.spike_conv2d(s, w, b, padding=1, backend="triton")
    ref = F.conv2d(s, w, b, padding=1)
    for co in (1, 3):
        assert out[:, co].isnan().all() and not ref[:, co].isfinite().any()
    assert_close(out[:, [0, 2]], ref[:, [0, 2]], 1e-5, 1e-5)


@pytest.mark.skipif(not backends.HAS_TRITON, reason="triton not installed")
def test_triton_occupancy_map_matches_brute_force():
    from spikingir.kernels.spike_conv import occupancy_map, padded_spikes
    s = spikes(2, 20, 19, 21, rate=0.002, seed=9)
    k, stride, pad, bk, tile = 3, 2, 1, 16, (4, 8)
    s8 = padded_spikes(s, pad, bk)
    Ho, Wo = (19 + 2 - 3) // 2 + 1, (21 + 2 - 3) // 2 + 1
    occ = occupancy_map(s8, k, k, stride, Ho, Wo, bk, tile)
    G = s8.shape[3] // bk
    assert occ.shape == (2, 3, 2, 9, G)
    for n in range(2):
        for ty in range(3):
            for tx in range(2):
                for tap in range(9):
                    ky, kx = divmod(tap, 3)
                    for g in range(G):
                        oys = range(ty * 4, min(Ho, ty * 4 + 4))
                        oxs = range(tx * 8, min(Wo, tx * 8 + 8))
                        want = any(bool(s8[n, oy * stride + ky, ox * stride + kx,
                                              g * bk:(g + 1) * bk].any())
                                   for oy in oys for ox in oxs)
                        assert bool(occ[n, ty, tx, tap, g]) == want
    assert 0 < occ.float().mean() < 1  # some blocks skipped, some not


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
@pytest.mark.parametrize("config", [dict(block_k=64), dict(block_k=32, tile=(8, 16), num_warps=4),
                                    dict(block_k=64, tile=(4, 8), num_warps=8, num_stages=3),
                                    dict(b_kmajor=False), dict(b_kmajor=False, block_k=64),
                                    dict(b_kmajor=False, block_n=16), dict(block_n=16),
                                    dict(block_k=16)])
def test_triton_launch_configs_agree(config):
    """Launch configurations (the GPU tuning sweep) compute the same integers:
    bitwise equal to the default configs, from float spikes and from masks,
    sparse (skipping) and dense paths."""
    from spikingir.kernels.spike_conv import (spike_conv2d_fwd_masks_triton,
                                              spike_conv2d_fwd_triton)
    w, b = conv_params(7, 37, 3, seed=4)
    for rate, dense_rate in ((0.05, 1.0), (0.3, 0.0)):
        s = spikes(2, 37, 9, 13, rate=rate, seed=5)
        m = ops.SpikeMasks.from_dense(s)
        ref, _ = spike_conv2d_fwd_triton(s, w, b, 1, 1, dense_rate, False, False)
        out, _ = spike_conv2d_fwd_triton(s, w, b, 1, 1, dense_rate, False, False, config=config)
        assert torch.equal(out, ref)
        # the masks-only option, alone and with the configuration
        for cfg in (None, config, dict(config, unpack32=True)):
            out_m = spike_conv2d_fwd_masks_triton(m.bits, 37, w, b, 1, 1, dense_rate, config=cfg)
            assert torch.equal(out_m, ref)
        assert_close(out, F.conv2d(s.double(), w.double(), b.double(), padding=1).float(),
                     1e-6, 1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("block_k", [32, 64])
def test_triton_unpack32_many_words(block_k, device):
    """32-bit unpacking of masks over several words per pixel (100 channels: two
    int64 words, four int32), the last one partly used; stride 2, 5x5: the
    64-bit unpacking's result bit for bit, and F.conv2d's."""
    from spikingir.kernels.spike_conv import spike_conv2d_fwd_masks_triton
    w, b = conv_params(16, 100, 5, seed=6, device=device)
    s = spikes(1, 100, 11, 9, rate=0.2, seed=7, device=device)
    m = ops.SpikeMasks.from_dense(s)
    outs = [spike_conv2d_fwd_masks_triton(m.bits, 100, w, b, 2, 2, -1.0,
                                          config=dict(block_k=block_k, unpack32=u))
            for u in (False, True)]
    assert torch.equal(outs[0], outs[1])
    check_conv(outs[1], s, w, b, 2, 2, fixed_point=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape, k, stride, padding, config", [
    ((2, 5, 11, 10, 6), 3, 1, 1, None),
    ((2, 5, 11, 10, 6), 3, 2, 1, dict(split=3, block_p=16)),  # partials added
    ((1, 70, 9, 13, 20), 5, 2, 2, dict(split=2, block_p=64)),  # two channel blocks of Cin
    ((3, 16, 7, 7, 33), 1, 1, 0, dict(precision="ieee")),   # two blocks of Cout
    ((2, 3, 12, 12, 4), 7, 1, 3, dict(block_p=256)),
])
def test_triton_grad_weight_kernel(shape, k, stride, padding, config, device):
    """The weight-gradient GEMM over the bit-packed spikes against float64
    conv2d_weight, within float32 rounding of the sum of |terms| (tf32x3 keeps 22
    of grad_out's 24 mantissa bits per pass); clustered spikes (whole rows and a
    whole image silent: skipped pixel blocks) and none at all (exact zeros);
    bitwise equal run to run."""
    from spikingir.kernels.spike_conv import pack_bits, spike_conv2d_grad_weight_triton
    N, cin, H, W, cout = shape
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    g = torch.Generator().manual_seed(sum(shape) + k)
    go = torch.randn(N, cout, Ho, Wo, generator=g).to(device)
    s = spikes(N, cin, H, W, rate=0.3, seed=k)
    s[0, :, : H // 2] = 0
    s[-1] = 0
    for s in (s, torch.zeros_like(s)):
        s = s.to(device)
        packed = pack_bits(s)
        gw = spike_conv2d_grad_weight_triton(go, packed, (cout, cin, k, k), H, W, stride, padding,
                                             config=config)
        again = spike_conv2d_grad_weight_triton(go, packed, (cout, cin, k, k), H, W, stride,
                                                padding, config=config)
        assert gw.dtype == torch.float32 and gw.shape == (cout, cin, k, k)
        assert torch.equal(gw, again)
        ref = torch.nn.grad.conv2d_weight(s.double(), (cout, cin, k, k), go.double(), stride,
                                          padding)
        mag = torch.nn.grad.conv2d_weight(s.double(), (cout, cin, k, k), go.double().abs(),
                                          stride, padding)
        bound = (4 + (N * Ho * Wo) ** 0.5) * EPS32 * mag + 1e-30
        err = (gw.double() - ref).abs()
        if bool((err > bound).any()):
            assert_close(gw, ref, 0, 0, "grad_weight")
    assert not gw.any()  # no spike: exactly zero


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
def test_triton_backward_dense_path_agrees():
    """The Triton backward's two weight-gradient paths (the GEMM kernel, dense_rate
    >= 0; cuDNN/oneDNN of the unpacked spikes, < 0) and its grad_s and grad_bias."""
    from spikingir.kernels.spike_conv import pack_bits, spike_conv2d_bwd_triton
    s = spikes(2, 6, 9, 11, rate=0.2, seed=3)
    w, _ = conv_params(5, 6, 3, seed=4)
    go = torch.randn(2, 5, 5, 6, generator=torch.Generator().manual_seed(5))
    res = [spike_conv2d_bwd_triton(go, pack_bits(s), w, 9, 11, 2, 1, rate, True, True, True)
           for rate in (2.0, -1.0)]
    for a, b, name in zip(*res, ("grad_s", "grad_weight", "grad_bias")):
        assert_close(a, b, 1e-5, 1e-5, name)


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
@pytest.mark.parametrize("config, match", [(dict(tile_h=8), "unknown launch options"),
                                           (dict(block_n=24), "power of two"),
                                           (dict(block_n=8), "power of two")])
def test_triton_bad_launch_config(config, match):
    from spikingir.kernels.spike_conv import spike_conv2d_fwd_triton
    w, b = conv_params(7, 5, 3, seed=4)
    s = spikes(1, 5, 6, 6, rate=0.2, seed=5)
    with pytest.raises(ValueError, match=match):
        spike_conv2d_fwd_triton(s, w, b, 1, 1, -1.0, False, False, config=config)


@pytest.mark.skipif("triton" not in CPU_FUSED, reason="Triton interpreter not available")
def test_triton_refuses_more_output_channels_than_a_grid_axis_holds():
    """The Triton forward's output-channel blocks (64 channels) are grid axis 1, at most
    65535 programs on CUDA: a larger Cout gets a clear error before any launch."""
    cout = 64 * 65535 + 1
    w = torch.zeros(cout, 1, 1, 1)  # 16 MB
    s = torch.ones(1, 1, 1, 1)
    match = f"at most {64 * 65535} output channels .*got {cout}"
    with pytest.raises(RuntimeError, match=match):
        ops.spike_conv2d(s, w, backend="triton")
    with torch.no_grad(), pytest.raises(RuntimeError, match=match):
        ops.spike_conv2d(ops.SpikeMasks.from_dense(s), w, backend="triton")


# ---------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------

def test_module_is_a_conv2d_drop_in():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    sconv = SpikeConv2d(4, 6, 3, padding=1)
    sconv.load_state_dict(conv.state_dict())
    assert set(sconv.state_dict()) == {"weight", "bias"}
    conv.load_state_dict(sconv.state_dict())
    x = spikes(3, 2, 4, 7, 9, rate=0.2)  # [T, B, C, H, W]
    y = sconv(x)
    assert y.shape == (3, 2, 6, 7, 9)
    for t in range(3):
        check_conv(y[t], x[t], conv.weight.detach(), conv.bias.detach(), 1, 1)
    assert sconv(x[0]).shape == (2, 6, 7, 9)
    s2 = SpikeConv2d(4, 6, 5, stride=2, padding=2, bias=False)
    assert s2(x).shape == (3, 2, 6, 4, 5) and s2.bias is None
    # nn.Conv2d's other arguments, spelled out at the values spike_conv2d computes
    s3 = SpikeConv2d(4, 6, 3, padding=1, dilation=1, groups=1, padding_mode="zeros")
    assert (s3.dilation, s3.groups, s3.padding_mode) == ((1, 1), 1, "zeros")


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_module_takes_neuron_masks(backend):
    from spikingir.nn import MPRNeuron
    neuron = MPRNeuron(0.7, num_channels=4, backend=backend, scale_output=False)
    sconv = SpikeConv2d(4, 6, 3, padding=1, validate=False, backend=backend)
    x = torch.rand(4, 2, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = sconv(neuron(x))
        ym = sconv(neuron(x, emit="masks"))
    assert ym.shape == (4, 2, 6, 7, 9)
    assert torch.equal(ym, y) if backend != "torch" else torch.allclose(ym, y, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=4), "kernel_size"), (dict(kernel_size=3, stride=3), "stride"),
    (dict(kernel_size=3, stride=(1, 2)), "stride"), (dict(kernel_size=3, padding="same"), "padding"),
    (dict(kernel_size=3, groups=2), "groups=1"), (dict(kernel_size=3, dilation=2), "dilation=1"),
    (dict(kernel_size=3, padding_mode="reflect"), "padding_mode='zeros'"),
])
def test_module_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpikeConv2d(4, 6, **kwargs)


def test_module_bad_input():
    with pytest.raises(ValueError, match="x"):
        SpikeConv2d(2, 2, 3)(torch.zeros(2, 5, 5))


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ---------------------------------------------------------------------------

S = spikes(2, 3, 6, 6, rate=0.3)
W, B = conv_params(4, 3, 3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda b: ops.spike_conv2d(S * 0.5, W, backend=b), ValueError, "s: expected a binary"),
    (lambda b: ops.spike_conv2d(S * 2, W, backend=b), ValueError, "binary"),
    (lambda b: ops.spike_conv2d(S - 1, W, backend=b), ValueError, "binary"),
    (lambda b: ops.spike_conv2d(S.masked_fill(S == 0, float("nan")), W, backend=b), ValueError,
     "binary"),
    (lambda b: ops.spike_conv2d(S[0], W, backend=b), ValueError, r"s: expected shape \[N"),
    (lambda b: ops.spike_conv2d(S[None], W, backend=b), ValueError, "s: expected shape"),
    (lambda b: ops.spike_conv2d(S[:, :2], W, backend=b), ValueError, "weight.*channel mismatch"),
    (lambda b: ops.spike_conv2d(S.long(), W, backend=b), TypeError, "s: expected float32"),
    (lambda b: ops.spike_conv2d(S.bool(), W, backend=b), TypeError, "s: expected float32"),
    (lambda b: ops.spike_conv2d(S.tolist(), W, backend=b), TypeError, "s: expected a torch"),
    (lambda b: ops.spike_conv2d(S[:0], W, backend=b), ValueError, "s: empty batch"),
    (lambda b: ops.spike_conv2d(S[..., :2, :2], W[..., :3, :3], backend=b), ValueError,
     "larger than the padded input"),
    (lambda b: ops.spike_conv2d(S[..., :2, :], conv_params(4, 3, 5)[0], padding=1, backend=b),
     ValueError, "larger than the padded input"),
    (lambda b: ops.spike_conv2d(S, torch.randn(4, 3, 2, 2), backend=b), ValueError,
     "kernel size 2x2"),
    (lambda b: ops.spike_conv2d(S, torch.randn(4, 3, 9, 9), padding=4, backend=b), ValueError,
     "kernel size"),
    (lambda b: ops.spike_conv2d(S, torch.randn(6, 1, 3, 3), backend=b), ValueError, "groups=1"),
    (lambda b: ops.spike_conv2d(S, W[0], backend=b), ValueError, "weight: expected shape"),
    (lambda b: ops.spike_conv2d(S, W.long(), backend=b), TypeError, "weight"),
    (lambda b: ops.spike_conv2d(S, W, torch.zeros(3), backend=b), ValueError, "bias"),
    (lambda b: ops.spike_conv2d(S, W, torch.zeros(4, dtype=torch.long), backend=b), TypeError,
     "bias"),
    (lambda b: ops.spike_conv2d(S, W, stride=3, backend=b), ValueError, "stride"),
    (lambda b: ops.spike_conv2d(S, W, stride=1.0, backend=b), TypeError, "stride"),
    (lambda b: ops.spike_conv2d(S, W, padding=-1, backend=b), ValueError, "padding"),
    (lambda b: ops.spike_conv2d(S, W, padding=(1, 2), backend=b), ValueError, "padding"),
    (lambda b: ops.spike_conv2d(S, W.to("meta"), backend=b), ValueError, "weight: expected a "
     "tensor on cpu"),
])
@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_bad_input(call, exc, match, backend):
    with pytest.raises(exc, match=match):
        call(backend)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_validate_false_skips_the_check(backend):
    out = ops.spike_conv2d(S * 0.5, W, validate=False, backend=backend)  # the caller's promise
    if backend != "triton":  # triton reads any nonzero as a spike (its check costs a pass)
        assert_close(out, F.conv2d(S * 0.5, W), 1e-5, 1e-5, "out")  # cpp: dense path (Cin < 8)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_cpp_refuses_scaled_spikes_it_reads_anyway():
    """A default neuron emits theta x spikes: behind it SpikeConv2d(validate=False)
    gave a wrong forward (event path: any nonzero read as 1) and a weight gradient
    of the packed bits (2x too large for theta = 0.5). Where the cpp kernel reads
    the spikes anyway it now refuses them, naming scale_output."""
    from spikingir.nn import IFNeuron
    torch.manual_seed(0)
    for cin, grad in ((16, False), (4, True)):  # the event path; the dense one saving bits
        y = IFNeuron(0.5)(torch.randn(4, 2, cin, 8, 8))
        conv = SpikeConv2d(cin, 8, 3, padding=1, validate=False, backend="cpp")
        conv.requires_grad_(grad)
        with pytest.raises(ValueError, match="scale_output=False"):
            conv(y)
    y = IFNeuron(0.5, scale_output=False)(torch.randn(4, 2, 16, 8, 8))
    conv = SpikeConv2d(16, 8, 3, padding=1, validate=False, backend="cpp")
    ref = F.conv2d(y.flatten(0, 1), conv.weight, conv.bias, 1, 1).unflatten(0, (4, 2))
    assert_close(conv(y), ref, 1e-5, 1e-5, "out")


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.spike_conv2d(S, W, backend="cudnn")
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        ops.spike_conv2d(S, W, backend="cuda")
    if "cpp" in CPU_FUSED:
        with pytest.raises(TypeError, match="s: backend 'cpp'.*float64"):
            ops.spike_conv2d(S.double(), W, backend="cpp")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_non_binary_error_names_the_value(backend):
    s = spikes(2, 3, 6, 6, rate=0.3)
    s[1, 2, 3, 4] = 0.5
    with pytest.raises(ValueError, match=r"found 0\.5 at index \(1, 2, 3, 4\)"):
        ops.spike_conv2d(s, torch.randn(4, 3, 3, 3), padding=1, backend=backend)


def test_non_binary_error_points_at_the_feeding_neuron():
    """The usual cause: a neuron with its default scale_output=True (theta x spikes)
    in front of SpikeConv2d. It passes while theta is 1.0 and fails after the first
    optimiser step; the error says what to change, and that validate=False is no
    way out."""
    net = torch.nn.Sequential(SeqToBatch(torch.nn.Conv2d(1, 4, 3, padding=1)),
                              IFNeuron(1.0, num_channels=4), SpikeConv2d(4, 2, 3, padding=1))
    x = torch.rand(3, 2, 1, 6, 6) * 4
    net(x)  # theta = 1: theta x spikes are binary
    with torch.no_grad():
        net[1].theta.mul_(0.999)
    with pytest.raises(ValueError, match=r"scale_output=False.*validate=False only skips"):
        net(x)


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_masks_output_dtype(backend):
    """From SpikeMasks (float32 spikes) the result is float32 promoted with the
    weight's dtype, on every backend."""
    m = ops.SpikeMasks.from_dense(spikes(2, 3, 6, 6, rate=0.3))
    w = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        assert ops.spike_conv2d(m, w.half(), padding=1, backend=backend).dtype == torch.float32
        assert ops.spike_conv2d(m, w.double(), padding=1, backend=backend).dtype == torch.float64


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_double_backward_is_an_error(backend):
    s = spikes(2, 3, 6, 6, rate=0.3).requires_grad_()
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = ops.spike_conv2d(s, w, padding=1, backend=backend)
    gw, = torch.autograd.grad(out.pow(2).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(gw.sum(), s)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_other_autodiff_is_a_clear_error(backend):
    """Reverse mode only: forward-mode AD dropped the weight's tangent silently (a zero
    derivative) and torch.func.grad failed deep in torch; both now say what works.
    The reference runs under both."""
    import torch.autograd.forward_ad as fwAD
    s = spikes(2, 3, 6, 6, rate=0.3)
    w = torch.randn(4, 3, 3, 3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(w, torch.ones_like(w))
        with pytest.raises(RuntimeError, match="forward-mode AD .* backend='torch'"):
            ops.spike_conv2d(s, dual, padding=1, backend=backend)
        out = ops.spike_conv2d(s, dual, padding=1, backend="torch")
        assert torch.equal(fwAD.unpack_dual(out).tangent,
                           F.conv2d(s, torch.ones_like(w), padding=1))
    with pytest.raises(RuntimeError, match="torch.func.grad .* backend='torch'"):
        torch.func.grad(lambda w: ops.spike_conv2d(s, w, padding=1, backend=backend).sum())(w)
    gw = torch.func.grad(lambda w: ops.spike_conv2d(s, w, padding=1, backend="torch").sum())(w)
    assert torch.equal(gw, torch.func.grad(lambda w: F.conv2d(s, w, padding=1).sum())(w))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_raw_ops_refuse_inconsistent_arguments(backend):
    """torch.ops.spikingir.spike_conv2d_* check what their kernels trust (these
    used to crash, return a value where F.conv2d raises, or compute with the wrong
    channel count)."""
    o, sfx = torch.ops.spikingir, ("_triton" if backend == "triton" else "")
    fwd, bwd = getattr(o, f"spike_conv2d_fwd{sfx}"), getattr(o, f"spike_conv2d_bwd{sfx}")
    fwd_masks = getattr(o, f"spike_conv2d_fwd_masks{sfx}")
    s = spikes(1, 2, 6, 6, rate=0.5)
    calls = [
        lambda: fwd(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 2, 2), None, 2, 0, 2.0, True, True),
        lambda: fwd(s, torch.ones(3, 2, 3, 3), None, 1, 2 ** 62, 2.0, True, True),
        lambda: fwd(s, torch.ones(3, 5, 3, 3), None, 1, 1, 2.0, True, True),
        lambda: fwd(s, torch.ones(3, 2, 3, 3), torch.ones(1), 1, 1, 2.0, True, True),
        lambda: fwd_masks(ops.SpikeMasks.from_dense(s).bits, 64, torch.ones(3, 2, 3, 3), None,
                          1, 1, 2.0),
        lambda: bwd(torch.ones(1, 3, 6, 6), torch.zeros(1, 1, 1, 1, dtype=torch.uint8),
                    torch.ones(3, 2, 3, 3), 6, 6, 1, 1, 2.0, False, True, False),
    ]
    for call in calls:
        with pytest.raises((RuntimeError, ValueError)):
            call()
    if backend == "triton":
        # the weight on another device than the spikes (meta here): the ops' boundary
        # refuses it, and so do the launchers the benchmarks call directly
        from kernels import spike_conv as kernels
        meta = torch.ones(3, 2, 3, 3, device="meta")
        bits = ops.SpikeMasks.from_dense(s).bits
        for call in (lambda: fwd(s, meta, None, 1, 1, 2.0, True, True),
                     lambda: fwd_masks(bits, 2, meta, None, 1, 1, 2.0)):
            with pytest.raises(RuntimeError, match="one device"):
                call()
        for call in (lambda: kernels.spike_conv2d_fwd_triton(s, meta, None, 1, 1, 2.0, True, True),
                     lambda: kernels.spike_conv2d_fwd_masks_triton(bits, 2, meta, None, 1, 1, 2.0)):
            with pytest.raises(RuntimeError, match="weight must be .* on cpu, got .* on meta"):
                call()


@pytest.mark.parametrize("device", COMPILED_DEVICES)
def test_compiled_backward_ignores_packing_bits_past_the_width(device):
    """Bits past the width in the last byte of a packed row (never set by the
    forward) add no pixel: before, the cpp event path listed them and wrote past
    its pixel buffer (heap corruption)."""
    w = torch.randn(8, 1, 1, 1, generator=torch.Generator().manual_seed(0)).to(device)
    pad = 7
    go = torch.randn(1, 8, 8 + 2 * pad, 1 + 2 * pad,
                     generator=torch.Generator().manual_seed(1)).to(device)
    packed = torch.full((1, 1, 8, 1), 255, dtype=torch.uint8, device=device)  # W = 1: bits 1..7 pad
    args = (go, packed, w, 8, 1, 1, pad)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _, event, _ = torch.ops.spikingir.spike_conv2d_bwd(*args, 2.0, False, True, False)
        _, dense, _ = torch.ops.spikingir.spike_conv2d_bwd(*args, -1.0, False, True, False)
    torch.testing.assert_close(event, dense)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_raw_backward_refuses_packed_spikes_on_the_cpu(backend):
    """The dispatcher sends a CUDA grad_out with CPU packed spikes to the CUDA
    kernel, which would read a host pointer: both GPU kernels refuse it."""
    bwd = getattr(torch.ops.spikingir, "spike_conv2d_bwd" + ("_triton" if backend == "triton"
                                                              else ""))
    go = torch.ones(1, 3, 6, 6, device="cuda")
    w = torch.ones(3, 2, 3, 3, device="cuda")
    packed = torch.zeros(1, 2, 6, 1, dtype=torch.uint8)
    for dense_rate in (2.0, -1.0):
        with pytest.raises(RuntimeError, match="packed"):
            bwd(go, packed, w, 6, 6, 1, 1, dense_rate, False, True, False)


def test_triton_cuda_kernels_run_on_the_input_device(monkeypatch):
    """The CUDA-key Triton implementations enter the first tensor argument's device
    (Triton launches on the current device; the dispatcher adds no guard)."""
    from spikingir.ops import registry
    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    x = torch.ones(3)
    guarded = registry._on_input_device(lambda flag, t, k=2: t * k if flag else None)
    assert torch.equal(guarded(True, x, k=3), x * 3)
    assert entered == [x.device]


# ---------------------------------------------------------------------------
# GPU (skipped without one).
# ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2),
                                              (7, 2, 3)])
def test_gpu_matches_reference(backend, rate, k, stride, padding):
    s = spikes(2, 37, 23, 19, rate=rate, device="cuda")
    w, b = conv_params(70, 37, k, device="cuda")
    out = ops.spike_conv2d(s, w, b, stride, padding, backend=backend)
    check_conv(out, s, w, b, stride, padding, fixed_point=backend == "triton")
    assert torch.equal(out, ops.spike_conv2d(s, w, b, stride, padding, backend=backend))


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in GPU_FUSED or "cpp" not in CPU_FUSED,
                    reason="needs the cuda and cpp backends")
@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_gpu_cuda_equals_cpp_bitwise(rate):
    """For Cin <= 64 the CUDA event kernel sums in the CPU kernel's order ((ky,
    kx, ci), then bias): the two devices agree bit for bit."""
    s = spikes(3, 64, 21, 35, rate=rate)
    w, b = conv_params(70, 64, 3)
    cpu = ops.spike_conv2d(s, w, b, 1, 1, backend="cpp")
    dense_rate = ops.spike_conv.dense_rates("cpp", 64, 70)[0]
    if rate > dense_rate:  # the cpp op took oneDNN: compare with its event path instead
        cpu, _ = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, 1, 1, 2.0, False, False)
    gpu = ops.spike_conv2d(s.cuda(), w.cuda(), b.cuda(), 1, 1, backend="cuda")
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_gradients(backend):
    # The dense weight gradient (cuda's default) follows torch's cuDNN TF32 switch, as
    # F.conv2d's own backward does; against float64 it is compared in full float32.
    s = spikes(2, 5, 11, 10, rate=0.2)
    w, b = conv_params(6, 5, 3)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        compare_grads(backend, s, w, b, 2, 1, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_validates(backend):
    with pytest.raises(ValueError, match="binary"):
        ops.spike_conv2d(S.cuda() * 0.5, W.cuda(), backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_no_sync_per_call(backend):
    """With validate=False neither fused GPU conv waits for the GPU on the host
    (no firing rate or spike count read back): torch's sync debug mode raises
    if one does."""
    s = spikes(2, 37, 23, 19, rate=0.1, device="cuda")
    w, b = conv_params(70, 37, 3, device="cuda")
    m = ops.SpikeMasks.from_dense(s)
    with torch.no_grad():
        ref = ops.spike_conv2d(s, w, b, 1, 1, validate=False, backend=backend)  # warm-up
        ops.spike_conv2d(m, w, b, 1, 1, validate=False, backend=backend)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = ops.spike_conv2d(s, w, b, 1, 1, validate=False, backend=backend)
            out_m = ops.spike_conv2d(m, w, b, 1, 1, validate=False, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out, ref) and torch.equal(out_m, ref)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_cpp_path_follows_the_layer_shape():
    """dense_rates: oneDNN for few input channels (AOD-Net's 3 -> 3 layers, where it
    wins at every rate), the event-driven kernel for a 32 -> 32 layer at 10 %."""
    def ran_dense(cin, cout, rate):
        s = spikes(2, cin, 12, 12, rate=rate, seed=cin)
        w, b = conv_params(cout, cin, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = ops.spike_conv2d(s, w, b, 1, 1, backend="cpp")
        check_conv(out, s, w, b, 1, 1)
        return any(e.key == "aten::conv2d" for e in prof.key_averages())

    assert ops.spike_conv.dense_rates("cpp", 3, 3)[0] < 0
    assert ran_dense(3, 3, 0.1)
    assert not ran_dense(32, 32, 0.1)
    assert ran_dense(32, 32, 0.9)  # above the crossover


# ---------------------------------------------------------------------------
# SpikeMasks input (the neurons' emit="masks"): inference only.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
@pytest.mark.parametrize("cin,rate", [(5, 0.3), (64, 0.1), (70, 0.0), (70, 1.0), (130, 0.2)])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (1, 2, 0), (5, 2, 1)])
def test_masks_input_matches_float_input(backend, cin, rate, k, stride, padding):
    """Equal to float64 F.conv2d to float32 rounding, and to the float-spike path
    bit for bit where both take the same path (triton: always; cpp: from masks the
    event path runs at any rate on >= 8 input channels, from floats up to the
    dense_rates threshold)."""
    s = spikes(2, cin, 9, 10, rate=rate, seed=cin)
    w, b = conv_params(11, cin, k)
    m = ops.SpikeMasks.from_dense(s)
    with torch.no_grad():
        out = ops.spike_conv2d(m, w, b, stride, padding, backend=backend)
        ref = ops.spike_conv2d(s, w, b, stride, padding, backend=backend)
    check_conv(out, s, w, b, stride, padding, fixed_point=backend == "triton")
    same_path = backend == "triton" or (
        backend == "cpp" and (rate <= ops.spike_conv.dense_rates("cpp", cin, 11)[0]) ==
        (ops.spike_conv.dense_rates("cpp", cin, 11, masks=True)[0] >= 1))
    if same_path:
        assert torch.equal(out, ref)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
@pytest.mark.parametrize("dense_rate", [-1.0, 0.2, 2.0])
def test_cpp_masks_event_and_dense_paths(dense_rate):
    s = spikes(3, 70, 8, 9, rate=0.3)
    w, b = conv_params(9, 70, 3)
    m = ops.SpikeMasks.from_dense(s)
    out = torch.ops.spikingir.spike_conv2d_fwd_masks(m.bits, 70, w, b, 1, 1, dense_rate)
    check_conv(out, s, w, b, 1, 1)
    # the same rate sample as the float op: the same path, the same bits
    ref, _ = torch.ops.spikingir.spike_conv2d_fwd(s, w, b, 1, 1, dense_rate, False, False)
    assert torch.equal(out, ref)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_neuron_masks_feed_the_conv():
    """The chain the SNN runs: mprn_multistep(emit="masks") -> spike_conv2d."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, 16, 7, 8, generator=g) + 0.5
    w, b = conv_params(8, 16, 3)
    with torch.no_grad():
        m, _ = ops.mprn_multistep(x, 0.8, 0.6, emit="masks", backend="cpp")
        s, _ = ops.mprn_multistep(x, 0.8, 0.6, scale_output=False, backend="cpp")
        out = ops.spike_conv2d(m.flatten(0, 1), w, b, 1, 1, validate=False, backend="cpp")
        ref = ops.spike_conv2d(s.flatten(0, 1), w, b, 1, 1, validate=False, backend="cpp")
    assert torch.equal(out, ref)


M = ops.SpikeMasks.from_dense(S)


def _stray_bit_masks():
    bits = M.bits.clone()
    bits[0, 1, 1, 0] |= 1 << 5  # channel 5 of a 3-channel map
    return ops.SpikeMasks(bits, 3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda b: ops.spike_conv2d(ops.SpikeMasks.from_dense(S[None]), W, backend=b), ValueError,
     r"flatten\(0, 1\)"),
    (lambda b: ops.spike_conv2d(M, W[:, :2], backend=b), ValueError, "channel mismatch"),
    (lambda b: ops.spike_conv2d(M, W.clone().requires_grad_(), backend=b), ValueError,
     "for inference"),
    (lambda b: ops.spike_conv2d(_stray_bit_masks(), W, backend=b), ValueError, "channels >= 3"),
    (lambda b: ops.spike_conv2d(M, W.to("meta"), backend=b), ValueError, "on cpu"),
    (lambda b: ops.spike_conv2d(M, W, stride=3, backend=b), ValueError, "stride"),
])
@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_masks_bad_input(call, exc, match, backend):
    with pytest.raises(exc, match=match):
        call(backend)


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_cpp_masks_op_refuses_stray_bits():
    """Memory safety does not depend on validate: the C++ op checks the bits past
    the last channel itself (they would index past the weights)."""
    with pytest.raises(ValueError, match="channels >= 3"):
        torch.ops.spikingir.spike_conv2d_fwd_masks(_stray_bit_masks().bits, 3, W, None, 1, 1, 2.0)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_opcheck_masks(backend):
    name = "spike_conv2d_fwd_masks" + ("_triton" if backend == "triton" else "")
    w, b = conv_params(3, 70, 3)
    for rate, stride, bias, dense_rate in ((0.2, 1, True, 0.3), (0.6, 2, False, 2.0)):
        m = ops.SpikeMasks.from_dense(spikes(2, 70, 7, 9, rate=rate))
        torch.library.opcheck(getattr(torch.ops.spikingir, name).default,
                              (m.bits, 70, w, b if bias else None, stride, 1, dense_rate))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (7, 2, 3)])
def test_gpu_masks_input(backend, k, stride, padding):
    s = spikes(2, 70, 23, 19, rate=0.1, device="cuda")
    w, b = conv_params(33, 70, k, device="cuda")
    with torch.no_grad():
        out = ops.spike_conv2d(ops.SpikeMasks.from_dense(s), w, b, stride, padding,
                               backend=backend)
        ref = ops.spike_conv2d(s, w, b, stride, padding, backend=backend)
        into = torch.full((4, *out.shape[1:]), -1.0, device="cuda")
        ops.spike_conv2d(ops.SpikeMasks.from_dense(s), w, b, stride, padding, backend=backend,
                         out=into[1:3])
    check_conv(out, s, w, b, stride, padding, fixed_point=backend == "triton")
    assert torch.equal(out, ref)
    assert torch.equal(into[1:3], out) and bool((into[0] == -1).all())


@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_masks_input_into_out(backend):
    """out=: written into a slice of a larger tensor, the rest untouched, the
    same values as a fresh result."""
    s = spikes(4, 70, 9, 10, rate=0.2)
    w, b = conv_params(6, 70, 3)
    m = ops.SpikeMasks.from_dense(s)
    big = torch.full((7, 6, 5, 5), -7.0)
    with torch.no_grad():
        got = ops.spike_conv2d(m, w, b, 2, 1, backend=backend, out=big[2:6])
        ref = ops.spike_conv2d(m, w, b, 2, 1, backend=backend)
    assert got.data_ptr() == big[2:6].data_ptr()
    assert torch.equal(big[2:6], ref)
    assert bool((big[:2] == -7).all()) and bool((big[6:] == -7).all())


@pytest.mark.parametrize("out,exc,match", [
    (torch.zeros(2, 4, 6, 5), ValueError, r"shape \(2, 4, 6, 6\)"),
    (torch.zeros(2, 4, 6, 6, dtype=torch.float64), ValueError, "float32"),
    (torch.zeros(2, 4, 6, 12)[..., ::2], ValueError, "not contiguous"),
    ([0.0], TypeError, "out: expected None or a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["torch"] + CPU_FUSED)
def test_masks_bad_out(out, exc, match, backend):
    with torch.no_grad(), pytest.raises(exc, match=match):
        ops.spike_conv2d(M, W, padding=1, backend=backend, out=out)


def test_out_needs_masks_input():
    with pytest.raises(TypeError, match="SpikeMasks input"):
        ops.spike_conv2d(S, W, padding=1, out=torch.zeros(2, 4, 6, 6))


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_opcheck_masks_out(backend):
    name = "spike_conv2d_fwd_masks_out" + ("_triton" if backend == "triton" else "")
    w, b = conv_params(3, 70, 3)
    m = ops.SpikeMasks.from_dense(spikes(2, 70, 7, 9, rate=0.3))
    torch.library.opcheck(getattr(torch.ops.spikingir, name).default,
                          (m.bits, 70, w, b, 1, 1, 0.5, torch.empty(2, 3, 7, 9)))


@pytest.mark.skipif("cpp" not in CPU_FUSED, reason="spikingir._C not built")
def test_masks_chain_compiles_fullgraph():
    """emit="masks" -> SpikeMasks -> spike_conv2d(out=...) traces as one graph."""
    w, _ = conv_params(8, 16, 3)

    def f(x):
        m, _ = ops.mprn_multistep(x, 0.8, 0.6, emit="masks", backend="cpp")
        y = torch.empty(8, 8, 7, 8)
        ops.spike_conv2d(m[:3].flatten(0, 1), w, None, 1, 1, validate=False, backend="cpp",
                         out=y[:6])
        ops.spike_conv2d(m[3:].flatten(0, 1), w * 0.5, None, 1, 1, validate=False,
                         backend="cpp", out=y[6:])
        return y

    x = torch.randn(4, 2, 16, 7, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FUSED or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_second_device(backend):
    """Neuron masks -> spike_conv2d, forward and backward, on cuda:1 while cuda:0 is
    the current device: every kernel runs on the inputs' GPU."""
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 37, 13, 11, generator=g).to("cuda:1")
    w, b = conv_params(20, 37, 3, device="cuda:1")
    with torch.no_grad():
        m, _ = ops.if_multistep(x, 0.5, emit="masks", backend=backend)
        out = ops.spike_conv2d(m.flatten(0, 1), w, b, 1, 1, backend=backend)
    dense, _ = ops.if_multistep(x, 0.5, backend="torch")
    ref = F.conv2d(dense.flatten(0, 1).double(), w.double(), b.double(), 1, 1)
    assert out.device == x.device
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    s, _ = ops.if_multistep(xg, 0.5, backend=backend)
    ops.spike_conv2d(s.flatten(0, 1), wg, b, 1, 1, validate=False, backend=backend).sum().backward()
    assert wg.grad.device == x.device and xg.grad.device == x.device
    torch.cuda.synchronize(1)
