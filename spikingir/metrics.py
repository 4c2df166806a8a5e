"""PSNR / SSIM by the evaluation convention of DESIGN §5 (DnCNN protocol).

Both images are brought to uint8 the same way the restored output is: clipped to
[0, 1], multiplied by 255 and rounded (``to_uint8``); uint8 inputs are taken as
they are. For a clean image read from an 8-bit file (``uint8 / 255``) this
recovers the file exactly. Then

- PSNR: ``skimage.metrics.peak_signal_noise_ratio(clean, restored, data_range=255)``,
  computed here by its own float64 steps (the same value bit for bit, tested):
  its module imports scipy.stats, which made importing spikingir.evaluate take
  2.8 s instead of 0.6 s on the 2-core VM
- SSIM: ``skimage.metrics.structural_similarity(clean, restored, data_range=255,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (Wang et al.
  2004), with ``channel_axis=-1`` for RGB.

Accepted layouts (numpy arrays or torch tensors, any float dtype or uint8):
``H x W``, ``H x W x C`` and ``1 x C x H x W`` (a model's batch of one), with
C = 1 or 3. ``H x W x 1`` and ``1 x 1 x H x W`` are treated as grayscale.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_uint8", "psnr", "ssim", "ssim_tensor"]

_SSIM_WIN = 11  # skimage's Gaussian window side for sigma=1.5: 2 * int(3.5 * 1.5 + 0.5) + 1


def _to_numpy(img, name: str) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu()
        if img.dtype in (torch.bfloat16, torch.float16):
            img = img.float()
        img = img.numpy()
    elif not isinstance(img, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(img).__name__}")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"{name} must be float (in [0, 1]) or uint8, got dtype {img.dtype}")
    return img


def _to_hwc(img: np.ndarray, name: str) -> np.ndarray:
    """Return H x W (gray) or H x W x 3 (RGB)."""
    shape = img.shape
    if img.ndim == 4:
        if shape[0] != 1 or shape[1] not in (1, 3):
            raise ValueError(f"{name}: a 4-D image must be 1 x C x H x W with C in (1, 3), got {shape}")
        img = np.moveaxis(img[0], 0, -1)
    elif img.ndim == 3:
        if shape[-1] not in (1, 3):
            raise ValueError(f"{name}: a 3-D image must be H x W x C with C in (1, 3), got {shape}; "
                             "pass a C x H x W tensor as 1 x C x H x W")
    elif img.ndim != 2:
        raise ValueError(f"{name}: expected H x W, H x W x C or 1 x C x H x W, got shape {shape}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.size == 0:
        raise ValueError(f"{name} is empty (shape {shape})")
    return img


def to_uint8(img) -> np.ndarray:
    """Clip to [0, 1], scale by 255 and round to uint8 (uint8 input is returned
    unchanged). Keeps the layout; accepts numpy arrays and torch tensors; NaN
    raises ValueError."""
    return _quantize(img, np.uint8, "to_uint8")


def to_uint16(img) -> np.ndarray:
    """Clip to [0, 1], scale by 65535 and round to uint16 (uint16 input is
    returned unchanged): how `spikingir restore` writes the result of a 16-bit
    input. Same conventions as ``to_uint8``."""
    return _quantize(img, np.uint16, "to_uint16")


def _quantize(img, dtype, name) -> np.ndarray:
    if isinstance(img, np.ndarray) and img.dtype == dtype:  # before _to_numpy: it knows uint8 only
        return img.copy()
    img = _to_numpy(img, "image")
    if img.dtype == dtype:
        return img.copy()
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"{name}: expected a float image in [0, 1] or {np.dtype(dtype).name}, "
                        f"got dtype {img.dtype}")
    if np.isnan(img).any():
        raise ValueError(f"{name}: image contains NaN")
    top = float(np.iinfo(dtype).max)
    return np.round(np.clip(img.astype(np.float64), 0.0, 1.0) * top).astype(dtype)


def _prepare(clean, restored) -> tuple[np.ndarray, np.ndarray]:
    c = _to_hwc(_to_numpy(clean, "clean"), "clean")
    if c.dtype != np.uint8 and np.nanmax(c) > 2.0:
        # a float image in [0, 255] would be clipped to a white image (PSNR inf or
        # nonsense) instead of measured; a restored image may overshoot 1, not 2x
        raise ValueError(f"clean: a float image must be in [0, 1], got values up to "
                         f"{float(np.nanmax(c)):g}; divide by 255 or pass uint8")
    r = _to_hwc(_to_numpy(restored, "restored"), "restored")
    if c.shape != r.shape:
        raise ValueError(f"clean {c.shape} and restored {r.shape} differ in shape "
                         "(after bringing both to H x W or H x W x 3)")
    return to_uint8(c), to_uint8(r)


def psnr(clean, restored) -> float:
    """PSNR in dB of ``restored`` against ``clean`` (both in [0, 1] or uint8;
    see the module docstring). Identical images give ``inf``."""
    c, r = _prepare(clean, restored)
    if np.array_equal(c, r):
        return float("inf")
    # skimage's peak_signal_noise_ratio(c, r, data_range=255), step by step: both
    # images as float64, the mean of the squared differences, 10 log10(255^2 / MSE)
    c, r = np.asarray(c, dtype=np.float64), np.asarray(r, dtype=np.float64)
    mse = np.mean((c - r) ** 2, dtype=np.float64)
    return float(10 * np.log10((255.0 ** 2) / mse))


def ssim(clean, restored) -> float:
    """SSIM (Wang et al.: Gaussian window sigma 1.5, population covariance,
    data_range 255) of ``restored`` against ``clean``; channel mean for RGB.
    Images must be at least 11 x 11 (the Gaussian window)."""
    c, r = _prepare(clean, restored)
    if min(c.shape[:2]) < _SSIM_WIN:
        raise ValueError(f"ssim: images must be at least {_SSIM_WIN} x {_SSIM_WIN}, got {c.shape[:2]}")
    # imported here: scipy.ndimage and skimage's metrics take ~0.5 s to import, and
    # most commands (restore, convert, finetune) never measure SSIM
    from skimage.metrics import structural_similarity
    return float(structural_similarity(c, r, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False,
                                       channel_axis=-1 if c.ndim == 3 else None))


def _gauss_window(dtype, device, sigma=1.5):
    """skimage's SSIM window: scipy's Gaussian (sigma 1.5, truncate 3.5: radius 5),
    normalised, as an 11 x 11 outer product."""
    r = (_SSIM_WIN - 1) // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def ssim_tensor(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Differentiable mean SSIM of two ``[B, C, H, W]`` float tensors (a training
    loss term: ``1 - ssim_tensor(out, target)``). The same statistic as
    :func:`ssim` (Gaussian window sigma 1.5, population covariance, the map's
    5-pixel border dropped, mean over channels and pixels; here also over the
    batch) on unquantised values: for float images it equals
    ``skimage.metrics.structural_similarity(..., data_range=data_range)`` to
    rounding. H and W must be at least 11.

    With ``mu`` the window means, ``v`` the window (co)variances,
    ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``:
    ``SSIM = (2 mu_x mu_y + C1)(2 v_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(v_x + v_y + C2))``.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError("ssim_tensor: expected two torch tensors")
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"ssim_tensor: expected two [B, C, H, W] tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < _SSIM_WIN:
        raise ValueError(f"ssim_tensor: H and W must be at least {_SSIM_WIN}, got {tuple(x.shape[-2:])}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"ssim_tensor: expected float tensors, got {x.dtype} and {y.dtype}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    C = x.shape[1]
    # one depthwise 'valid' convolution filters all five maps of every channel:
    # exactly the pixels skimage keeps after cropping its reflect-padded maps
    w = _gauss_window(dtype, x.device).expand(5 * C, 1, _SSIM_WIN, _SSIM_WIN)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)
    mx, my, mxx, myy, mxy = F.conv2d(maps, w, groups=5 * C).chunk(5, 1)
    vx, vy, vxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()
