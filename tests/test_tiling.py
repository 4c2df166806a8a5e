import pytest
import torch
from torch import nn

from spikingir.models import AODNet, DnCNN
from spikingir.tiling import receptive_radius, run_tiled

from test_convert import dyadic_snn, tiny_dncnn


def test_receptive_radius():
    assert receptive_radius(DnCNN()) == 17  # 17 3x3 convs
    assert receptive_radius(AODNet()) == 0 + 1 + 2 + 3 + 1  # 1x1, 3x3, 5x5, 7x7, 3x3
    snn, _ = dyadic_snn("mprn", 2, seed=0)
    assert receptive_radius(snn) == receptive_radius(tiny_dncnn())  # mapper = the last conv
    with pytest.raises(ValueError, match="strided"):
        receptive_radius(nn.Conv2d(1, 1, 3, stride=2))
    # a change of scale has no radius (a transposed conv was skipped: a seam per tile)
    with pytest.raises(ValueError, match="pooling, upsampling and transposed convolutions"):
        receptive_radius(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 1, 2, stride=2)))
    # nor an ANN's pooling and upsampling modules (found in review: restore(image, ann) of
    # a U-Net of the user's tiled it with the convs' radius, a seam per tile)
    for layer in (nn.AvgPool2d(2), nn.MaxPool2d(2), nn.Upsample(scale_factor=2)):
        with pytest.raises(ValueError, match="pooling, upsampling and transposed convolutions"):
            receptive_radius(nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Conv2d(2, 1, 3)))


def test_receptive_radius_of_even_kernels_and_one_sided_padding():
    """padding="same" with an even kernel pads one more pixel after than before,
    and an explicit padding can exceed half the kernel: the radius is each conv's
    reach on its farther side, so tiles still give the whole image."""
    torch.manual_seed(0)
    even = nn.Sequential(nn.Conv2d(1, 4, 4, padding="same"), nn.ReLU(),
                         nn.Conv2d(4, 1, 4, padding="same")).eval()
    assert receptive_radius(even) == 2 + 2
    assert receptive_radius(nn.Conv2d(1, 1, 3, padding=(1, 2))) == 2
    x = torch.rand(1, 1, 50, 43)
    with torch.no_grad():
        assert torch.equal(run_tiled(even, x, 16, receptive_radius(even)), even(x))


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_tiles_give_the_whole_image(neuron):
    """With margin = the receptive radius the tiled SNN output is the whole-image
    output (dyadic weights: every sum exact, so bit for bit); with no margin the
    tile borders show (the comparison can fail)."""
    snn, _ = dyadic_snn(neuron, 3, seed=1)
    x = (torch.rand(2, 1, 23, 30, generator=torch.Generator().manual_seed(1)) * 16).round() / 16
    with torch.no_grad():
        whole = snn(x)
        r = receptive_radius(snn)
        assert torch.equal(run_tiled(snn, x, tile=8, margin=r), whole)
        assert torch.equal(run_tiled(snn, x, tile=64, margin=0), whole)  # one tile
        assert not torch.equal(run_tiled(snn, x, tile=8, margin=0), whole)


def test_tiles_of_an_ann_and_of_rgb():
    torch.manual_seed(0)
    aod = AODNet().eval()
    x = torch.rand(1, 3, 19, 26)
    with torch.no_grad():
        whole = aod(x)
        tiled = run_tiled(aod, x, tile=5, margin=receptive_radius(aod))
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        run_tiled(lambda t: t, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="margin"):
        run_tiled(lambda t: t, torch.zeros(1, 1, 4, 4), tile=2, margin=-1)
    with pytest.raises(ValueError, match="tile must be an int"):
        run_tiled(lambda t: t, torch.zeros(1, 1, 4, 4), tile=2.5)
    with pytest.raises(ValueError, match="spatial size"):
        run_tiled(lambda t: t[..., 1:, :], torch.zeros(1, 1, 9, 9), tile=4)


def test_tiles_of_an_aodnet_snn_with_offsets():
    """The offset maps follow each tile's own border (zero padding, as the ANN on
    that tile), and the margin discards it: the tiled output is the whole one.
    Float sums may round differently per tile shape and flip a rare spike, so up to
    0.5 % of the values may differ."""
    from spikingir.convert import to_snn
    from test_convert import dc_aodnet, images
    snn = to_snn(dc_aodnet(), images(3), 6, per_channel=True, v0="half", recycling=False)
    assert (snn.offset > 0).any()
    x = torch.rand(1, 3, 29, 37, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = snn(x)
        tiled = run_tiled(snn, x, tile=12, margin=receptive_radius(snn))
        untiled_margin0 = run_tiled(snn, x, tile=12, margin=0)
    assert ((tiled - whole).abs() > 1e-5).float().mean() <= 0.005
    assert ((untiled_margin0 - whole).abs() > 1e-5).float().mean() > 0.01  # borders show without it


def test_shipped_snn_in_tiles_is_the_whole_image_bit_for_bit():
    """The input current is rounded once from float64 (SNN._input_current): before,
    oneDNN's size-dependent float32 sums flipped spikes, and on this crop tiles of 64
    differed from the whole image in 1,142 pixels, by up to 7 grey levels."""
    import numpy as np
    import skimage.data
    from spikingir.data import add_gaussian_noise
    from spikingir.pipeline import for_inference, load_shipped_snn, restore
    clean = skimage.data.camera()[100:260, 200:360].astype(np.float32) / 255
    noisy = np.asarray(add_gaussian_noise(clean, 25, seed=0), dtype=np.float32)
    snn = for_inference(load_shipped_snn("denoise", 25, timesteps=10))
    np.testing.assert_array_equal(restore(noisy, snn, tile=64), restore(noisy, snn, tile=0))



def test_restore_with_amp_leaves_the_network_as_it_was():
    """restore(amp=True) switched the SNN's spike convolutions off and made its
    weights channels-last for good: later exact calls ran the dense path."""
    import numpy as np
    from spikingir.pipeline import for_inference, load_shipped_snn, restore
    snn = for_inference(load_shipped_snn("denoise", 25, timesteps=2))
    noisy = np.random.default_rng(0).random((24, 30), dtype=np.float32)
    before = restore(noisy, snn, tile=0)
    setting = (snn.spike_conv, snn.spike_conv_backend, snn.spike_masks)
    amp = restore(noisy, snn, tile=0, amp=True)
    assert np.abs(amp - before).mean() < 0.1  # bf16 at T=2 on a noise image: close, not exact
    assert (snn.spike_conv, snn.spike_conv_backend, snn.spike_masks) == setting
    assert all(p.is_contiguous() for p in snn.parameters())
    np.testing.assert_array_equal(restore(noisy, snn, tile=0), before)
