"""ANN -> SNN conversion (DESIGN.md section 5, steps 2-3).

``to_snn`` folds BatchNorm, calibrates one threshold per layer (or per channel)
from a high percentile of the ReLU activations on calibration images
(Rueckauer et al. 2017: robust to outliers, unlike the maximum), swaps each
ReLU for a fused IF or MPR neuron with that threshold, and adds the pixel
mapper and membrane-potential recycling read-out. The SNN takes and returns
images like the ANN.
"""
import copy
import functools
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spikingir.models import AODNet, ConvChain, DnCNN, Residual, conv_chain
from spikingir.models.graph import GraphNet, SpikingGraph, graph_net
from spikingir.models.spiking import (SpikingAODNet, SpikingChain, SpikingDnCNN, _per_channel,
                                      make_neuron)

#: AOD-Net's default DC-offset percentile (``to_snn(offset_percentile="auto")``).
#: Measured on the shipped AOD-Net, held-out SOTS scenes, T=10, before fine-tuning
#: (benchmarks/RESULTS.md): no offsets 17.65 dB / SSIM 0.709 / energy 1.085 of the
#: ANN; p0.1 18.67 / 0.804 / 0.808; p1 18.69 / 0.803 / 0.772.
DEFAULT_OFFSET_PERCENTILE = 1.0

#: Elements sampled per layer to estimate a percentile (torch.quantile's input limit is 2^24).
_MAX_SAMPLES = 1 << 22


def _rows(acts, per_channel):
    """One layer's activations (a list of [B, C, H, W] tensors) as rows to take
    percentiles of: one row per channel, or a single row."""
    x = torch.cat([a.transpose(0, 1).flatten(1) for a in acts], 1)  # [C, N]
    return x if per_channel else x.flatten()[None]


def _quantile(row, q, generator):
    """``torch.quantile(row, q)``, on ``_MAX_SAMPLES`` random elements of a longer row."""
    if row.numel() > _MAX_SAMPLES:
        row = row[torch.randint(row.numel(), (_MAX_SAMPLES,), generator=generator)]
    return torch.quantile(row, q)


def _percentile(acts, percentile, per_channel, generator):
    """``percentile`` of the positive activations in a list of [B, C, H, W]
    tensors, over everything or per channel (1 where none is positive)."""
    out = []
    for row in _rows(acts, per_channel):
        row = row[row > 0]
        out.append(row.new_tensor(1.0) if row.numel() == 0  # on the activations' device
                   else _quantile(row, percentile / 100.0, generator).clamp_min(1e-3))
    return torch.stack(out) if per_channel else out[0]


@torch.no_grad()
def calibrate(ann, calib_images, percentile=99.9, per_channel=False, offsets=None):
    """Thresholds of the spiking layers of ``ann`` (a DnCNN, an AODNet, a conv
    chain, :mod:`spikingir.models.chain`, or another CNN, in ReLU order in its
    traced graph, :mod:`spikingir.models.graph`; BatchNorm folded with its running
    statistics, as ``to_snn`` does, whatever ``ann.training`` is, and ``ann``
    left unchanged): the ``percentile`` of each ReLU's activations on ``calib_images``
    (a [B, C, H, W] tensor or a list of [1, C, H, W] tensors); with ``offsets``
    (from :func:`calibrate_offsets`), of the activations less their offsets."""
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or \
            not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a number in (0, 100], got {percentile!r}")
    acts = _activations(ann, calib_images)
    if offsets is not None:
        acts = [[(x - _per_channel_view(m)).clamp_min(0) for x in a] for a, m in zip(acts, offsets)]
    g = torch.Generator().manual_seed(0)
    return [_percentile(a, percentile, per_channel, g) for a in acts]


