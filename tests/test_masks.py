"""SpikeMasks: the channel-bit-mask format of binary spikes."""
import pytest
import torch

from spikingir.ops import SpikeMasks
from spikingir.ops.masks import popcount


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 64, 5, 7), (3, 130, 2, 9)])
def test_round_trip_and_layout(shape):
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(shape, generator=g) < 0.3).float()
    m = SpikeMasks.from_dense(s)
    C = shape[-3]
    assert m.shape == s.shape and m.channels == C
    assert m.bits.dtype == torch.int64
    assert m.bits.shape == (*shape[:-3], *shape[-2:], (C + 63) // 64)
    assert torch.equal(m.to_dense(), s)
    assert m.count() == int(s.sum())
    assert m.firing_rate() == pytest.approx(float(s.mean()))
    # bit c % 64 of word c // 64 is channel c
    idx = s.nonzero()[0].tolist() if s.any() else None
    if idx is not None:
        *lead, c, y, x = idx
        assert (int(m.bits[(*lead, y, x, c // 64)]) >> (c % 64)) & 1 == 1


def test_channel_63_is_the_sign_bit():
    s = torch.zeros(1, 64, 1, 1)
    s[0, 63] = 1
    m = SpikeMasks.from_dense(s)
    assert int(m.bits.flatten()[0]) == -(2 ** 63)
    assert torch.equal(m.to_dense(), s) and m.count() == 1


def test_popcount():
    words = torch.tensor([0, 1, -1, 2 ** 62, -(2 ** 63), 0x0F0F], dtype=torch.int64)
    assert popcount(words).tolist() == [0, 1, 64, 1, 1, 8]


def test_index_and_flatten():
    s = (torch.rand(4, 2, 3, 5, 6) < 0.5).float()
    m = SpikeMasks.from_dense(s)
    assert torch.equal(m[2:].to_dense(), s[2:])
    assert torch.equal(m.flatten(0, 1).to_dense(), s.flatten(0, 1))
    assert m.flatten(0, 1).shape == (8, 3, 5, 6)
    with pytest.raises(IndexError, match="lead dimensions"):
        m.flatten(1, 2)
    with pytest.raises(IndexError, match="slices only"):
        m[0]


@pytest.mark.parametrize("bits,channels,exc,match", [
    (torch.zeros(1, 2, 2, 1, dtype=torch.int32), 3, TypeError, "int64"),
    (torch.zeros(1, 2, 2, 1, dtype=torch.int64), 0, ValueError, "channels"),
    (torch.zeros(1, 2, 2, 1, dtype=torch.int64), 65, ValueError, r"ceil\(65 / 64\)"),
    (torch.zeros(2, 2, 1, dtype=torch.int64), 3, ValueError, "lead"),
])
def test_bad_construction(bits, channels, exc, match):
    with pytest.raises(exc, match=match):
        SpikeMasks(bits, channels)


@pytest.mark.parametrize("shape,dim", [((11, 2, 64, 5, 7), 0), ((3, 4, 130, 2, 9), 1),
                                       ((300, 1, 3, 2, 2), 0), ((2, 5, 1, 3, 3), -1)])
def test_counts_per_neuron(shape, dim):
    """Spikes per neuron over a lead dimension (the steps): byte-lane sums, chunked
    by 255 so no lane overflows (300 steps at 90 % firing)."""
    s = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.9).float()
    counts = SpikeMasks.from_dense(s).counts(dim)
    assert counts.dtype == torch.float32
    assert torch.equal(counts, s.sum(dim % (len(shape) - 3)))


def test_popcount_random_words():
    """The per-byte SWAR count equals Python's bit count on any int64 (the sign bit too)."""
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, (7, 9), generator=torch.Generator().manual_seed(3))
    assert popcount(words).tolist() == [[bin(w & (2 ** 64 - 1)).count("1") for w in row]
                                        for row in words.tolist()]


@pytest.mark.parametrize("shape,dim", [((11, 2, 64, 5, 7), 0), ((3, 4, 130, 2, 9), 1),
                                       ((300, 1, 3, 2, 2), 0), ((2, 5, 1, 3, 3), -1)])
def test_pixel_counts_are_counts_summed_over_channels(shape, dim):
    """pixel_counts(dim) == counts(dim).sum over the channels, as int64 (300 steps at
    90 % firing: no byte lane overflows)."""
    s = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.9).float()
    m = SpikeMasks.from_dense(s)
    got = m.pixel_counts(dim)
    assert got.dtype == torch.int64
    assert torch.equal(got, m.counts(dim).sum(-3).to(torch.int64))
    with pytest.raises(IndexError, match="not a lead dimension"):
        m.pixel_counts(len(shape) - 3)


def test_counts_bad_dim():
    with pytest.raises(IndexError, match="not a lead dimension"):
        SpikeMasks.from_dense(torch.zeros(2, 3, 4, 4)).counts(1)
