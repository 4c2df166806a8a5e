"""Data for the restoration pipeline (DESIGN §5).

- Image folders: ``list_images``, ``load_image`` (float32 in [0, 1]).
- Denoising: ``add_gaussian_noise`` (the DnCNN evaluation protocol),
  ``DnCNNPatches`` (the DnCNN training patches: 40 x 40, stride 10, scales
  1/0.9/0.8/0.7, 8 flip/rotation modes) and ``NoiseCollate`` / ``noisy`` for
  fresh training noise.
- Dehazing: ``DehazePairs`` (paired hazy/clean folders), ``synthesize_haze``
  (atmospheric scattering model) and ``motorcycle_haze`` (a hazy/clean pair
  with a real depth map, from scikit-image's bundled Middlebury stereo pair).
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "center_crop", "list_images", "load_image", "add_gaussian_noise",
           "estimate_noise_sigma", "DnCNNPatches",
           "noisy", "NoiseCollate", "DehazePairs", "HAZE_BETAS", "HazeSample", "synthesize_haze",
           "depth_proxy", "motorcycle_haze"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- image folders

def center_crop(a: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size x size`` window of an H x W [x C] image (each side
    capped at the image's own size); ``None`` or 0: the whole image."""
    if not size:
        return a
    h, w = a.shape[:2]
    ch, cw = min(size, h), min(size, w)
    i, j = (h - ch) // 2, (w - cw) // 2
    return a[i:i + ch, j:j + cw]