@torch.no_grad()
def calibrate_offsets(ann, calib_images, percentile=0.1, per_channel=False):
    """DC offsets of the spiking layers of ``ann``: the low ``percentile`` of each
    ReLU's activations, zeros included (so 0 for any channel that is zero more
    often than that), per channel or per layer. A channel that never reaches
    zero spends most of its spikes on a constant; ``to_snn(offset_percentile=)``
    codes the activation less this offset instead. Activations below their
    offset (``percentile`` % of them) are clipped to it."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile < 100:
        raise ValueError(f"offset percentile: expected a number in [0, 100), got {percentile!r}")
    out = []
    for a in _activations(ann, calib_images):
        g = torch.Generator().manual_seed(0)
        m = torch.stack([_quantile(r, percentile / 100.0, g) for r in _rows(a, per_channel)]).clamp_min(0)
        out.append(m if per_channel else m[0])
    return out


def _per_channel_view(m):
    return m.view(1, -1, 1, 1) if m.dim() == 1 else m


def _activations(ann, calib_images):
    """The ReLU outputs that neurons replace, per spiking layer: a list (one per
    layer) of lists of [B, C, H, W] tensors (one per calibration input)."""
    if isinstance(ann, AODNet):
        ann = _AODTaps(ann)
    elif _is_chain(ann):
        # BN folded into eval-mode float32 copies: a DnCNN in train mode would
        # calibrate on batch statistics and update the caller's running ones
        ann = conv_chain(ann)
    elif not isinstance(ann, (ConvChain, GraphNet, _AODTaps)):
        ann = _graph_net(ann)  # any other CNN, read through torch.fx
    relus = _spiking_relus(ann)  # first: a TypeError for another kind of network
    first = next(m for m in ann.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    channels = ann.in_channels if isinstance(ann, GraphNet) else first.in_channels
    images = _calib_inputs(calib_images, channels, first.weight.device)
    acts = [[] for _ in relus]
    hooks = [r.register_forward_hook(lambda m, i, o, k=k: acts[k].append(o.detach().float()))
             for k, r in enumerate(relus)]
    try:
        for img in images:
            ann(img)
    finally:
        for h in hooks:
            h.remove()
    return acts


def _calib_inputs(calib_images, channels, device):
    """``calib_images`` (a [B, C, H, W] tensor or a list of them) as a list of
    float32 tensors on ``device`` (where the network is), checked once (``channels``
    None: a network whose input channels no conv reads directly, any C)."""
    if isinstance(calib_images, (torch.Tensor, np.ndarray)):
        calib_images = [calib_images]
    calib_images = [torch.from_numpy(img) if isinstance(img, np.ndarray) else img
                    for img in calib_images]
    if not calib_images:
        raise ValueError("calib_images: expected at least one image")
    for img in calib_images:
        if (not isinstance(img, torch.Tensor) or img.dim() != 4
                or (channels is not None and img.shape[1] != channels) or img.shape[0] == 0):
            raise ValueError(f"calib_images: expected [B, {channels or 'C'}, H, W] tensors, got "
                             f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
        if not img.is_floating_point():
            # uint8 images unscaled would give thresholds ~255x too high
            raise TypeError(f"calib_images: expected float images in [0, 1] (as the ANN sees "
                            f"them), got {img.dtype}")
        if not bool(torch.isfinite(img).all()):
            raise ValueError("calib_images: found NaN or inf values; the thresholds are "
                             "percentiles of the activations these images cause")
    return [img.to(device, torch.float32) for img in calib_images]


class _Tap(nn.Module):
    """Identity marker after a ReLU whose output a spiking layer replaces."""

    def forward(self, x):
        return x


def _spiking_relus(ann):
    """Modules whose outputs are the activations that neurons replace."""
    if isinstance(ann, _AODTaps):
        return list(ann.taps)
    if isinstance(ann, (ConvChain, GraphNet)):
        return list(ann.relus)
    raise TypeError(_unsupported(ann))


def _unsupported(ann):
    return (f"to_snn: expected a DnCNN, an AODNet, an nn.Sequential of Conv2d / BatchNorm2d / ReLU "
            f"layers, spikingir.models.Residual around one, or another CNN nn.Module that "
            f"torch.fx traces (spikingir.models.graph); got {type(ann).__name__}. Other "
            "networks can be built from spikingir.nn's layers (SeqToBatch, IFNeuron, MPRNeuron, "
            "SpikeConv2d)")


#: torch.nn layers the graph conversion reads and the chain form never takes
_GRAPH_LAYERS = (nn.AvgPool2d, nn.Upsample, nn.ConvTranspose2d)


def _is_chain(ann):
    """Whether ``ann`` takes the conv-chain path: a DnCNN, or an ``nn.Sequential``
    of torch.nn layers (or a ``Residual`` around one, or around one layer). A
    Sequential holding blocks of the user's own (residual blocks: modules of no
    torch.nn class) or pooling, upsampling or transposed convs is a graph
    (:mod:`spikingir.models.graph`), which the chain form would refuse."""
    if isinstance(ann, DnCNN):
        return True
    if not isinstance(ann, (nn.Sequential, Residual)):
        return False
    body = ann.body if isinstance(ann, Residual) else ann
    return all(not isinstance(m, _GRAPH_LAYERS) and any(
        c is not nn.Module and c.__module__.startswith("torch.nn.") for c in type(m).__mro__)
        for m in body.modules())


def _graph_net(ann):
    """:func:`~spikingir.models.graph.graph_net` of a CNN of the user's; one
    torch.nn layer (a Conv2d, a ReLU) is no network to convert."""
    if type(ann).__module__.startswith("torch.nn.") and not isinstance(ann, nn.Sequential):
        raise TypeError(_unsupported(ann))
    return graph_net(ann)


def _check_traced(ann, net, calib_images):
    """Refuses a graph form ``net`` that does not compute what ``ann`` computes on
    the first calibration image. torch.fx records an augmented assignment on a
    traced tensor (``h += y``, ``h *= 2``) as ``h = h + y``: where another name
    still refers to the tensor (``skip = h`` before it), eager PyTorch changes
    that one too and the trace does not, so the conversion would silently be of
    another network. (Methods such as ``h.add_(y)`` are traced as in-place.)"""
    device = next(net.parameters()).device
    x = _calib_inputs(calib_images, net.in_channels, device)[0][:1]
    with torch.no_grad():
        want, got = ann(x.clone()), net(x.clone())  # clones: either may change its input
    # BN folded in float64 and rounded once: a float32 rounding apart, not more
    tol = 1e-4 * max(float(want.abs().max()), 1.0) if got.shape == want.shape else 0.0
    if got.shape != want.shape or float((got - want).abs().max()) > tol:
        diff = (f"max |difference| {float((got - want).abs().max()):.3g}"
                if got.shape == want.shape else f"shape {tuple(got.shape)}, not {tuple(want.shape)}")
        raise ValueError(f"to_snn: {type(ann).__name__}: its traced graph (torch.fx) computes "
                         f"something else than the network on a calibration image ({diff}). "
                         "torch.fx traces h += y (and -=, *=, /=) as h = h + y: an in-place update "
                         "that another name for the same tensor would see is lost; write "
                         "h = h + y (a new tensor) or h.add_(y) (in place) in forward")


class _AODTaps(nn.Module):
    """AOD-Net with taps on x1..x4 (its ReLU module is shared, so hook taps)."""

    def __init__(self, ann):
        super().__init__()
        self.ann = ann
        self.taps = nn.ModuleList(_Tap() for _ in range(4))

    def forward(self, x):
        a, r = self.ann, self.ann.relu
        x1 = self.taps[0](r(a.conv1(x)))
        x2 = self.taps[1](r(a.conv2(x1)))
        x3 = self.taps[2](r(a.conv3(torch.cat([x1, x2], 1))))
        x4 = self.taps[3](r(a.conv4(torch.cat([x2, x3], 1))))
        return a.conv5(torch.cat([x1, x2, x3, x4], 1))


def to_snn(ann, calib_images, timesteps, neuron="mprn", percentile=99.9, per_channel=False,
           v0="zero", recycling=True, backend="auto", surrogate="sigmoid", alpha=4.0,
           reuse_alpha=0.75, offset_percentile="auto", layer_calibration=None):
    """Converts a trained DnCNN, AODNet, conv chain or other CNN into a spiking network.

    Args:
        ann: ``spikingir.models.DnCNN`` (BN or folded form), ``AODNet``, or your
            own CNN as an ``nn.Sequential`` of ``Conv2d [BatchNorm2d] ReLU ...
            Conv2d`` (optionally in ``spikingir.models.Residual`` for a global
            skip ``x -/+ body(x)``; see :mod:`spikingir.models.chain`), or any
            other ``nn.Module`` that ``torch.fx`` traces, with skips,
            concatenations, pooling and upsampling (:mod:`spikingir.models.graph`
            lists what it converts; anything else is refused with the node named).
        calib_images: degraded inputs for threshold calibration, [B, C, H, W]
            or a list of [1, C, H, W] tensors.
        timesteps: T, the number of IF steps (MPRN adds the reuse step).
        neuron: ``"mprn"`` or ``"if"``.
        percentile: activation percentile that sets each threshold. Lower
            values clip more and quantise finer: more spikes, less loss (with
            ``layer_calibration="weights"``, 99 against 99.9: official DnCNN-S
            s25, Set12, T=10 loss 1.40 against 1.59 dB at 0.63 against 0.51 of
            the ANN's energy; at equal energy, 99.9 with more timesteps is ahead:
            T=12 1.30 dB at 0.60; benchmarks/RESULTS.md).
        per_channel: one threshold per channel instead of per layer.
        v0: initial membrane potential, ``"zero"`` or ``"half"`` (theta / 2).
            The defaults here (per layer, zero) are the plain conversion; the
            ``spikingir convert`` command's, per channel and half, convert
            better (benchmarks/RESULTS.md, conversion ablation).
        recycling: add the residual membrane potential to the read-out rate.
        backend: neuron backend (``"auto"``: the fastest available).
        surrogate, alpha: the neurons' surrogate gradient for fine-tuning
            (``spikingir.ops.surrogate``; sharpness ``alpha``).
        reuse_alpha: MPRN's reuse-step threshold fraction in (0.5, 1].
        offset_percentile: AOD-Net only: code each layer's activations less a DC
            offset, this low percentile of them (:func:`calibrate_offsets`); the
            convs reading the spikes add the offsets' contribution back
            (``SpikingAODNet``). ``"auto"`` (default): ``DEFAULT_OFFSET_PERCENTILE``
            for AOD-Net, None (no offsets) for DnCNN.
        layer_calibration: not for AOD-Net: after conversion, ``"bias"`` or
            ``"weights"`` runs :func:`calibrate_layers` with that method on
            ``calib_images`` at ``timesteps`` (None: thresholds only).

    Returns:
        ``SpikingDnCNN``, ``SpikingAODNet``, (for a conv chain) ``SpikingChain``
        or (another CNN) ``spikingir.models.graph.SpikingGraph``: an ``nn.Module``
        in eval mode that maps images like ``ann``.
    """
    if neuron not in ("if", "mprn"):
        raise ValueError(f"neuron: expected 'if' or 'mprn', got {neuron!r}")
    if v0 not in ("zero", "half"):
        raise ValueError(f"v0: expected 'zero' or 'half', got {v0!r}")
    if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral) or timesteps < 1:
        raise ValueError(f"timesteps: expected an int >= 1, got {timesteps!r}")
    timesteps = int(timesteps)
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann: expected a trained nn.Module, got {type(ann).__name__}")
    # the neurons' options, checked here rather than at the SNN's first forward
    from spikingir.ops.backends import BACKENDS
    from spikingir.ops.surrogate import SURROGATES
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate: expected one of {sorted(SURROGATES)}, got {surrogate!r}")
    a = torch.as_tensor(alpha, dtype=torch.float64) if isinstance(alpha, (int, float, torch.Tensor)) \
        else None
    if a is None or not bool(torch.isfinite(a).all() and (a > 0).all()):
        raise ValueError(f"alpha: expected a finite number > 0 (or a tensor of them), got {alpha!r}")
    if not isinstance(reuse_alpha, (int, float)) or not 0.5 < reuse_alpha <= 1:
        raise ValueError(f"reuse_alpha: expected a number in (0.5, 1], got {reuse_alpha!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if layer_calibration not in (None, "bias", "weights"):
        raise ValueError(f"layer_calibration: expected None, 'bias' or 'weights', got {layer_calibration!r}")
    if layer_calibration is not None and isinstance(ann, AODNet):
        raise ValueError("layer_calibration: not for AOD-Net (a converted AOD-Net already "
                         "matches its ANN: benchmarks/RESULTS.md)")
    if offset_percentile == "auto":
        offset_percentile = DEFAULT_OFFSET_PERCENTILE if isinstance(ann, AODNet) else None
    from spikingir.pipeline import ann_fingerprint
    ann = copy.deepcopy(ann).eval().float()
    fingerprint = ann_fingerprint(ann)
    if _is_chain(ann):
        if offset_percentile is not None:
            raise ValueError("offset_percentile: for AOD-Net only (DnCNN's hidden activations are "
                             "zero often enough to need no offsets)")
        chain = conv_chain(ann)  # BN folded, float32 copies
        thetas = calibrate(chain, calib_images, percentile, per_channel)
        convs = chain.convs()
        cls, extra = ((SpikingDnCNN, {}) if isinstance(ann, DnCNN) else
                      (SpikingChain, {"residual": chain.residual}))
    elif isinstance(ann, AODNet):
        offsets = (None if offset_percentile is None else
                   calibrate_offsets(ann, calib_images, offset_percentile, per_channel))
        thetas = calibrate(ann, calib_images, percentile, per_channel, offsets)
        # trainable like a conv chain's fresh convs, whatever the ANN's flags (a frozen
        # ANN's would leave fine-tuning only the neurons, silently)
        convs = [copy.deepcopy(c).requires_grad_(True) for c in ann.convs()]
        if offsets is not None:
            with torch.no_grad():
                for conv, m in zip(convs, offsets):  # conv1..conv4 now produce x - m
                    conv.bias -= m.expand_as(conv.bias)
            offsets = torch.cat([m.expand(conv.out_channels) for conv, m in zip(convs, offsets)])
        cls, extra = SpikingAODNet, {"offset": offsets}
    else:  # any other CNN, read through torch.fx (spikingir.models.graph)
        if offset_percentile is not None:
            raise ValueError("offset_percentile: for AOD-Net only")
        net = _graph_net(ann)  # BN folded, float32 copies
        _check_traced(ann, net, calib_images)
        thetas = calibrate(net, calib_images, percentile, per_channel)
        convs, cls, extra = net, SpikingGraph, {}
    neurons = [make_neuron(neuron, th, num_channels=th.numel() if per_channel else None,
                           v_init=v0, backend=backend, surrogate=surrogate, alpha=alpha,
                           reuse_alpha=reuse_alpha) for th in thetas]
    snn = cls(convs, neurons, timesteps, neuron, recycling, **extra).eval()
    snn.meta["ann_fingerprint"] = fingerprint  # save_snn records it: evaluations can check the ANN
    if layer_calibration is not None:
        calibrate_layers(snn, ann, calib_images, method=layer_calibration)
    return snn


#: ``calibrate_layers`` defaults, chosen on the official DnCNN-S s25 weights (Set12
#: 96x96 crops, T=10 and 5, MPRN, 8 Train400 calibration crops; benchmarks/RESULTS.md:
#: target floors 0 / 0.1 / 0.3 / 0.6 / none gave T=10 losses 1.85 / 1.58 / 1.47 / 1.46 / 1.49 dB).
_RIDGE = 1e-3
_TARGET_FLOOR = 0.3


def _fit_conv(conv, inputs, targets, ridge):
    """Sets ``conv``'s weight and bias to the ridge least-squares fit of
    ``conv(x) ~ z`` over all output pixels of the pairs (x, z) in
    ``inputs``/``targets`` ([B, Cin, H, W] / [B, Cout, H', W'] tensors):
    ``[W b] = (A^T A + lambda I)^-1 A^T Z`` with A the im2col rows of x plus a
    column of ones and lambda = ``ridge`` x the mean of diag(A^T A). Accumulated in
    float64 over the pairs, so any number of images of any size fits in memory."""
    k, pad, stride, dilation = conv.kernel_size, conv.padding, conv.stride, conv.dilation
    n = conv.in_channels * k[0] * k[1] + 1
    gram = torch.zeros(n, n, dtype=torch.float64, device=conv.weight.device)
    rhs = torch.zeros(n, conv.out_channels, dtype=torch.float64, device=conv.weight.device)
    for x, z in zip(inputs, targets):
        cols = F.unfold(x, k, dilation=dilation, padding=pad, stride=stride)  # [B, Cin*k*k, L]
        a = torch.cat([cols.transpose(1, 2).flatten(0, 1),
                       cols.new_ones(cols.shape[0] * cols.shape[2], 1)], 1).double()
        gram += a.T @ a
        rhs += a.T @ z.permute(0, 2, 3, 1).flatten(0, 2).double()
    lam = ridge * gram.diagonal().mean()
    sol = torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device), rhs)
    conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
    conv.bias.copy_(sol[-1].to(conv.bias.dtype))


@torch.no_grad()
def calibrate_layers(snn, ann, calib_images, method="weights", bias_iters=4, ridge=_RIDGE,
                     target_floor=_TARGET_FLOOR):
    """Layer-wise post-conversion calibration of a converted DnCNN, conv chain or other
    CNN (:mod:`spikingir.models.graph`), in place
    (after Li et al. 2021, "A free lunch from ANN: towards efficient, accurate
    spiking neural networks calibration"; no backpropagation through time).

    Layer by layer, in order, on ``calib_images`` (the ANN's inputs), each
    spiking layer is made to reproduce its ANN activation ``a = ReLU(z)`` while
    it is fed the spikes the calibrated layers below it actually emit, so the
    errors they make are corrected above them:

    - ``method="bias"``: per-channel bias correction. The conv feeding the layer
      gets the bias shift that makes the mean of its rate ``r`` (``sum_t y[t] / T``;
      with recycling at the last layer) over images and pixels equal the mean of
      ``a``: ``bias_iters`` Newton steps on ``mean(a - r)`` (the rate responds to
      the bias nonlinearly: clipping at 0, whole spikes).
    - ``method="weights"``: first a ridge least-squares fit of that conv's
      weights and bias to ``conv(r_below) ~ max(z, -target_floor * theta)`` (the
      rates below it, not the ANN's activations, are its inputs: the fit
      undoes part of their quantisation error; pre-activations far below zero
      only need to stay below zero, hence the floor), then the bias correction.
      The pixel mapper is fitted the same way to the ANN's output conv.

    The first conv sees the image, as in the ANN, so it only gets the bias
    correction. ``snn`` is the ``SpikingDnCNN`` (or ``SpikingChain``, or
    ``SpikingGraph``) that ``to_snn`` made of ``ann`` (same layers; where the SNN
    records the ANN's fingerprint, the same weights too; for a graph SNN also the
    ``GraphNet`` of it); it is calibrated at its ``timesteps`` and returned.

    A graph SNN (skips, concatenations, pooling, upsampling) is calibrated neuron
    layer by neuron layer in graph order. A layer's input current is a linear
    expression of conv outputs and other values (``h + conv(y)``, a
    concatenation of convs, ...). The convs calibrated there are the ones whose
    outputs reach it through linear ops only and that nothing below has read
    yet (a conv feeding two layers is calibrated for the first). Such a conv ``u``
    that enters channels ``[o, o + C_u)`` of the current as ``alpha * u`` plus other
    terms (``+``, ``-``, ``*`` and ``/`` by numbers, ``cat``) is fitted as above to
    ``(max(z, floor) - rest) / alpha``, ``rest`` the other terms computed from the
    SNN's rates (so a skip's quantisation error is corrected by the conv beside
    it); several such convs on the same channels are fitted one after another,
    each given the others. Its bias is then corrected, each channel of the
    current by one conv. Bias correction only: a conv that reads the input, a
    grouped or transposed conv (a BatchNorm that is not after a conv is a
    grouped 1x1 conv), and one whose output is pooled or upsampled on the way
    (a per-channel shift passes through, the pixels do not). The read-out convs
    (``snn.mapper``) are fitted in the same way to the ANN's output (with
    ``"weights"`` only; one that cannot be fitted gets the mean error's bias
    shift). Other convs are kept, and so is a conv called at several nodes
    (tied weights): fitting it for one call site would change the others.
    ``snn.meta["calibrated_layers"]`` then says what happened to each conv, by
    node name (``spikingir convert`` saves it in the file).
    Measured (benchmarks/RESULTS.md, official DnCNN-S s25, per-channel thresholds,
    Set12 crops): PSNR loss at T=10 3.17 dB converted, 2.71 with ``bias``, 1.47
    with ``weights`` (T=5: 4.90, 4.42, 3.32), in 81 s on 2 CPU cores.
    """
    if method not in ("bias", "weights"):
        raise ValueError(f"method: expected 'bias' or 'weights', got {method!r}")
    if not isinstance(bias_iters, int) or bias_iters < 0:
        raise ValueError(f"bias_iters: expected an int >= 0, got {bias_iters!r}")
    if isinstance(snn, SpikingGraph):
        net = _graph_of(snn, ann)
        if net is not ann:  # a GraphNet's state dict is not the network's it was made of
            _check_fingerprint(snn, ann)
        device = next(snn.parameters()).device
        images = _calib_inputs(calib_images, snn.in_channels, device)
        with snn.kept_spike_conv():
            snn.use_spike_conv(False)  # the convs read theta * s: rates in activation units
            report = _calibrate_graph(snn, net.to(device), images, method, bias_iters, ridge,
                                      target_floor)
        snn.meta["calibrated_layers"] = report
        return snn
    if not isinstance(snn, SpikingChain):
        raise TypeError(f"calibrate_layers: expected a SpikingDnCNN, SpikingChain or SpikingGraph "
                        f"(from to_snn), got {type(snn).__name__}; a converted AOD-Net already "
                        "matches its ANN (benchmarks/RESULTS.md)")
    if not isinstance(ann, (DnCNN, nn.Sequential, Residual)):
        raise TypeError(f"calibrate_layers: expected the DnCNN or conv chain the SNN was converted "
                        f"from, got {type(ann).__name__}")
    ann_convs = conv_chain(ann).convs()  # BN folded, float32 copies
    if len(ann_convs) != len(snn.neurons_) + 1 or any(
            a.weight.shape != c.weight.shape or a.stride != c.stride or a.padding != c.padding
            for a, c in zip(ann_convs, snn.convs())):
        raise ValueError("calibrate_layers: the ANN's convolutions do not match the SNN's "
                         "(another depth, width or geometry): pass the network it was converted "
                         "from")
    _check_fingerprint(snn, ann)
    device = snn.conv1.weight.device
    images = _calib_inputs(calib_images, snn.conv1.in_channels, device)
    ann_convs = [c.to(device) for c in ann_convs]
    with snn.kept_spike_conv():
        snn.use_spike_conv(False)  # neurons emit theta * s: rates in activation units
        _calibrate_chain(snn, ann_convs, images, method, bias_iters, ridge, target_floor)
    return snn


def _calibrate_chain(snn, ann_convs, images, method, bias_iters, ridge, target_floor):
    last = len(snn.neurons_) - 1
    convs = snn.convs()
    h = images  # the ANN's activations below the current layer, per image
    currents = [snn.conv1(x).unsqueeze(0).expand(snn.steps, -1, -1, -1, -1) for x in images]
    rates = spikes = None  # the SNN's rates / outputs of the layer below, per image
    for i, neuron in enumerate(snn.neurons_):
        z = [ann_convs[i](a) for a in h]  # ANN pre-activations
        if i > 0:  # the currents from the spikes below, through the (fitted) conv
            if method == "weights":
                floor = -target_floor * _per_channel(neuron.effective_theta().detach())
                _fit_conv(convs[i], rates, [torch.maximum(zi, floor) for zi in z], ridge)
            currents = [snn.hidden[i - 1](y) for y in spikes]

        layer_outputs = functools.partial(_layer_outputs, snn, neuron, i == last)  # last: recycles
        spikes, rates = map(list, zip(*_correct_bias(_shift_bias(convs[i]), currents,
                                                     layer_outputs, z, bias_iters)))
        h = [torch.relu(zi) for zi in z]
    if method == "weights":
        _fit_conv(convs[-1], rates, [ann_convs[-1](a) for a in h], ridge)


def _shift_bias(conv):
    """``_correct_bias``'s ``move`` where ``conv`` alone makes the currents (a chain's
    layer): its bias and the currents move by the same per-channel shift."""
    def move(currents, delta):
        conv.bias += delta
        return [cur + delta.view(1, 1, -1, 1, 1) for cur in currents]
    return move


def _layer_outputs(snn, neuron, read_out, currents):
    """(spikes, rate) of ``neuron`` on each image's ``currents`` (the calibration's
    layer runs); a read-out layer's rate recycles its residual, read from the
    neuron's state right after that image's run."""
    out = []
    for cur in currents:
        v_final = []
        y = neuron(cur, v_final_out=v_final)
        out.append((y, snn._rate(neuron, y, v_final[0]) if read_out else y.sum(0) / snn.timesteps))
    return out


def _correct_bias(move, currents, layer_outputs, z, iters):
    """Shifts the bias of the conv(s) feeding a layer per channel until the mean
    rate of the layer equals the mean of ``ReLU(z)`` over all images and pixels;
    returns the layer's (y, rate) per image at the chosen shift. ``move(currents,
    delta)`` shifts the biases so that channel c of the layer's input current
    moves by ``delta[c]``, and returns the moved ``currents``.

    Newton steps on the per-channel error: d(mean rate)/d(bias) is first the
    ANN's (its fraction of active pixels), then the secant of the last step; a
    channel active at few pixels moves little per unit of bias, so a plain
    ``b += error`` would crawl. The mean rate is a step function of the bias
    (spikes are whole), so each channel keeps the shift with the smallest error."""
    pixels = sum(zi.numel() // zi.shape[1] for zi in z)
    target = sum(torch.relu(zi).sum((0, 2, 3)) for zi in z) / pixels
    gain = sum((zi > 0).sum((0, 2, 3)) for zi in z).float() / pixels
    shift = torch.zeros_like(target)
    best_err, best_shift = torch.full_like(target, float("inf")), shift

    def moved_by(delta):
        return move(currents, delta)

    out = layer_outputs(currents)
    for it in range(iters + 1):
        mean = sum(r.sum((0, 2, 3)) for _, r in out) / pixels
        err = target - mean
        better = err.abs() < best_err
        best_err = torch.where(better, err.abs(), best_err)
        best_shift = torch.where(better, shift, best_shift)
        if it == iters:
            break
        if it > 0:
            moved = step.abs() > 1e-12
            gain = torch.where(moved, (mean - previous) / torch.where(moved, step, 1), gain)
        step = err / gain.clamp(0.05, 2.0)
        shift, previous = shift + step, mean
        currents = moved_by(step)
        out = layer_outputs(currents)
    if not torch.equal(best_shift, shift):
        out = layer_outputs(moved_by(best_shift - shift))
    return out


def _check_fingerprint(snn, ann):
    """Refuses an ``ann`` of the right layers but other weights than the ANN that
    ``snn`` records it was converted from (``meta["ann_fingerprint"]``, set by
    ``to_snn``): calibrating towards another network's activations would quietly
    make the SNN a worse copy of both."""
    from spikingir.pipeline import ann_fingerprint
    recorded = snn.meta.get("ann_fingerprint")
    if recorded is not None and recorded != ann_fingerprint(ann):
        raise ValueError("calibrate_layers: the ANN has the SNN's layers but other weights than "
                         "the ANN it was converted from (its fingerprint, over the weights and "
                         "their state-dict names, differs): pass the network it was converted "
                         "from, in the same form (e.g. the DnCNN, not an nn.Sequential copy)")


def _graph_of(snn, ann):
    """The :class:`GraphNet` of ``ann`` (BN folded, float32 copies), refused unless it
    is the network of ``snn`` (a SpikingGraph): the same traced ops and convs."""
    from spikingir.models.graph import graph_config
    if not isinstance(ann, nn.Module):
        raise TypeError(f"calibrate_layers: expected the nn.Module the SNN was converted from, "
                        f"got {type(ann).__name__}")
    net = ann if isinstance(ann, GraphNet) else _graph_net(ann)
    if graph_config(net) != graph_config(snn):
        raise ValueError(f"calibrate_layers: the ANN's traced graph ({type(ann).__name__}: its "
                         "ops and convolutions) does not match the SNN's: pass the network it "
                         "was converted from")
    return net


_SIZE_KINDS = ("shape", "item", "size_arith")


def _graph_targets(net, images):
    """Per image, the ANN's pre-activations at each ReLU (a list per neuron layer)
    and its output; and every tensor node's [C, H, W] (of the first image)."""
    zs, outs, shapes = [[] for _ in net.relus], [], {}
    for k, x in enumerate(images):
        env = net.node_values(x)
        for name, kind, args, info in net.program:
            if kind == "output":
                outs.append(env[name])
            elif kind == "relu":
                zs[info].append(env[args[0].name])
        if k == 0:
            shapes = {n: tuple(v.shape[1:]) for n, v in env.items() if isinstance(v, torch.Tensor)}
    return zs, outs, shapes


