"""Energy model of the paper (DESIGN §5, "Energy").

ANN: conv MACs only (no ReLU, BN, additions or the AOD-Net formula), one full
image, ``E_ANN = E_MAC_PJ * MACs`` (a ``ConvTranspose2d``, in a U-Net, counts
``input elements x (Cout / groups) x kh x kw``). With every ``nn.Conv2d`` counted (AOD-Net's
1x1 conv1 included) this reproduces the paper's figures exactly:

- DnCNN-17 on 481x321 (BSD68 size): 85,555,446,912 MACs -> 393.555 mJ
- AOD-Net on 640x480: 536,371,200 MACs -> 2.467 mJ (without conv1: 2.455 mJ, which
  does not match, so the paper counted the 1x1 conv too).

SNN: ``E_SNN = E_MAC_PJ * MACs(first layer) + E_SOP_PJ * SOPs``: the analog
input image enters the first conv as a constant current (computed once, so its
MACs are counted once), every later layer is driven by binary spikes and costs
one accumulate per synapse a spike reaches.

``SOPs(l) = spikes into layer l x fan-out(l)``. The fan-out of a conv at an
interior pixel is::

    conv_fanout(conv) = (Cout / groups) * kh * kw          (stride 1)

A spike of input channel ci reaches the Cout/groups output channels of its group
at each of the kh*kw output positions whose receptive field covers it
(dilation does not change the count). Near the border fewer positions exist
(zero padding is outside the image, so nothing is computed there).

What is reported (``snn.energy_mj()``, ``snn_energy_mj(snn, image)`` and so
``spikingir evaluate``) counts **each spike's own fan-out**, border included:
``conv_sops(conv, spikes)`` on the spikes of all T (+1) steps, the MPRN reuse
step's and those into the pixel mapper included. ``spikes x conv_fanout``
overcounts that by the border pixels' missing share, ~(2/H + 2/W)/3 for a 3x3
conv: 0.35 % on 481x321, 0.5 % on 256x256, 1.4 % on 96x96 crops (measured on the
s25 SNN's spikes); the differentiable fine-tuning estimate (``track_energy``)
counts spikes x ``conv_mean_fanout`` (the same where the stride divides the kernel). Besides the first layer, two analog inputs are
counted as MACs at 4.6 pJ, once per image: the read-out of a network with
membrane potential recycling (the mapper conv applied to the recycled
residual, ``v_res / T`` is not a spike: its full MACs), and AOD-Net's DC-offset
corrections ``conv(m)`` in the border band where they differ from a bias
(DESIGN's formula names neither: without them the DnCNN s25 SNN on a 256x256
Set12 image at T=10 would read 0.2 % lower, AOD-Net's SNN on 620x460 ~5 %
lower). With stride s > 1 the number of outputs a spike reaches depends on its
position (kh*kw/s^2 on average), so ``conv_fanout`` refuses strides that do not
divide the kernel and returns the exact ``(Cout/groups) * (kh/sh) * (kw/sw)``
when they do; ``conv_sops`` is exact for any stride.

A converted graph (``spikingir.models.graph.SpikingGraph``: skips, pooling,
concatenations) extends this: every conv that depends on the image through
linear ops only counts its MACs once (the first layer's rule), a conv fed by
spikes (a neuron layer's, concatenated, nearest-upsampled, times a number, summed
with another layer's, or averaged in windows that do not overlap: one event per
spike, the numbers folded into the weights) their SOPs, and a per-step conv of
analog values (spikes plus a number, averages over overlapping windows) its MACs
at every step (``stats["analog_macs"]``). A conv of the input concatenated with
(or added to) spikes is linear in each part, conv(cat(x, h)) = conv_x(x) +
conv_h(h): the input's channels count their MACs once, the spikes' SOPs, other
per-step channels their MACs at every step. A BatchNorm not folded into a conv
counts no MACs, in the SNN as in the ANN; of spikes (after a ReLU), its scale and
shift fold into the convs reading them, which count SOPs.
"""
from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["E_MAC_PJ", "E_SOP_PJ", "conv_macs", "counted_conv_macs", "ann_macs", "ann_energy_mj",
           "mac_energy_mj", "sop_energy_mj", "snn_energy_mj", "conv_fanout", "conv_mean_fanout",
           "conv_sops"]

