"""Read-out of a converted SNN: spike rates with membrane-potential recycling,
mapped to pixels by a convolutional pixel mapper (DESIGN.md section 5)."""
import copy

import torch
from torch import nn


#: How the recycled read-out is kept >= 0 (DESIGN.md section 3): "rate" clamps
#: the recycled rate, "residual" (files saved before 2026-11-29) the residual alone.
READOUT_CLAMPS = ("rate", "residual")


def spike_rate(y_seq, v_final, v0, timesteps, recycling=True, clamp="rate", in_place=False):
    """Rate estimate of a spiking layer in activation units.

    ``sum_t y[t] / T`` over all steps (the MPRN reuse step included: rates are
    averaged over T; ``y`` in activation units, ``theta x`` spikes), plus, with
    ``recycling``, the residual potential left in the neuron, ``(v_final - v0) /
    T``: the part of the input that did not make it into a whole spike. Kept
    >= 0 because a ReLU's output is (unclamped, the negative residuals of silent
    neurons cost ~1.2 dB): ``clamp="rate"`` clamps the sum, ``max(rate +
    residual / T, 0)``, which for an IF neuron with a constant input x is
    exactly ``ReLU(x)``; ``"residual"`` clamps the residual alone, ``rate +
    max(residual, 0) / T``, which rounds every neuron whose last spike
    overshot (v_final < v0) up by up to theta / (2T). Measured on converted
    DnCNNs (Set12 crops; benchmarks/RESULTS.md): "rate" gained 0.9 / 2.2 dB at
    T=10 on the sigma 50 / 15 networks without layer calibration (-0.03 at
    sigma 25), 0.8-4.1 dB at T=5 and 1.7-4.2 at T=4; -0.04..+0.16 dB with the
    calibration, and 0.00 on a fine-tuned SNN.

    ``in_place``: ``y_seq`` (one step holding the sum, [1, ...]) is the caller's to
    overwrite, without autograd: the same arithmetic (the same bits) without new
    tensors but the residual (the s25 SNN's read-out in inference: 3 steps
    alive instead of 6).
    """
    if clamp not in READOUT_CLAMPS:
        raise ValueError(f"clamp: expected one of {READOUT_CLAMPS}, got {clamp!r}")
    if in_place and y_seq.shape[0] == 1 and not torch.is_grad_enabled() and \
            torch.result_type(y_seq, v_final) == y_seq.dtype:
        rate = y_seq[0].div_(timesteps)  # the sum of one step is that step
        if recycling:  # the operations below, in the same order
            fresh = v0 is not None  # v_final - v0 is a new tensor (v_final is the neuron's)
            residual = v_final - v0 if fresh else v_final
            if clamp == "rate":
                rate.add_(residual.div_(timesteps) if fresh else residual / timesteps)
                rate.clamp_min_(0)
            else:
                rate.add_((residual.clamp_min_(0) if fresh else residual.clamp_min(0))
                          .div_(timesteps))
        return rate
    rate = y_seq.sum(0) / timesteps
    if recycling:
        residual = v_final if v0 is None else v_final - v0
        if clamp == "rate":
            rate = (rate + residual / timesteps).clamp_min(0)
        else:
            rate = rate + residual.clamp_min(0) / timesteps
    return rate.to(y_seq.dtype)


class PixelMapper(nn.Module):
    """Convolutional pixel mapper: maps the last spiking layer's rates to pixels.

    It starts as a copy of the ANN's output convolution, so that the converted
    SNN's output is unchanged at initialisation; fine-tuning then adapts it to
    the quantised, time-averaged spike code.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"PixelMapper: expected an nn.Conv2d, got {type(conv).__name__}")
        self.conv = copy.deepcopy(conv)

    def forward(self, rate):
        return self.conv(rate)