def _graph_value(snn, name, env):
    """Node ``name`` of ``snn``'s program on the values in ``env`` (node -> ``_Value``),
    as ``SpikingGraph.forward`` computes it: per step ([steps, B, C, H, W]) when a
    value it reads is per step, else once (static values; rates); a static conv
    as the input current."""
    from spikingir.models.graph import _apply, _resolve, _size_op, _Value
    st = snn._structure
    _, kind, args, info = st.ops[name]
    vals = _resolve(args, env)
    if kind in _SIZE_KINDS:
        return _size_op(kind, vals, info, lambda v: v.shape)
    info = _resolve(info, env)
    tensors = [v for v in (vals[0] if kind == "cat" else vals) if isinstance(v, _Value)]
    seq = any(v.seq for v in tensors)
    if kind == "cat":
        return _Value(torch.cat([v.t.expand(snn.steps, *v.t.shape) if seq and not v.seq else v.t
                                 for v in vals[0]], 2 if seq else 1), seq)
    if kind in ("add", "sub", "mul", "div"):  # a static value broadcasts over the steps
        a, b = (v.t if isinstance(v, _Value) else v for v in vals)
        return _Value(_apply(kind, None, (a, b), None), seq)
    x = vals[0].t
    flat = x.flatten(0, 1) if seq else x
    if kind == "conv":
        conv = snn.layers[name]
        out = (snn._input_current(flat, conv) if name in st.static and type(conv) is nn.Conv2d
               else conv(flat))
    else:  # avgpool, upsample
        out = _apply(kind, None, (flat,), info)
    return _Value(out.unflatten(0, x.shape[:2]) if seq else out, seq)


