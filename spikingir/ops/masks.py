"""Binary spikes as channel bit masks: the format the fused neurons emit for
inference (``emit="masks"``) and ``spike_conv2d`` consumes, so no float spike
tensor is written or read between a spiking layer and the next convolution.

Layout (csrc/ops.cpp, ``neuron_fwd_masks``): spikes ``[*lead, C, H, W]`` are
stored as int64 ``[*lead, H, W, ceil(C / 64)]``; bit ``c % 64`` of word
``c // 64`` is the spike of channel ``c`` at that pixel, bits past the last
channel are 0. 32x fewer bytes than float32 spikes; channels-last, so the
spikes under one kernel tap are one word per pixel.
"""
import torch

#: Bit 0 of every byte of an int64.
_BYTE_LOW_BITS = 0x0101010101010101


def _bit_planes(words):
    """int64 words [..., K] -> 8 int64 planes: byte q of plane j's word k is bit
    8 q + j of word k (channel 64 k + 8 q + j), 0 or 1. Two elementwise ops per
    plane: ``>>`` is arithmetic, but the sign copies land in bits >= 57, which
    the mask clears. Sums of up to 255 planes add per byte without carries."""
    words = words.contiguous()
    return [(words >> j) & _BYTE_LOW_BITS for j in range(8)]


def _interleave(planes):
    """8 uint8 planes [..., 8 K] (bit j of byte 8 k + q in plane j) -> [..., 64 K]
    in channel order 64 k + 8 q + j (the words' bytes are little-endian)."""
    return torch.stack(planes, -1).flatten(-2)


def _byte_popcounts(words):
    """Set bits of every byte of the int64 ``words`` [..., K]: uint8 [..., 8 K]
    (byte 8 k + q: byte q of word k). The SWAR bit count on bytes: each 2-bit
    field becomes its count (``v - v // 2``), then each nibble the sum of its
    two fields, then the byte the sum of its nibbles; no field overflows (2, 4,
    8 fit) and uint8 shifts are logical. Measured on the 2-core VM (1 thread,
    [11, 1, 160, 160, 1] words): popcount 13 ms against 20 ms from the eight bit
    planes, SpikeMasks.pixel_counts 5-7 ms against 17 ms for counts(0).sum(-3)."""
    b = words.contiguous().view(torch.uint8)
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


def popcount(words):
    """Set bits of each int64 of ``words`` (int64 tensor, same shape): the bytes'
    bit counts summed per word."""
    return _byte_popcounts(words).view(*words.shape, 8).sum(-1, dtype=torch.int64)


