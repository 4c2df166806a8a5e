"""SpikeConv2d: nn.Conv2d on spike maps, a thin shell over spikingir.ops.spike_conv2d."""
from torch import nn

from spikingir import ops
from spikingir.ops.spike_conv import KERNEL_SIZES, STRIDES


class SpikeConv2d(nn.Conv2d):
    """Drop-in for ``nn.Conv2d`` in an SNN: takes spikes ``[T, B, C, H, W]`` (or
    ``[N, C, H, W]``), as a tensor or as :class:`~spikingir.ops.SpikeMasks`, and
    convolves every step with :func:`spikingir.ops.spike_conv2d`.

    Parameters and state dict are those of ``nn.Conv2d`` (``weight``, ``bias``),
    so a trained ANN's convolution loads as is. Kernel sizes 1, 3, 5, 7; stride
    1 or 2; zero padding; groups = 1; dilation = 1 (``dilation``, ``groups`` and
    ``padding_mode`` are accepted, as keywords, at those values only).

    Args:
        validate: check that the input is binary (a ``ValueError`` otherwise);
            pass False behind a neuron that emits 0/1 spikes, i.e. built with
            ``scale_output=False`` (the default emits ``theta x`` spikes, which
            are not binary) or emitting masks.
        backend: see :mod:`spikingir.ops.backends`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, *,
                 dilation=1, groups=1, padding_mode="zeros", validate=True, backend="auto",
                 device=None, dtype=None):
        # nn.Conv2d's other arguments are taken at the values spike_conv2d computes,
        # so code that spells them out still drops in; other values are refused.
        for name, value, ok in (("dilation", dilation, (1, (1, 1))), ("groups", groups, (1,)),
                                ("padding_mode", padding_mode, ("zeros",))):
            if value not in ok:
                raise ValueError(f"{name}: SpikeConv2d supports {name}={ok[0]!r} only (spike_conv2d "
                                 f"computes dense, ungrouped, zero-padded convolutions), got "
                                 f"{value!r}; keep nn.Conv2d for this layer")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias, device=device, dtype=dtype)
        for name, value, ok in (("kernel_size", self.kernel_size, lambda k: k in KERNEL_SIZES),
                                ("stride", self.stride, lambda v: v in STRIDES),
                                ("padding", self.padding, lambda v: isinstance(v, int) and v >= 0)):
            if any(not ok(v) for v in value) or (name != "kernel_size" and value[0] != value[1]):
                raise ValueError(f"{name}: SpikeConv2d supports kernel sizes {KERNEL_SIZES}, "
                                 f"equal strides in {STRIDES} and equal int paddings, got {value}")
        self.validate = validate
        self.backend = backend

    def forward(self, x):
        """``x``: a tensor or :class:`~spikingir.ops.SpikeMasks` (what a neuron
        emits with ``emit="masks"``; inference only)."""
        dims = len(x.shape)
        if dims not in (4, 5):
            raise ValueError(f"x: expected spikes [T, B, C, H, W] or [N, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        flat = x.flatten(0, 1) if dims == 5 else x
        y = ops.spike_conv2d(flat, self.weight, self.bias, self.stride[0], self.padding[0],
                             validate=self.validate, backend=self.backend)
        return y.unflatten(0, x.shape[:2]) if dims == 5 else y

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}"