def _ensure(snn, envs, names):
    """Computes the nodes ``names`` and the ones they need that are missing, in
    program order, in every image's ``env`` (neuron outputs are there already)."""
    st, need, todo = snn._structure, set(), list(names)
    while todo:
        n = todo.pop()
        if n in need or n in envs[0]:
            continue
        assert st.ops[n][1] != "relu", n  # neurons run in graph order, before their readers
        need.add(n)
        todo += st.deps(n)
    for n in st.order:
        if n in need:
            for env in envs:
                env[n] = _graph_value(snn, n, env)


def _merge(parts):
    """How ``u`` enters a sum or concatenation (see :func:`_reach`) from its parts'."""
    hits = [p for p in parts if p != 0]
    if not hits:
        return 0
    if any(p is None for p in hits) or len({p[1] for p in hits}) > 1:
        return None
    alpha = sum(p[0] for p in hits)
    return None if alpha == 0 else (alpha, hits[0][1], all(p[2] for p in hits))


def _reach(st, top, u, cone, shapes):
    """How conv node ``u`` enters node ``top`` through the linear ops of ``cone``:
    ``(alpha, offset, exact)`` when channels ``offset .. offset + C_u`` of ``top``
    are ``alpha * u`` plus terms without ``u`` (``exact``: through +, -, * and / by
    numbers and cat only; else an avgpool or upsample lies between, which moves a
    per-channel constant as it is but mixes pixels); 0 when ``u`` does not reach
    ``top``; None otherwise (at two channel offsets, broadcast, scaled by a size)."""
    from spikingir.models.graph import _is_number, _Ref
    memo = {}

    def tensor(a):
        return isinstance(a, _Ref) and st.ops[a.name][1] not in _SIZE_KINDS

    def walk(n):
        if n == u:
            return (1.0, 0, True)
        if n not in cone:
            return 0
        if n not in memo:
            _, kind, args, _ = st.ops[n]
            if kind in ("add", "sub"):
                parts = []
                for j, a in enumerate(args):
                    m = walk(a.name) if tensor(a) else 0
                    if m and shapes.get(a.name) != shapes.get(n):
                        m = None  # broadcast over channels or pixels
                    parts.append((-m[0], m[1], m[2]) if m and kind == "sub" and j == 1 else m)
                r = _merge(parts)
            elif kind in ("mul", "div"):
                t, k = args if tensor(args[0]) else args[::-1]
                m = walk(t.name)
                r = (m if not m else None if not _is_number(k) else
                     (m[0] * (k if kind == "mul" else 1.0 / k), m[1], m[2]))
            elif kind == "cat":
                parts, off = [], 0
                for a in args[0]:
                    m = walk(a.name)
                    parts.append(m and (m[0], m[1] + off, m[2]))
                    off += shapes[a.name][0]
                r = _merge(parts)
            else:  # avgpool, upsample
                m = walk(args[0].name)
                r = m and (m[0], m[1], False)
            memo[n] = r
        return memo[n]

    return walk(top)


