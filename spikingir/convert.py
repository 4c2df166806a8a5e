"""ANN -> SNN conversion (DESIGN.md section 5, steps 2-3).

``to_snn`` folds BatchNorm, calibrates one threshold per layer (or per channel)
from a high percentile of the ReLU activations on calibration images
(Rueckauer et al. 2017: robust to outliers, unlike the maximum), swaps each
ReLU for a fused IF or MPR neuron with that threshold, and adds the pixel
mapper and membrane-potential recycling read-out. The SNN takes and returns
images like the ANN.
"""
import copy

import torch
from torch import nn

from spikingir.models import AODNet, DnCNN, fold_batchnorm
from spikingir.models.spiking import SpikingAODNet, SpikingDnCNN, make_neuron

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
        out.append(torch.tensor(1.0) if row.numel() == 0
                   else _quantile(row, percentile / 100.0, generator).clamp_min(1e-3))
    return torch.stack(out) if per_channel else out[0]


@torch.no_grad()
def calibrate(ann, calib_images, percentile=99.9, per_channel=False, offsets=None):
    """Thresholds of the spiking layers of ``ann`` (a BN-free DnCNN or an
    AODNet): the ``percentile`` of each ReLU's activations on ``calib_images``
    (a [B, C, H, W] tensor or a list of [1, C, H, W] tensors); with ``offsets``
    (from :func:`calibrate_offsets`), of the activations less their offsets."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile: expected a value in (0, 100], got {percentile}")
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
    if isinstance(calib_images, torch.Tensor):
        calib_images = [calib_images]
    if not calib_images:
        raise ValueError("calib_images: expected at least one image")
    relus = _spiking_relus(ann)
    acts = [[] for _ in relus]
    hooks = [r.register_forward_hook(lambda m, i, o, k=k: acts[k].append(o.detach().float()))
             for k, r in enumerate(relus)]
    try:
        for img in calib_images:
            ann(img)
    finally:
        for h in hooks:
            h.remove()
    return acts


class _Tap(nn.Module):
    """Identity marker after a ReLU whose output a spiking layer replaces."""

    def forward(self, x):
        return x


def _spiking_relus(ann):
    """Modules whose outputs are the activations that neurons replace."""
    if isinstance(ann, DnCNN):
        return [m for m in ann.dncnn if isinstance(m, nn.ReLU)]
    if isinstance(ann, _AODTaps):
        return list(ann.taps)
    raise TypeError(_unsupported(ann))


def _unsupported(ann):
    return (f"to_snn: expected a DnCNN or AODNet, got {type(ann).__name__}; other networks can be "
            "built from spikingir.nn's layers (SeqToBatch, IFNeuron, MPRNeuron, SpikeConv2d)")


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
           reuse_alpha=0.75, offset_percentile="auto"):
    """Converts a trained DnCNN or AODNet into a spiking network.

    Args:
        ann: ``spikingir.models.DnCNN`` (BN or folded form) or ``AODNet``.
        calib_images: degraded inputs for threshold calibration, [B, C, H, W]
            or a list of [1, C, H, W] tensors.
        timesteps: T, the number of IF steps (MPRN adds the reuse step).
        neuron: ``"mprn"`` or ``"if"``.
        percentile: activation percentile that sets each threshold.
        per_channel: one threshold per channel instead of per layer.
        v0: initial membrane potential, ``"zero"`` or ``"half"`` (theta / 2).
        recycling: add the residual membrane potential to the read-out rate.
        backend: neuron backend (``"auto"``: the fastest available).
        offset_percentile: AOD-Net only: code each layer's activations less a DC
            offset, this low percentile of them (:func:`calibrate_offsets`); the
            convs reading the spikes add the offsets' contribution back
            (``SpikingAODNet``). ``"auto"`` (default): ``DEFAULT_OFFSET_PERCENTILE``
            for AOD-Net, None (no offsets) for DnCNN.

    Returns:
        ``SpikingDnCNN`` or ``SpikingAODNet`` (an ``nn.Module`` in eval mode).
    """
    if neuron not in ("if", "mprn"):
        raise ValueError(f"neuron: expected 'if' or 'mprn', got {neuron!r}")
    if v0 not in ("zero", "half"):
        raise ValueError(f"v0: expected 'zero' or 'half', got {v0!r}")
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps: expected an int >= 1, got {timesteps!r}")
    if offset_percentile == "auto":
        offset_percentile = DEFAULT_OFFSET_PERCENTILE if isinstance(ann, AODNet) else None
    ann = copy.deepcopy(ann).eval().float()
    if isinstance(ann, DnCNN):
        if offset_percentile is not None:
            raise ValueError("offset_percentile: for AOD-Net only (DnCNN's hidden activations are "
                             "zero often enough to need no offsets)")
        if ann.batchnorm:
            ann = fold_batchnorm(ann)
        thetas = calibrate(ann, calib_images, percentile, per_channel)
        convs = [copy.deepcopy(c) for c in ann.convs()]
        cls, extra = SpikingDnCNN, {}
    elif isinstance(ann, AODNet):
        offsets = (None if offset_percentile is None else
                   calibrate_offsets(ann, calib_images, offset_percentile, per_channel))
        thetas = calibrate(ann, calib_images, percentile, per_channel, offsets)
        convs = [copy.deepcopy(c) for c in ann.convs()]
        if offsets is not None:
            with torch.no_grad():
                for conv, m in zip(convs, offsets):  # conv1..conv4 now produce x - m
                    conv.bias -= m.expand_as(conv.bias)
            offsets = torch.cat([m.expand(conv.out_channels) for conv, m in zip(convs, offsets)])
        cls, extra = SpikingAODNet, {"offset": offsets}
    else:
        raise TypeError(_unsupported(ann))
    neurons = [make_neuron(neuron, th, num_channels=th.numel() if per_channel else None,
                           v_init=v0, backend=backend, surrogate=surrogate, alpha=alpha,
                           reuse_alpha=reuse_alpha) for th in thetas]
    return cls(convs, neurons, timesteps, neuron, recycling, **extra).eval()