E_MAC_PJ = 4.6  # pJ per multiply-accumulate (45 nm, 32-bit float; Horowitz 2014)
E_SOP_PJ = 0.9  # pJ per synaptic (accumulate-only) operation

_PJ_PER_MJ = 1e9


def _check_count(name, value):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def _check_shape(input_shape) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(f"input_shape must be a sequence of ints, got {type(input_shape).__name__}")
    if len(input_shape) != 4 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool)
                                        and d >= 1 for d in input_shape):
        raise ValueError(f"input_shape must be 4 positive ints (B, C, H, W), got {input_shape}")
    return tuple(int(d) for d in input_shape)


@contextlib.contextmanager
def kept_modes(*nets):
    """Restores the train/eval flag of every submodule of ``nets`` on exit (a
    ``net.train(mode)`` would reset e.g. a BatchNorm the user froze in eval)."""
    modes = [(m, m.training) for net in nets for m in net.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def conv_macs(model: nn.Module, input_shape, device="meta") -> list[tuple[str, nn.Conv2d, int]]:
    """MACs of every ``nn.Conv2d`` (and ``nn.ConvTranspose2d``) call in one forward
    pass of ``model`` on a zero input of ``input_shape``, in call order:
    ``[(name, conv, macs), ...]``.

    A conv's MACs are ``out_elements * (Cin / groups) * kh * kw`` (batch
    included). A conv called twice appears twice. By default the forward runs
    on a copy of the model on the ``meta`` device (shapes only, no arithmetic);
    pass ``device="cpu"`` (or another device) to run the real model there for
    models whose ops have no meta implementation.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"conv_macs: model must be an nn.Module, got {type(model).__name__}")
    shape = _check_shape(input_shape)
    device = torch.device(device)
    if device.type == "meta":
        run = copy.deepcopy(model).to("meta")
    else:
        run = model
    with counted_conv_macs(run, "conv_macs") as records:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        x = torch.zeros(shape, device=device, dtype=dtype)
        with torch.no_grad(), kept_modes(run):
            run.eval()
            try:
                run(x)
            except (NotImplementedError, RuntimeError) as err:
                if device.type != "meta":
                    raise
                # e.g. an op without a meta kernel, or a .item() (a converted SNN)
                raise RuntimeError(f"conv_macs: the forward of {type(model).__name__} fails on the "
                                   f"meta device ({err}); if it runs on real tensors, pass "
                                   "device='cpu'") from err
    if run is not model:  # report the caller's modules, not the meta copy's
        orig = dict(model.named_modules())
        records = [(n, orig[n], m) for n, _, m in records]
    return records


@contextlib.contextmanager
def counted_conv_macs(model: nn.Module, caller="counted_conv_macs"):
    """Counts conv MACs of the forwards that run in the ``with`` block: yields the
    list ``[(name, conv, macs), ...]`` (:func:`conv_macs`' records, in call order)
    that every ``nn.Conv2d`` call of ``model`` appends to. Counting the forward a
    caller runs anyway gives ``conv_macs``' figure for that input's shape without
    a second forward (``spikingir evaluate``: the first meta-device forward took
    3.4 s on the 2-core VM, importing torch._dynamo for its elementwise ops)."""
    names = {m: n for n, m in model.named_modules()}
    records: list[tuple[str, nn.Conv2d, int]] = []

    def hook(mod, inputs, output):
        kh, kw = mod.kernel_size
        if isinstance(mod, nn.ConvTranspose2d):
            macs = transposed_conv_macs(mod, inputs[0].numel())
        else:
            macs = output.numel() * (mod.in_channels // mod.groups) * kh * kw
        records.append((names[mod], mod, int(macs)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if not handles:
        raise ValueError(f"{caller}: {type(model).__name__} has no nn.Conv2d layers")
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def transposed_conv_macs(conv: nn.ConvTranspose2d, in_elements: int) -> int:
    """MACs of one call of a transposed ``conv`` on ``in_elements`` input elements
    (batch included): every input element scatters into a ``kh x kw`` window of
    its group's ``Cout / groups`` output channels."""
    kh, kw = conv.kernel_size
    return in_elements * (conv.out_channels // conv.groups) * kh * kw


def conv_call_macs(conv: nn.Conv2d, batch: int, height: int, width: int):
    """``(macs, Ho, Wo)`` of one call of ``conv`` on a ``[batch, Cin, height, width]``
    input, by arithmetic (the count :func:`conv_macs` records, without running a
    forward: cheap enough for every training step, and traceable)."""
    if conv.padding == "same":
        ho, wo = height, width
    else:
        pad = (0, 0) if conv.padding == "valid" else conv.padding
        ho, wo = ((n + 2 * p - d * (k - 1) - 1) // st + 1 for n, p, d, k, st in
                  zip((height, width), pad, conv.dilation, conv.kernel_size, conv.stride))
    kh, kw = conv.kernel_size
    return batch * conv.out_channels * ho * wo * (conv.in_channels // conv.groups) * kh * kw, ho, wo


def ann_macs(model: nn.Module, input_shape, device="meta") -> int:
    """Total conv MACs of one forward pass (see ``conv_macs``)."""
    return sum(m for _, _, m in conv_macs(model, input_shape, device))


def mac_energy_mj(macs, pj_per_mac: float = E_MAC_PJ) -> float:
    """Energy in mJ of ``macs`` multiply-accumulates at ``pj_per_mac`` pJ each."""
    return _check_count("macs", macs) * _check_count("pj_per_mac", pj_per_mac) / _PJ_PER_MJ


def sop_energy_mj(sops, pj_per_sop: float = E_SOP_PJ) -> float:
    """Energy in mJ of ``sops`` synaptic operations at ``pj_per_sop`` pJ each."""
    return _check_count("sops", sops) * _check_count("pj_per_sop", pj_per_sop) / _PJ_PER_MJ


def ann_energy_mj(model: nn.Module, input_shape, pj_per_mac: float = E_MAC_PJ, device="meta") -> float:
    """Paper's ANN energy in mJ: ``pj_per_mac x`` conv MACs of one forward pass on
    ``input_shape = (B, C, H, W)``. Unrounded; the paper reports 3 decimals
    (DnCNN (1,1,321,481): 393.555; AOD-Net (1,3,480,640): 2.467)."""
    return mac_energy_mj(ann_macs(model, input_shape, device), pj_per_mac)


def snn_energy_mj(snn_or_macs, image_or_sops, pj_per_mac: float = E_MAC_PJ,
                  pj_per_sop: float = E_SOP_PJ) -> float:
    """Paper's SNN energy in mJ: ``pj_per_mac x`` MACs of the analog first layer
    (counted once) + ``pj_per_sop x`` synaptic operations (all T (+1) steps,
    mapper included).

    ``snn_energy_mj(snn, image)``: runs the converted SNN (``spikingir.convert.
    to_snn`` / ``load_snn``) on ``image`` [B, C, H, W] without gradients and counts
    the spikes it actually emits; the analog read-out of the recycled residual
    potential and AOD-Net's DC-offset corrections count as MACs. ``snn_energy_mj(first_layer_macs, sops)``: from
    counts.
    """
    if isinstance(snn_or_macs, nn.Module):
        snn = snn_or_macs
        if not hasattr(snn, "record_stats"):
            raise TypeError(f"snn_energy_mj: expected a converted SNN (SpikingDnCNN / "
                            f"SpikingAODNet), got {type(snn).__name__}")
        was = snn._record
        try:
            with torch.no_grad():
                snn.record_stats(True)(image_or_sops)
        finally:
            snn.record_stats(was)
        st = snn.stats
        # the same count as snn.energy_mj() (what evaluate reports), at these prices
        return snn_energy_mj(st["first_layer_macs"] + st["readout_macs"] + st.get("offset_macs", 0)
                             + st.get("analog_macs", 0), st["sops"], pj_per_mac, pj_per_sop)
    return mac_energy_mj(snn_or_macs, pj_per_mac) + sop_energy_mj(image_or_sops, pj_per_sop)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv_fanout(conv: nn.Conv2d) -> int:
    """Synaptic operations triggered by one input spike at an interior pixel:
    ``(Cout / groups) * kh * kw`` for stride 1 (see the module docstring); for
    stride s the exact ``(Cout/groups) * (kh/sh) * (kw/sw)`` when s divides the
    kernel size, otherwise ValueError (position dependent: use ``conv_sops``)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv_fanout: expected an nn.Conv2d, got {type(conv).__name__}")
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    if kh % sh or kw % sw:
        raise ValueError(f"conv_fanout: stride {conv.stride} does not divide kernel {conv.kernel_size}, "
                         "so the fan-out depends on the pixel; count with conv_sops(conv, spikes)")
    return (conv.out_channels // conv.groups) * (kh // sh) * (kw // sw)


def conv_mean_fanout(conv: nn.Conv2d) -> float:
    """Synaptic operations per interior input spike, averaged over the input
    pixels: ``(Cout / groups) * kh * kw / (sh * sw)`` (each output pixel reads
    ``kh * kw`` inputs and there are ``sh * sw`` inputs per output pixel).
    :func:`conv_fanout` where the stride divides the kernel size; for the
    others, the mean of a fan-out that varies with the pixel."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv_mean_fanout: expected an nn.Conv2d, got {type(conv).__name__}")
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    return (conv.out_channels // conv.groups) * kh * kw / (sh * sw)


def conv_sops(conv: nn.Conv2d, spikes: torch.Tensor) -> int:
    """Exact synaptic operations of ``conv`` driven by ``spikes``
    ([B, Cin, H, W] or [T, B, Cin, H, W], binary or any non-negative counts):
    for every output element, the number of spikes in its receptive field (its
    group's input channels), summed. Border- and stride-aware; equals
    ``spikes.sum() * conv_fanout(conv)`` up to the image border."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv_sops: expected an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(spikes, torch.Tensor):
        raise TypeError(f"conv_sops: spikes must be a torch.Tensor, got {type(spikes).__name__}")
    if spikes.dim() == 5:
        spikes = spikes.flatten(0, 1)
    if spikes.dim() != 4 or spikes.shape[1] != conv.in_channels:
        raise ValueError(f"conv_sops: spikes must be [B, {conv.in_channels}, H, W] or "
                         f"[T, B, {conv.in_channels}, H, W], got {tuple(spikes.shape)}")
    g = conv.groups
    # per group: sum of spikes over the group's channels, then count per output window
    s = spikes.detach().to(torch.float64).unflatten(1, (g, conv.in_channels // g)).sum(2)
    return _window_sops(conv, s)


def _window_sops(conv: nn.Conv2d, group_sums: torch.Tensor) -> int:
    """:func:`conv_sops` from the spikes summed per pixel over each group's input
    channels, ``group_sums`` [N, groups, H, W] (any dtype holding the counts
    exactly; summed in float64): for every output element, the spikes in its
    receptive field, times the group's Cout / groups outputs. A caller that
    has these sums (e.g. ``SpikeMasks.pixel_counts`` for ``groups == 1``) skips
    the per-channel counts."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("conv_sops: only numeric zero padding is supported")
    kh, kw = _pair(conv.kernel_size)
    g = conv.groups
    s = group_sums.to(torch.float64)  # integers < 2^53: every sum below is exact
    ones = torch.ones(g, 1, kh, kw, dtype=torch.float64, device=s.device)
    per_out = F.conv2d(s, ones, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=g)
    return int(round(per_out.sum().item() * (conv.out_channels // g)))