def _feeders(st, top, done, shapes, readers):
    """The convs that make node ``top`` (a neuron layer's input current, or the
    output) and can be calibrated for it. Returns ``(late, fresh, cone)``:
    ``cone``, the nodes between ``top`` and the convs, neurons and input it is a
    linear expression of; ``fresh``, ``[(conv, how it enters top: see _reach)]``
    for the convs of that boundary that nothing computed so far (``done``) reads,
    directly or through other nodes, and whose outputs reach nothing but the cone
    on the way to ``top`` (changing them changes nothing below); ``late``, the
    fresh convs and the cone nodes after them, in program order, computed once
    they are calibrated."""
    cone, bound, todo = set(), set(), [top]
    while todo:
        n = todo.pop()
        if n in cone or n in bound:
            continue
        if st.ops[n][1] in ("conv", "relu", "input") + _SIZE_KINDS or n in done:
            bound.add(n)
        else:
            cone.add(n)
            todo += st.deps(n)
    need, todo = set(), [top]  # what computing top needs
    while todo:
        n = todo.pop()
        if n not in need and n not in done and st.ops[n][1] != "relu":
            need.add(n)
            todo += st.deps(n)
    fresh, late = [], set()
    for u in (n for n in st.order if n in bound and n not in done and st.ops[n][1] == "conv"):
        after, todo = set(), [u]
        while todo:
            for r in readers[todo.pop()]:
                if r in need and r not in after:
                    after.add(r)
                    todo.append(r)
        if after <= cone:
            fresh.append((u, _reach(st, top, u, cone, shapes)))
            late |= after | {u}
    return [n for n in st.order if n in late], fresh, cone