class SpikeMasks:
    """Binary spikes ``[*lead, C, H, W]`` held as channel bit masks ``bits``
    (int64 ``[*lead, H, W, ceil(C / 64)]``, see the module docstring).

    Produced by ``if_multistep`` / ``mprn_multistep`` with ``emit="masks"``
    (``lead`` = ``(T, N)``) or by :meth:`from_dense`; consumed by
    :func:`spikingir.ops.spike_conv2d` (``lead`` = ``(N,)``: merge the steps
    into the batch with ``masks.flatten(0, 1)``). Inference only: masks carry
    no gradient.
    """

    __slots__ = ("bits", "channels")

    def __init__(self, bits, channels):
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.int64:
            raise TypeError(f"bits: expected an int64 tensor, got "
                            f"{getattr(bits, 'dtype', type(bits).__name__)}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels: expected an int >= 1, got {channels!r}")
        if bits.dim() < 4 or bits.shape[-1] != (channels + 63) // 64:
            raise ValueError(f"bits: expected shape [*lead, H, W, {(channels + 63) // 64}] "
                             f"(ceil({channels} / 64) words per pixel, at least one lead "
                             f"dimension), got {tuple(bits.shape)}")
        self.bits = bits
        self.channels = channels

    @property
    def shape(self):
        """Shape of the dense spikes: ``(*lead, C, H, W)``."""
        *lead, H, W, _ = self.bits.shape
        return torch.Size((*lead, self.channels, H, W))

    @property
    def device(self):
        return self.bits.device

    def __getitem__(self, index):
        """Index the lead dimensions (e.g. ``masks[T:]``: the steps from T on)."""
        bits = self.bits[index]
        if bits.dim() != self.bits.dim():
            raise IndexError("SpikeMasks: index the lead dimensions with slices only "
                             "(a result must keep [*lead, H, W, words])")
        return SpikeMasks(bits, self.channels)

    def flatten(self, start, end):
        """Merge lead dimensions ``start..end`` (inclusive), like ``Tensor.flatten``."""
        lead = self.bits.dim() - 3
        start, end = (d + lead if d < 0 else d for d in (start, end))
        if not 0 <= start <= end < lead:
            raise IndexError(f"SpikeMasks.flatten: dimensions {start}..{end} are not lead "
                             f"dimensions (there are {lead})")
        return SpikeMasks(self.bits.flatten(start, end), self.channels)

    def count(self):
        """Number of spikes (an int)."""
        return int(popcount(self.bits).sum())

    def firing_rate(self):
        """Spikes per neuron (over every lead index and pixel)."""
        return self.count() / max(1, self.shape.numel())

    def to_dense(self, dtype=torch.float32):
        """The spikes as a ``[*lead, C, H, W]`` tensor of 0 and 1."""
        planes = [p.view(torch.uint8) for p in _bit_planes(self.bits)]
        dense = _interleave(planes)[..., :self.channels]  # [*lead, H, W, C]
        return dense.movedim(-1, -3).to(dtype)

    def counts(self, dim=0):
        """Spikes per neuron summed over lead dimension ``dim`` (e.g. the steps;
        negative: counted from the last lead dimension): float32 ``[*lead
        without dim, C, H, W]``."""
        dim = self._lead_dim(dim, "counts")
        planes = [sum(part.sum(dim).view(torch.uint8).float()  # <= 255 per byte lane
                      for part in plane.split(255, dim))
                  for plane in _bit_planes(self.bits)]
        return _interleave(planes)[..., :self.channels].movedim(-1, -3)

    def pixel_counts(self, dim=0):
        """Spikes per pixel summed over the channels and lead dimension ``dim``
        (e.g. the steps): int64 ``[*lead without dim, H, W]``, exactly
        ``counts(dim).sum(-3)`` (what a convolution's synaptic operations need,
        :func:`spikingir.energy.conv_sops`), without the per-channel counts: the
        bytes' bit counts (<= 8) summed over ``dim``, then over the pixel's bytes."""
        return _byte_popcounts(self.bits).sum(self._lead_dim(dim, "pixel_counts"),
                                              dtype=torch.int32).sum(-1, dtype=torch.int64)

    def _lead_dim(self, dim, method):
        """``dim`` as a non-negative lead dimension (-1: the last one); IndexError
        naming ``method`` when it is not one."""
        lead = self.bits.dim() - 3
        if not -lead <= dim < lead:
            raise IndexError(f"SpikeMasks.{method}: dim {dim} is not a lead dimension "
                             f"(there are {lead})")
        return dim % lead

    @classmethod
    def from_dense(cls, s):
        """Packs spikes ``[*lead, C, H, W]`` (any nonzero value is a spike)."""
        if not isinstance(s, torch.Tensor) or s.dim() < 4:
            raise ValueError(f"s: expected a tensor [*lead, C, H, W], got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s)}")
        C = s.shape[-3]
        words = (C + 63) // 64
        fired = (s != 0).movedim(-3, -1).to(torch.int64)  # [*lead, H, W, C]
        fired = torch.nn.functional.pad(fired, (0, 64 * words - C))
        fired = fired.unflatten(-1, (words, 64))
        shifts = torch.arange(64, device=s.device)
        # distinct powers of two: the sum is the OR (bit 63 wraps to the sign, as int64 does)
        return cls((fired << shifts).sum(-1), C)

    def __repr__(self):
        return f"SpikeMasks(shape={tuple(self.shape)}, device={self.device})"
