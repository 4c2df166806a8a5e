"""PSNR / SSIM by the DnCNN evaluation convention."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from spikingir.metrics import psnr, ssim, to_uint8, to_uint16


def _pair(shape, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, shape).astype(np.float32) / 255
    restored = clean + rng.normal(0, noise, shape).astype(np.float32)
    return clean, restored


def test_to_uint8_roundtrip_and_clipping():
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(levels.astype(np.float32) / 255), levels)
    assert np.array_equal(to_uint8(np.array([-0.3, 1.7, 0.4 / 255, 0.6 / 255])), [0, 255, 0, 1])
    assert np.array_equal(to_uint8(torch.tensor([0.0, 1.0])), [0, 255])
    assert to_uint8(levels) is not levels and np.array_equal(to_uint8(levels), levels)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([np.nan]))
    with pytest.raises(TypeError):
        to_uint8([0.5])


def test_to_uint16_roundtrip_and_clipping():
    levels = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(to_uint16(levels.astype(np.float64) / 65535), levels)
    assert np.array_equal(to_uint16(np.array([-0.3, 1.7, 0.4 / 65535, 0.6 / 65535])), [0, 65535, 0, 1])
    assert to_uint16(levels) is not levels and np.array_equal(to_uint16(levels), levels)
    with pytest.raises(ValueError, match="to_uint16: image contains NaN"):
        to_uint16(torch.tensor([0.5, float("nan")]))
    with pytest.raises(TypeError, match="to_uint16: expected a float image"):
        to_uint16(np.zeros(3, np.uint8))  # 0-255 values are not [0, 1] ones


def test_psnr_matches_convention():
    clean, restored = _pair((32, 40))
    c8 = np.round(clean * 255).astype(np.uint8)
    r8 = np.round(np.clip(restored, 0, 1) * 255).astype(np.uint8)
    expected = peak_signal_noise_ratio(c8, r8, data_range=255)
    mse = np.mean((c8.astype(np.float64) - r8) ** 2)
    assert expected == pytest.approx(10 * math.log10(255 ** 2 / mse))
    assert psnr(clean, restored) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(32, 40), (17, 23, 3), (1, 3, 20, 26)])
def test_psnr_is_skimages_bit_for_bit(shape):
    """psnr computes skimage's peak_signal_noise_ratio itself (skimage's imports
    scipy.stats, ~1 s of every command): the same float, not just close, for
    gray, RGB and a non-contiguous 1 x C x H x W tensor (its H x W x C view)."""
    for seed in range(4):
        clean, restored = _pair(shape, seed=seed, noise=0.02 * (seed + 1))
        if len(shape) == 4:
            clean, restored = torch.from_numpy(clean), torch.from_numpy(restored)
        c8 = to_uint8(clean)
        c8 = np.moveaxis(c8[0], 0, -1) if c8.ndim == 4 else c8
        r8 = to_uint8(restored)
        r8 = np.moveaxis(r8[0], 0, -1) if r8.ndim == 4 else r8
        assert psnr(clean, restored) == peak_signal_noise_ratio(c8, r8, data_range=255)


def test_ssim_matches_convention():
    clean, restored = _pair((32, 40))
    c8, r8 = to_uint8(clean), to_uint8(restored)
    expected = structural_similarity(c8, r8, data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(clean, restored) == pytest.approx(expected, abs=1e-12)
    assert ssim(clean, clean) == pytest.approx(1.0)


def test_gray_layouts_agree():
    clean, restored = _pair((24, 30))
    ref_p, ref_s = psnr(clean, restored), ssim(clean, restored)
    variants = [
        (clean[..., None], restored[..., None]),
        (torch.from_numpy(clean)[None, None], torch.from_numpy(restored)[None, None]),
        (torch.from_numpy(clean), restored),
        (to_uint8(clean), torch.from_numpy(restored).double()[None, None]),
    ]
    for c, r in variants:
        assert psnr(c, r) == pytest.approx(ref_p, abs=1e-12)
        assert ssim(c, r) == pytest.approx(ref_s, abs=1e-12)


def test_rgb_uses_channel_axis():
    clean, restored = _pair((24, 30, 3), seed=1)
    c8, r8 = to_uint8(clean), to_uint8(restored)
    expected = structural_similarity(c8, r8, data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, channel_axis=-1)
    assert ssim(clean, restored) == pytest.approx(expected, abs=1e-12)
    nchw = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None]
    assert ssim(nchw(clean), nchw(restored)) == pytest.approx(expected, abs=1e-12)
    assert psnr(nchw(clean), restored) == pytest.approx(peak_signal_noise_ratio(c8, r8, data_range=255))


def test_output_is_clipped_before_scoring():
    clean = np.full((16, 16), 1.0, np.float32)
    over = clean + 0.5  # clipping brings it back to the clean image
    assert psnr(clean, over) == math.inf
    assert ssim(clean, over) == pytest.approx(1.0)


def test_metric_input_checks():
    clean, restored = _pair((16, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(clean, restored[:, :15])
    with pytest.raises(ValueError, match="1 x C x H x W"):
        psnr(np.zeros((2, 1, 16, 16)), np.zeros((2, 1, 16, 16)))
    with pytest.raises(ValueError, match="H x W x C"):
        psnr(np.zeros((5, 16, 16)), np.zeros((5, 16, 16)))
    with pytest.raises(TypeError):
        psnr(clean.tolist(), restored)
    with pytest.raises(TypeError, match="dtype"):
        psnr(clean.astype(np.int32), restored)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(clean[:10], restored[:10])
    for metric in (psnr, ssim):  # a float image in [0, 255] was clipped to white: psnr inf
        with pytest.raises(ValueError, match=r"in \[0, 1\], got values up to 255"):
            metric(np.full((16, 16), 255.0), restored * 255)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_tensor_matches_skimage_on_float_images(channels):
    """The differentiable SSIM (a fine-tuning loss term) is the evaluation's SSIM
    on unquantised values: skimage's on float images, averaged over the batch."""
    from spikingir.metrics import ssim_tensor
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(2, channels, 23, 17, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ref = np.mean([structural_similarity(
        x[b].permute(1, 2, 0).numpy(), y[b].permute(1, 2, 0).numpy(), data_range=1.0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1)
        for b in range(2)])
    assert float(ssim_tensor(x, y)) == pytest.approx(ref, abs=1e-12)
    assert float(ssim_tensor(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim_tensor(x.float(), y.float())) == pytest.approx(ref, abs=1e-5)
    y32 = y.float().requires_grad_()
    (1 - ssim_tensor(x.float(), y32)).backward()
    assert torch.isfinite(y32.grad).all() and y32.grad.abs().sum() > 0


def test_ssim_tensor_input_checks():
    from spikingir.metrics import ssim_tensor
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="one shape"):
        ssim_tensor(x, torch.rand(1, 1, 16, 15))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ssim_tensor(x[0], x[0])
    with pytest.raises(ValueError, match="at least 11"):
        ssim_tensor(x[..., :10], x[..., :10])
    with pytest.raises(TypeError, match="float"):
        ssim_tensor((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="torch tensors"):
        ssim_tensor(x.numpy(), x)