def _calibrate_graph(snn, net, images, method, bias_iters, ridge, target_floor):
    """:func:`calibrate_layers` of a ``SpikingGraph`` (see there); returns what was
    done to each conv. Two environments per image follow the SNN: ``seq``, every
    node's value as the SNN computes it (per step, or once for static nodes), and
    ``rates``, the values on the neurons' rates (``sum_t y[t] / T``), the ANN's
    computation on what the SNN's layers emit: the fits' inputs and other terms."""
    from spikingir.models.graph import _Value
    st, T, S = snn._structure, snn.timesteps, snn.steps
    zs, outs, shapes = _graph_targets(net, images)
    readers = {n: [] for n in st.order}
    for m in st.order:
        for d in set(st.deps(m)):
            readers[d].append(m)
    per_step = {n: [m for m in rs if m in st.seq or m in st.static or st.ops[m][1] == "relu"]
                for n, rs in readers.items()}
    source = next(n for n in st.order if st.ops[n][1] == "input")
    seq = [{source: _Value(x)} for x in images]
    rates = [{source: _Value(x)} for x in images]
    readout = [{} for _ in images]  # the read-out neurons' rates (recycling included)
    done = {source}  # nodes computed: their convs are fixed from then on
    report = {n: "kept (no neuron or output reads it through linear ops only)" for n in snn.layers}
    # tied weights (one layer called at several nodes): a fit or a bias move made
    # for one call site would change the others' values behind the calibration's
    # back (already computed ones, or a second term of the same sum), so such a
    # layer keeps its converted weights
    sites = {}
    for n in snn.layers:
        sites.setdefault(id(snn.layers[n]), []).append(n)
    tied = {n: s for s in sites.values() if len(s) > 1 for n in s}
    for n, s in tied.items():  # whether or not a neuron or the output reads it
        report[n] = f"kept (tied weights, also called at {', '.join(m for m in s if m != n)})"

    def fit(top, goal, late, fresh, cone, envs):
        """Fits the fresh convs that can be fitted to ``goal`` (per image, top's
        target), one after another, each given the others (``envs``: the rates)."""
        late_cone = [n for n in late if n in cone]
        _ensure(snn, envs, {d for n in late for d in st.deps(n)} - set(late))
        fitted = []
        for u, how in fresh:
            conv = snn.layers[u]
            if (how and how[2] and u not in st.static and type(conv) is nn.Conv2d
                    and conv.groups == 1 and u not in tied):
                alpha, off = how[0], how[1]
                ch = slice(off, off + conv.out_channels)
                targets = []
                for env, g in zip(envs, goal):
                    if u == top:  # the conv alone: its target is top's, as in the chain
                        targets.append(g)
                        continue
                    tmp = dict(env)
                    for f, _ in fresh:
                        tmp[f] = _graph_value(snn, f, tmp)
                    tmp[u] = _Value(torch.zeros_like(tmp[u].t))
                    for n in late_cone:
                        tmp[n] = _graph_value(snn, n, tmp)
                    targets.append((g[:, ch] - tmp[top].t[:, ch]) / alpha)
                _fit_conv(conv, [env[st.ops[u][2][0].name].t for env in envs], targets, ridge)
                fitted.append(u)
        return fitted

    for i, relu in enumerate(st.relus):
        neuron, top = snn.neurons_[i], st.ops[relu][2][0].name
        late, fresh, cone = _feeders(st, top, done, shapes, readers)
        _ensure(snn, seq, [n for n in st.deps(relu) if n not in late] +
                [d for n in late for d in st.deps(n) if d not in late])
        fitted = []
        if method == "weights" and any(how for _, how in fresh):
            floor = -target_floor * _per_channel(neuron.effective_theta().detach())
            fitted = fit(top, [torch.maximum(z, floor) for z in zs[i]], late, fresh, cone, rates)
        for n in late:
            for env in seq:
                env[n] = _graph_value(snn, n, env)
        done.update(n for n in seq[0])
        # bias correction: each channel of the current moved by the first fresh conv on it
        moves, taken = [], torch.zeros(shapes[top][0], dtype=torch.bool)
        for u, how in fresh:
            if u in tied:  # reported above
                continue
            if not how:
                report[u] = "kept (reaches the neuron layer other than per channel)"
                continue
            alpha, off = how[0], how[1]
            c_u = snn.layers[u].out_channels
            free = ~taken[off:off + c_u]
            taken[off:off + c_u] = True
            ch = torch.nonzero(free).flatten().to(snn.layers[u].bias.device)
            if len(ch) == 0:  # a sum of convs: the bias of the first one moves
                report[u] = "weights" if u in fitted else "kept (another conv's bias moves)"
                continue
            moves.append((u, alpha, ch + off, ch))
            kind = "transposed" if isinstance(snn.layers[u], nn.ConvTranspose2d) else "grouped"
            report[u] = ("weights, bias" if u in fitted else "bias" if method == "bias" else
                         "bias (reads the input)" if u in st.static else
                         "bias (pooled or upsampled on the way)" if not how[2] else
                         f"bias ({kind} conv)")
        late_cone = [n for n in late if n in cone]

        def currents():
            return [v.t if v.seq else v.t.unsqueeze(0).expand(S, *v.t.shape)
                    for v in (env[top] for env in seq)]

        def move(_, delta):
            for u, alpha, ch_top, ch_u in moves:
                d = delta.new_zeros(snn.layers[u].out_channels)
                d[ch_u] = delta[ch_top] / alpha
                snn.layers[u].bias += d
                for env in seq:
                    v = env[u]
                    env[u] = _Value(v.t + d.view(-1, 1, 1), v.seq)
            for n in late_cone:
                for env in seq:
                    env[n] = _graph_value(snn, n, env)
            return currents()

        layer_outputs = functools.partial(_layer_outputs, snn, neuron, relu in st.readout)
        result = (_correct_bias(move, currents(), layer_outputs, zs[i], bias_iters) if moves
                  else layer_outputs(currents()))
        for k, (y, r) in enumerate(result):
            seq[k][relu] = _Value(y, True)
            rates[k][relu] = _Value(y.sum(0) / T)
            if relu in st.readout:
                readout[k][relu] = _Value(r)
        done.add(relu)
        for env in rates:  # values on the rates of convs that have moved since
            for n in late:
                env.pop(n, None)
        for n in [n for n, v in seq[0].items()  # per-step values nothing will read again
                  if getattr(v, "seq", False) and all(r in done for r in per_step[n])]:
            for env in seq:
                del env[n]

    # the read-out: computed once on the read-out neurons' rates, fitted to the ANN's output
    envs = [{**{n: v for n, v in s.items() if n in st.static and isinstance(v, _Value)}, **r}
            for s, r in zip(seq, readout)]
    late, fresh, cone = _feeders(st, st.output, done | set(envs[0]), shapes, readers)
    fitted = fit(st.output, outs, late, fresh, cone, envs) if method == "weights" else []
    for u, how in fresh:
        if u in tied:  # reported above
            continue
        if u in st.static:
            report[u] = "kept (a read-out conv of the input, as the ANN's)"
        elif method == "bias":
            report[u] = "kept (read-out: fitted by method 'weights' only)"
        elif u in fitted:
            report[u] = "weights (read-out)"
        elif how:  # the bias shift that zeroes the mean error of its channels
            alpha, off = how[0], how[1]
            ch = slice(off, off + snn.layers[u].out_channels)
            tmp = [dict(env) for env in envs]
            for n in late:
                for env in tmp:
                    env[n] = _graph_value(snn, n, env)
            err = sum((o - env[st.output].t)[:, ch].sum((0, 2, 3)) for o, env in zip(outs, tmp))
            pixels = sum(o[:, ch].numel() // o[:, ch].shape[1] for o in outs)
            snn.layers[u].bias += err / pixels / alpha
            report[u] = "bias (read-out)"
        else:
            report[u] = "kept (reaches the output other than per channel)"
    return report