def list_images(directory) -> list[Path]:
    """Sorted image files (PNG, JPG/JPEG, BMP, TIF/TIFF, any case) directly in
    ``directory``. FileNotFoundError if it does not exist, NotADirectoryError if
    it is a file, ValueError if it holds no image."""
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"list_images: no such directory: {d}")
    if not d.is_dir():
        raise NotADirectoryError(f"list_images: not a directory: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"list_images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {d}")
    return files


def _open(path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such image file: {p}")
    try:
        img = Image.open(p)
        img.load()
        # a camera's EXIF orientation tag: the pixels as the photo is displayed
        # (outputs are written without the tag, so they must be turned already)
        if _orientation(img) > 1:
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {p}: {err}") from err
    return img


def _orientation(img) -> int:
    """The EXIF orientation tag (1: as stored; 5-8: a quarter turn), 1 without one."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError):
        return 1


_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's 16-bit grayscale modes


def _pil_to_float(img: Image.Image, gray) -> np.ndarray:
    mode = img.mode
    if mode in _GRAY16_MODES:
        a = np.asarray(img, dtype=np.float64) / 65535.0
        if gray is False:
            a = np.repeat(a[..., None], 3, axis=-1)
        return a.astype(np.float32)
    if mode in ("I", "F"):
        raise ValueError(f"image mode {mode!r} (32-bit) has no defined [0, 1] scale; convert it to 8 or 16 bit")
    if gray is None:
        gray = mode in ("1", "L", "LA") or (mode == "P" and _palette_is_gray(img))
    img = img.convert("L" if gray else "RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _palette_is_gray(img: Image.Image) -> bool:
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def load_image(path, gray: bool | None = None) -> np.ndarray:
    """Read an image as float32 in [0, 1]: ``H x W`` (gray) or ``H x W x 3`` (RGB).

    ``gray=None`` keeps the file's kind (gray modes -> H x W, colour -> RGB; alpha
    is dropped); ``gray=True`` converts colour to luma (PIL, ITU-R 601-2) and
    ``gray=False`` gray to RGB. 8-bit files are ``uint8 / 255`` exactly (the DnCNN
    protocol), 16-bit gray files ``uint16 / 65535``.
    """
    if gray is not None and not isinstance(gray, bool):
        raise TypeError(f"load_image: gray must be None or a bool, got {type(gray).__name__}")
    img = _open(path)
    depth, colour_type = _png_ihdr(path)
    if depth == 16 and img.mode not in _GRAY16_MODES:
        # Pillow has no 16-bit colour or gray+alpha modes: it hands over 8 bits
        warnings.warn(f"{path}: a 16-bit PNG with {'alpha' if colour_type in (4, 6) else 'colour'} "
                      "is read at 8-bit precision (Pillow keeps 16 bits for grayscale without "
                      "alpha only)", stacklevel=2)
        if gray is None and colour_type == 4:  # gray + alpha: still a gray image
            gray = True
    return _pil_to_float(img, gray)


_COLOUR_FOLDERS_NOTED = set()


def load_gray(path) -> np.ndarray:
    """A training or calibration image for a grayscale model: ``load_image(path,
    gray=True)``, with one warning per folder when a file is in colour, so the
    conversion to luma is never silent (evaluate and restore refuse colour
    instead: their output would lose it)."""
    img = load_image(path, gray=None)
    if img.ndim == 2:
        return img
    _note_folder(path, _COLOUR_FOLDERS_NOTED, "colour images are converted to gray (luma) for "
                 "the grayscale denoising model")
    return load_image(path, gray=True)


def _note_folder(path, noted, what):
    """One warning per folder of ``path`` (``noted``: the folders already warned of)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if folder not in noted:
        noted.add(folder)
        warnings.warn(f"{folder}: {what}", stacklevel=3)


_GRAY_FOLDERS_NOTED = set()


def load_rgb(path) -> np.ndarray:
    """A training or calibration image for a colour model (3 input channels):
    ``load_image(path, gray=False)``, with one warning per folder when a file is
    gray (replicated to the three channels: the model then learns or calibrates
    on achromatic content only), as :func:`load_gray` warns of the reverse."""
    img = load_image(path, gray=None)
    if img.ndim == 3:
        return img
    _note_folder(path, _GRAY_FOLDERS_NOTED, "gray images are replicated to RGB for the colour "
                 "denoising model (it sees no colour in them)")
    return np.repeat(img[..., None], 3, 2)


def _png_ihdr(path) -> tuple[int | None, int | None]:
    """(bit depth, colour type) from a PNG's IHDR chunk; (None, None) for other files."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None, None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None, None
    return head[24], head[25]


def is_16bit_gray(path) -> bool:
    """Whether ``path`` is a 16-bit grayscale image (from its header only):
    `spikingir restore` then writes a gray (denoised) result with 16 bits too
    (PNG, TIFF); the dehazing model's RGB result stays 8-bit."""
    return _header(path)[0] in _GRAY16_MODES


def _image_size(path) -> tuple[int, int]:
    """(H, W) from the header only."""
    w, h = _header(path)[1]
    return h, w


def _header(path) -> tuple[str, tuple[int, int]]:
    """PIL's (mode, (W, H)) of an image file, without decoding its pixels."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            w, h = img.size
            return img.mode, ((h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {p}: {err}") from err


# ----------------------------------------------------------------------------- denoising

def _check_sigma(sigma, name="sigma"):
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"{name} must be a number (noise std on the 0-255 scale), got {type(sigma).__name__}")
    if not (0 <= sigma < math.inf):
        raise ValueError(f"{name} must be finite and >= 0, got {sigma}")
    return float(sigma)


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Standard deviation of additive white Gaussian noise in ``image`` (float,
    [0, 1] scale, H x W or H x W x C), on the 0-255 scale of ``sigma``.

    Donoho's robust estimator on the finest diagonal Haar coefficients:
    HH = (a - b - c + d) / 2 over 2 x 2 blocks has the noise's standard
    deviation and, in natural images, little else; sigma = median |HH| / 0.6745
    (the median absolute deviation of a normal variable). Colour images: the
    mean over channels. Measured on the 12 Set12 images: 15.2-17.1 at sigma 15,
    25.2-26.7 at 25, 50.0-50.8 at 50, 1.5-4.4 on the clean images.
    """
    if not isinstance(image, np.ndarray) or not np.issubdtype(image.dtype, np.floating):
        raise TypeError("estimate_noise_sigma: expected a float numpy image in [0, 1]")
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise ValueError(f"estimate_noise_sigma: expected H x W [x C] with H, W >= 2, got {image.shape}")
    x = image.astype(np.float64)
    x = x[:x.shape[0] // 2 * 2, :x.shape[1] // 2 * 2]
    hh = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2
    mad = np.median(np.abs(hh.reshape(hh.shape[0] * hh.shape[1], -1)), axis=0)
    return float(np.mean(mad) / 0.6745 * 255)


def add_gaussian_noise(clean: np.ndarray, sigma: float, seed: int | None = 0) -> np.ndarray:
    """The DnCNN evaluation noise: ``clean + randn(*clean.shape) * sigma / 255``
    drawn after seeding numpy's legacy generator with ``seed`` (one image, one
    seed: the protocol uses seed 0 for every image); the result is not clipped.

    This is exactly ``np.random.seed(seed); clean + np.random.randn(*clean.shape)
    * sigma/255`` (same numbers as the reference's ``np.random.normal(0,
    sigma/255, shape)``), but uses a private ``np.random.RandomState(seed)`` so
    numpy's global generator is left untouched. The sum is computed in float64
    and returned as float32 (the model's input dtype), as the reference test
    script does. ``seed=None`` draws fresh noise.
    """
    if isinstance(clean, torch.Tensor):
        raise TypeError("add_gaussian_noise: clean must be a numpy array (use noisy() for torch batches)")
    if not isinstance(clean, np.ndarray):
        raise TypeError(f"add_gaussian_noise: clean must be a numpy array, got {type(clean).__name__}")
    if not np.issubdtype(clean.dtype, np.floating):
        raise TypeError(f"add_gaussian_noise: clean must be float in [0, 1], got dtype {clean.dtype} "
                        "(divide uint8 images by 255)")
    sigma = _check_sigma(sigma)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"add_gaussian_noise: seed must be an int or None, got {type(seed).__name__}")
    rs = np.random.RandomState(seed)
    noise = rs.randn(*clean.shape) * (sigma / 255.0)
    return (clean + noise).astype(np.float32)


def noisy(batch: torch.Tensor, sigma, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh Gaussian noise for training: ``batch + randn * sigma / 255``, not clipped.

    ``sigma`` is a number (DnCNN-S), or a ``(low, high)`` pair for blind training
    (DnCNN-B): one sigma per sample drawn uniformly from [low, high].
    ``generator`` is a ``torch.Generator`` on ``batch``'s device (None: torch's
    global one).
    """
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise TypeError("noisy: batch must be a floating-point torch.Tensor")
    if batch.dim() < 1:
        raise ValueError("noisy: batch must have a batch dimension")
    noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    if isinstance(sigma, (tuple, list)):
        if len(sigma) != 2:
            raise ValueError(f"noisy: a sigma range must be (low, high), got {sigma}")
        lo, hi = (_check_sigma(s) for s in sigma)
        if lo > hi:
            raise ValueError(f"noisy: sigma range low {lo} > high {hi}")
        u = torch.rand(batch.shape[0], generator=generator, device=batch.device, dtype=batch.dtype)
        s = (lo + (hi - lo) * u).view(-1, *([1] * (batch.dim() - 1)))
        return batch + noise * (s / 255.0)
    return batch + noise * (_check_sigma(sigma) / 255.0)


class NoiseCollate:
    """DataLoader ``collate_fn`` that stacks clean patches and adds fresh noise:
    returns ``(noisy, clean)``, both ``[B, 1, h, w]``. See ``noisy`` for
    ``sigma`` and ``generator``.

    In DataLoader workers (``num_workers > 0``) a ``generator`` is not used as it
    is: every worker would start from a copy of it in the same state, so the
    workers' batches (and every epoch's, the workers being new copies) would get
    the same noise. Each worker draws from a generator seeded with the
    generator's initial seed and the worker's seed
    (``torch.utils.data.get_worker_info().seed``, new for every worker and
    epoch, and reproducible when the DataLoader's seed is: ``torch.manual_seed``
    or its ``generator``). Without a generator the noise comes from torch's
    global generator, which the DataLoader seeds per worker anyway."""

    def __init__(self, sigma, generator: torch.Generator | None = None):
        if isinstance(sigma, (tuple, list)):
            if len(sigma) != 2:
                raise ValueError(f"NoiseCollate: a sigma range must be (low, high), got {sigma}")
            sigma = tuple(_check_sigma(s) for s in sigma)
        else:
            sigma = _check_sigma(sigma)
        self.sigma, self.generator = sigma, generator
        self._worker = None  # (worker seed, the generator that worker draws from)

    def _generator(self):
        info = torch.utils.data.get_worker_info()
        if self.generator is None or info is None:
            return self.generator
        if self._worker is None or self._worker[0] != info.seed:
            # SeedSequence mixes the two seeds (a plain sum would let worker k of one
            # epoch repeat worker k + 1 of another, whose seed is one more)
            words = np.random.SeedSequence([self.generator.initial_seed(), info.seed % 2 ** 64])
            seed = int(words.generate_state(1, np.uint64)[0]) >> 1  # < 2^63: manual_seed's range
            self._worker = (info.seed, torch.Generator(self.generator.device).manual_seed(seed))
        return self._worker[1]

    def __call__(self, samples):
        clean = torch.stack(list(samples))
        return noisy(clean, self.sigma, self._generator()), clean

    def __getstate__(self):
        # The generator travels as its device, seed and state in bytes: a
        # torch.Generator sent to a spawn / forkserver DataLoader worker as itself
        # lost its state tensor on the way (pytorch/pytorch#146828; the workers
        # died with "unable to resize file").
        state = dict(self.__dict__, _worker=None)
        g = state.pop("generator")
        state["generator"] = None if g is None else \
            (str(g.device), g.initial_seed(), g.get_state().numpy().tobytes())
        return state

    def __setstate__(self, state):
        saved = state.pop("generator")
        self.__dict__.update(state)
        self.generator = None
        if saved is not None:
            device, seed, rng_state = saved
            self.generator = torch.Generator(device).manual_seed(seed)
            self.generator.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))


def _augment(x: torch.Tensor, mode: int) -> torch.Tensor:
    """The 8 flip/rotation modes of the DnCNN data generator (on the last two
    dims; numpy's ``flipud`` = flip rows, ``rot90`` = counter-clockwise)."""
    if mode == 0:
        return x
    if mode == 1:
        return x.flip(-2)
    if mode == 2:
        return x.rot90(1, (-2, -1))
    if mode == 3:
        return x.rot90(1, (-2, -1)).flip(-2)
    if mode == 4:
        return x.rot90(2, (-2, -1))
    if mode == 5:
        return x.rot90(2, (-2, -1)).flip(-2)
    if mode == 6:
        return x.rot90(3, (-2, -1))
    if mode == 7:
        return x.rot90(3, (-2, -1)).flip(-2)
    raise ValueError(f"augmentation mode must be in 0..7, got {mode}")


def _resize_bicubic(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic resize of a [C, H, W] float tensor (each channel on its own), a =
    -0.75 and half-pixel centres without antialiasing: OpenCV's INTER_CUBIC, used
    by the DnCNN generator."""
    if (h, w) == tuple(img.shape[-2:]):
        return img.clone()
    return F.interpolate(img[None].double(), size=(h, w), mode="bicubic", align_corners=False,
                         antialias=False)[0].float()


class DnCNNPatches(Dataset):
    """Clean training patches of the DnCNN data generator, as ``[channels, patch,
    patch]`` float32 tensors in [0, 1].

    Every image is resized by each of ``scales`` (size ``int(h*s) x int(w*s)``,
    bicubic as OpenCV's INTER_CUBIC; 8-bit sources are re-quantised to uint8 as
    the generator does) and cut into ``patch x patch`` windows at ``stride``.
    For Train400 (180 x 180) that is 225 + 169 + 121 + 81 = 596 patches per
    image, 238,400 in all. With ``augment=True`` each access applies one of the
    8 flip/rotation modes drawn from torch's global generator (so each epoch
    sees fresh modes and DataLoader worker seeding applies); the reference drew
    one mode per patch once. Pair with ``NoiseCollate`` or ``noisy``.

    Args:
        images: a directory, a sequence of image paths, or a sequence of
            grayscale arrays (``H x W`` float in [0, 1] or uint8; ``H x W x 3``
            with ``channels=3``).
        channels: 1 (gray patches; colour files converted to luma, with a
            warning) or 3 (RGB patches for a colour model; gray files replicated,
            with a warning).
    """

    def __init__(self, images, patch: int = 40, stride: int = 10,
                 scales: Sequence[float] = (1, 0.9, 0.8, 0.7), augment: bool = True,
                 channels: int = 1):
        for name, v in (("patch", patch), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"DnCNNPatches: {name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"DnCNNPatches: {name} must be >= 1, got {v}")
        if isinstance(scales, numbers.Real):
            scales = (scales,)
        scales = tuple(scales)
        if not scales or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and 0 < s <= 8
                                 for s in scales):
            raise ValueError(f"DnCNNPatches: scales must be a non-empty sequence of numbers in (0, 8], got {scales}")
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"DnCNNPatches: channels must be 1 (gray) or 3 (RGB), got "
                             f"{channels!r}")
        self.patch, self.stride, self.scales, self.augment = int(patch), int(stride), scales, bool(augment)
        self.channels = channels

        sources = self._sources(images, channels)
        self.images: list[torch.Tensor] = []  # scaled images [C, h, w], uint8 or float32
        index, too_small = [], []
        for n, src in enumerate(sources):
            from_file = isinstance(src, (str, os.PathLike))
            arr = (load_gray(src) if channels == 1 else load_rgb(src)) if from_file else src
            # 8-bit sources are re-quantised as the reference generator does; 16-bit
            # gray files keep their precision, as float arrays do
            quantize = (not is_16bit_gray(src)) if from_file else arr.dtype == np.uint8
            base = torch.from_numpy(np.asarray(arr, dtype=np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
            base = base[None] if base.dim() == 2 else base.permute(2, 0, 1)  # [C, H, W]
            h, w = base.shape[1:]
            before = len(index)
            for s in scales:
                hs, ws = int(h * s), int(w * s)  # int(): as the reference (180*0.7 -> 125)
                if hs < self.patch or ws < self.patch:
                    continue
                img = _resize_bicubic(base, hs, ws)
                if quantize:  # (numpy: torch.round is slow on some CPU builds)
                    img = torch.from_numpy(np.round(np.clip(img.numpy(), 0, 1) * 255).astype(np.uint8))
                k = len(self.images)
                self.images.append(img)
                index += [(k, i, j) for i in range(0, hs - self.patch + 1, self.stride)
                          for j in range(0, ws - self.patch + 1, self.stride)]
            if len(index) == before:
                too_small.append(f"{src if from_file else f'image {n}'} ({h}x{w})")
        if not index:
            raise ValueError(f"DnCNNPatches: no {patch} x {patch} patch fits in the given images at scales {scales}")
        if too_small:  # never silent: a folder of mostly small images trains on the few others
            warnings.warn(f"DnCNNPatches: {len(too_small)} of {len(sources)} images are too small for "
                          f"a {patch} x {patch} patch at any of the scales {scales} and give none: "
                          + ", ".join(too_small[:3]) + (" ..." if len(too_small) > 3 else ""),
                          stacklevel=2)
        self.index = torch.tensor(index, dtype=torch.int64)

    @staticmethod
    def _sources(images, channels=1) -> list:
        if isinstance(images, (str, os.PathLike)):
            return list(list_images(images))
        if isinstance(images, np.ndarray) and channels == 3:
            images = [images] if images.ndim == 3 else list(images)
        elif isinstance(images, np.ndarray):
            if images.ndim == 3 and images.shape[-1] in (3, 4):
                raise ValueError(f"DnCNNPatches: an array of shape {images.shape} looks like a colour "
                                 "image; pass grayscale H x W arrays (a 3-D array is a stack [N, H, W])")
            images = [images] if images.ndim == 2 else list(images)
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("DnCNNPatches: images must be a directory or a non-empty sequence of paths/arrays")
        out = []
        for k, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                out.append(im)
            elif isinstance(im, np.ndarray):
                if channels == 3 and (im.ndim != 3 or im.shape[2] != 3):
                    raise ValueError(f"DnCNNPatches: image {k} must be an H x W x 3 RGB array "
                                     f"(channels=3), got shape {im.shape}")
                if channels == 1 and im.ndim != 2:
                    raise ValueError(f"DnCNNPatches: image {k} must be a 2-D grayscale array, got shape {im.shape}")
                if im.dtype != np.uint8 and not np.issubdtype(im.dtype, np.floating):
                    raise TypeError(f"DnCNNPatches: image {k} must be uint8 or float, got {im.dtype}")
                out.append(im)
            else:
                raise TypeError(f"DnCNNPatches: image {k} must be a path or a numpy array, got {type(im).__name__}")
        return out

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, n: int) -> torch.Tensor:
        if not -len(self) <= n < len(self):
            raise IndexError(f"DnCNNPatches: index {n} out of range for {len(self)} patches")
        k, i, j = (int(v) for v in self.index[n])
        x = self.images[k][:, i:i + self.patch, j:j + self.patch]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.clone()
        if self.augment:
            x = _augment(x, int(torch.randint(0, 8, ())))
        return x.contiguous()


# ----------------------------------------------------------------------------- dehazing pairs

def _hwc_to_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class DehazePairs(Dataset):
    """Paired hazy / clean images; ``ds[i] = (hazy, clean)`` as ``[3, H, W]`` float32
    tensors in [0, 1] (passed through ``transform(hazy, clean)`` if given).

    Two layouts, told apart by the clean folder's name:

    - ``DIR/hazy/{scene}_{k}.ext`` <-> ``DIR/gt/{scene}.ext`` (RESIDE SOTS/ITS/OTS:
      several haze variants per scene; the scene is the hazy name up to its
      first ``_``);
    - ``DIR/hazy/NAME`` <-> ``DIR/clear/NAME`` (one hazy image per clean one; the
      scene is NAME's stem).

    Clean images are matched by stem, so the extensions may differ. Every hazy
    image must have exactly one clean image of the same size (ValueError
    otherwise, naming the culprits); clean images without hazy ones are ignored.

    ``scenes`` lists the scene ids (sorted strings); ``subset(scenes)`` keeps
    some, ``split(val_scenes)`` returns ``(train, val)``.
    """

    def __init__(self, root, transform=None, check_sizes: bool = True, _pairs=None):
        self.root = Path(root)
        self.transform = transform
        if transform is not None and not callable(transform):
            raise TypeError("DehazePairs: transform must be callable (hazy, clean) -> (hazy, clean)")
        if _pairs is not None:
            self.pairs = list(_pairs)
            return
        hazy_dir = self.root / "hazy"
        if not self.root.is_dir():
            raise FileNotFoundError(f"DehazePairs: no such directory: {self.root}")
        if not hazy_dir.is_dir():
            raise FileNotFoundError(f"DehazePairs: {self.root} has no 'hazy' folder")
        gt, clear = self.root / "gt", self.root / "clear"
        if gt.is_dir() and clear.is_dir():
            raise ValueError(f"DehazePairs: {self.root} has both 'gt' and 'clear' folders; keep one")
        if gt.is_dir():
            clean_dir, scene_of = gt, lambda stem: stem.split("_", 1)[0]
        elif clear.is_dir():
            clean_dir, scene_of = clear, lambda stem: stem
        else:
            raise FileNotFoundError(f"DehazePairs: {self.root} has neither a 'gt' nor a 'clear' folder")

        clean_by_stem: dict[str, list[Path]] = {}
        for p in list_images(clean_dir):
            clean_by_stem.setdefault(p.stem, []).append(p)
        pairs, missing, ambiguous, size_mismatch = [], [], [], []
        for h in list_images(hazy_dir):
            scene = scene_of(h.stem)
            cands = clean_by_stem.get(scene, [])
            if not cands:
                missing.append(h.name)
                continue
            if len(cands) > 1:
                ambiguous.append(f"{h.name} -> {[c.name for c in cands]}")
                continue
            c = cands[0]
            if check_sizes:
                hs, cs = _image_size(h), _image_size(c)
                if hs != cs:
                    size_mismatch.append(f"{h.name} {hs[0]}x{hs[1]} vs {c.name} {cs[0]}x{cs[1]}")
                    continue
            pairs.append((h, c, scene))
        problems = []
        if missing:
            problems.append(f"{len(missing)} hazy image(s) have no clean image in {clean_dir.name}/: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if ambiguous:
            problems.append("several clean images share a stem: " + "; ".join(ambiguous[:5]))
        if size_mismatch:
            problems.append(f"{len(size_mismatch)} pair(s) differ in size (H x W): "
                            + "; ".join(size_mismatch[:5]) + (" ..." if len(size_mismatch) > 5 else ""))
        if problems:
            raise ValueError(f"DehazePairs({self.root}): " + " | ".join(problems))
        self.pairs: list[tuple[Path, Path, str]] = pairs

    @property
    def scenes(self) -> list[str]:
        """Sorted scene ids present (numeric ids sort numerically)."""
        ids = {s for _, _, s in self.pairs}
        return sorted(ids, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))

    def _norm_scenes(self, scenes) -> set[str]:
        if isinstance(scenes, (str, numbers.Integral)):
            scenes = [scenes]
        wanted = {str(s) for s in scenes}
        unknown = wanted - set(self.scenes)
        if unknown:
            raise ValueError(f"DehazePairs: unknown scene id(s) {sorted(unknown)}; "
                             f"have {self.scenes[:10]}{' ...' if len(self.scenes) > 10 else ''}")
        return wanted

    def subset(self, scenes) -> DehazePairs:
        """A DehazePairs with only the pairs of ``scenes`` (ids as str or int)."""
        wanted = self._norm_scenes(scenes)
        return DehazePairs(self.root, self.transform, _pairs=[p for p in self.pairs if p[2] in wanted])

    def split(self, val_scenes) -> tuple[DehazePairs, DehazePairs]:
        """``(train, val)``: val holds the pairs of ``val_scenes``, train the rest,
        so no scene is in both."""
        val = self._norm_scenes(val_scenes)
        return (DehazePairs(self.root, self.transform, _pairs=[p for p in self.pairs if p[2] not in val]),
                DehazePairs(self.root, self.transform, _pairs=[p for p in self.pairs if p[2] in val]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        h, c, _ = self.pairs[i]
        hazy = _hwc_to_tensor(load_image(h, gray=False))
        clean = _hwc_to_tensor(load_image(c, gray=False))
        if self.transform is not None:
            hazy, clean = self.transform(hazy, clean)
        return hazy, clean


# ----------------------------------------------------------------------------- synthetic haze

HAZE_BETAS = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6)
A_RANGE = (0.6, 1.0)


class HazeSample(NamedTuple):
    """Result of ``synthesize_haze``: float32 arrays and the parameters used."""
    hazy: np.ndarray           # I, same shape as the clean image
    clean: np.ndarray          # J (float32 copy of the input)
    transmission: np.ndarray   # t = exp(-beta d), H x W
    depth: np.ndarray          # d, normalised to [0, 1], H x W
    A: float | np.ndarray      # atmospheric light (scalar or per channel)
    beta: float                # scattering coefficient


def _rng(rng) -> np.random.Generator:
    if rng is None or isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def _normalise(d: np.ndarray) -> np.ndarray:
    lo, hi = float(d.min()), float(d.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(d)
    return (d - lo) / (hi - lo)


def depth_proxy(clean: np.ndarray) -> np.ndarray:
    """A smooth stand-in for scene depth, in [0, 1], H x W (a heuristic, not a
    physical depth). Two cues, averaged and blurred:

    - height: rows nearer the top are farther (d = 1 at the top row, 0 at the bottom),
      true of most ground-level photographs;
    - luminance: brighter regions after a wide Gaussian blur (sigma = 1/16 of the
      shorter side) are farther, as sky and distant, already hazy parts are bright.

    ``d = normalise(gaussian(0.5 * height + 0.5 * normalise(blurred luma), sigma/2))``.
    """
    from scipy.ndimage import gaussian_filter

    img = np.asarray(clean, dtype=np.float64)
    luma = (img if img.ndim == 2 else img[..., 0] if img.shape[-1] == 1
            else img[..., :3] @ np.array([0.299, 0.587, 0.114]))
    h, w = luma.shape
    sigma = max(1.0, min(h, w) / 16.0)
    height = np.repeat(np.linspace(1.0, 0.0, h)[:, None], w, axis=1)
    lum = _normalise(gaussian_filter(luma, sigma, mode="reflect"))
    return _normalise(gaussian_filter(0.5 * height + 0.5 * lum, sigma / 2, mode="reflect")).astype(np.float32)


def synthesize_haze(clean: np.ndarray, depth: np.ndarray | None = None, beta: float | None = None,
                    A=None, rng=None) -> HazeSample:
    """Synthetic haze (AOD-Net / RESIDE): ``I = J t + A (1 - t)``, ``t = exp(-beta d)``.

    Args:
        clean: J, ``H x W x 3`` (or ``H x W``) float in [0, 1].
        depth: ``H x W`` depth map (any positive scale; non-finite values are not
            allowed), normalised here to [0, 1] (a constant map: 1, uniform haze);
            None uses ``depth_proxy(clean)``.
        beta: scattering coefficient; None draws one from ``HAZE_BETAS``
            {0.4, 0.6, ..., 1.6}.
        A: atmospheric light, a number or one per channel; None draws a scalar
            from U[0.6, 1.0].
        rng: None, an int seed or a ``numpy.random.Generator`` (for beta and A).

    For J in [0, 1] and A in [0, 1], I is a convex combination and stays in [0, 1].
    """
    if not isinstance(clean, np.ndarray):
        raise TypeError(f"synthesize_haze: clean must be a numpy array, got {type(clean).__name__}")
    if not np.issubdtype(clean.dtype, np.floating):
        raise TypeError(f"synthesize_haze: clean must be float in [0, 1], got dtype {clean.dtype}")
    if clean.ndim not in (2, 3) or (clean.ndim == 3 and clean.shape[-1] not in (1, 3)):
        raise ValueError(f"synthesize_haze: clean must be H x W or H x W x 3, got {clean.shape}")
    if not np.isfinite(clean).all():
        raise ValueError("synthesize_haze: clean contains NaN or inf")
    J = clean.astype(np.float32)
    g = _rng(rng)
    hw = J.shape[:2]
    if depth is None:
        d = depth_proxy(J)
    else:
        depth = np.asarray(depth, dtype=np.float64)
        if depth.shape != hw:
            raise ValueError(f"synthesize_haze: depth {depth.shape} must be H x W = {hw}")
        if not np.isfinite(depth).all():
            raise ValueError("synthesize_haze: depth has NaN or inf values; fill them first")
        # a constant map (one distance everywhere): the far plane, uniform haze
        # t = exp(-beta); normalising it would put the scene at d = 0, with no haze
        d = (np.ones(hw, np.float32) if float(depth.max() - depth.min()) <= 1e-12
             else _normalise(depth).astype(np.float32))
    if beta is None:
        beta = float(g.choice(HAZE_BETAS))
    elif isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < math.inf:
        raise ValueError(f"synthesize_haze: beta must be a finite number >= 0, got {beta!r}")
    if A is None:
        A = float(g.uniform(*A_RANGE))
    else:
        A_arr = np.asarray(A, dtype=np.float64)
        if A_arr.ndim == 0:
            A = float(A_arr)
        elif A_arr.shape == (J.shape[-1],) and J.ndim == 3:
            A = A_arr.astype(np.float32)
        else:
            raise ValueError(f"synthesize_haze: A must be a number or one value per channel, got shape {A_arr.shape}")
        if not (np.isfinite(A_arr).all() and (A_arr >= 0).all() and (A_arr <= 1).all()):
            raise ValueError(f"synthesize_haze: A must lie in [0, 1], got {A}")
    t = np.exp(-float(beta) * d).astype(np.float32)
    tt = t[..., None] if J.ndim == 3 else t
    hazy = (J * tt + np.asarray(A, dtype=np.float32) * (1.0 - tt)).astype(np.float32)
    return HazeSample(hazy, J, t, d.astype(np.float32), A, float(beta))


def motorcycle_haze(beta: float | None = None, A=None, seed: int = 0) -> HazeSample:
    """A hazy/clean pair with a real depth map: the left view of scikit-image's
    bundled Middlebury "motorcycle" stereo pair (500 x 741 RGB) as J, and depth
    ``d = 1 / disparity``.

    Pixels without a valid disparity (inf, NaN or <= 0: occlusions) take the
    depth of the nearest valid pixel. ``beta`` and ``A`` default to draws from
    ``synthesize_haze``'s ranges with ``numpy.random.default_rng(seed)``, so the
    pair is fixed for a given seed.
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.data import stereo_motorcycle

    left, _, disparity = stereo_motorcycle()
    J = left.astype(np.float32) / 255.0
    disp = np.asarray(disparity, dtype=np.float64)
    valid = np.isfinite(disp) & (disp > 0)
    if not valid.any():
        raise ValueError("motorcycle_haze: the disparity map has no valid pixel")
    depth = np.zeros_like(disp)
    depth[valid] = 1.0 / disp[valid]
    if not valid.all():
        _, (ii, jj) = distance_transform_edt(~valid, return_indices=True)
        depth = depth[ii, jj]
    return synthesize_haze(J, depth=depth, beta=beta, A=A, rng=seed)
