"""The restoration workflow behind the CLI: evaluation images, ANN and SNN
loading, conversion with calibration, saving converted/fine-tuned SNNs.

Built-in data (no download): scikit-image's bundled photos. Denoising uses
grayscale crops with noise by the DnCNN protocol; dehazing uses the motorcycle
stereo scene hazed through its real disparity-derived depth.
"""
import numbers
import os
import re

import numpy as np
import torch
from torch import nn

from spikingir.data import (add_gaussian_noise, center_crop, list_images, load_gray, load_image,
                            load_rgb)
from spikingir.evaluate import Sample
from spikingir.models import AODNet, DnCNN, load_dncnn
from spikingir.models.spiking import SpikingAODNet, SpikingChain, SpikingDnCNN, make_neuron
from spikingir.nn.mapper import READOUT_CLAMPS
from spikingir.weights import DENOISE_SIGMAS

SIGMAS = DENOISE_SIGMAS  # the noise levels with shipped models
#: Built-in evaluation photos (scikit-image) and the ones used for calibration.
DENOISE_EVAL = ("camera", "astronaut", "coffee")
DENOISE_CALIB = ("moon", "page", "chelsea", "rocket")
DEHAZE_CALIB = ("chelsea", "rocket", "astronaut")


def check_sigma(sigma):
    if sigma not in SIGMAS:
        raise ValueError(f"unknown sigma {sigma!r}: models exist for sigma in {SIGMAS}")
    return sigma


def nearest_sigma(sigma):
    """The shipped noise level closest to ``sigma`` by ratio (on a log scale):
    15 below 19.4, 25 up to 35.4, 50 above."""
    if not isinstance(sigma, (int, float, np.number)) or not np.isfinite(sigma):
        raise ValueError(f"nearest_sigma: expected a finite noise level, got {sigma!r}")
    return min(SIGMAS, key=lambda s: abs(np.log(max(sigma, 1e-3) / s)))


def _to_input(a):
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]


def _skimage_photo(name, gray):
    """A scikit-image photo as 8-bit values in [0, 1]: ``gray`` True in gray (luma),
    False in RGB (a gray photo replicated), None in its own kind."""
    import skimage.data
    from skimage.color import rgb2gray

    img = getattr(skimage.data, name)()
    a = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    if gray and a.ndim == 3:
        a = rgb2gray(a[..., :3]).astype(np.float32)
    if gray is False and a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    return np.round(a * 255) / 255  # 8-bit values, as an image file would give


#: The ways a grayscale denoising model can take a colour image (``colour=``; the
#: CLI's ``--colour``): None refuses it; "per-channel" denoises each RGB channel on
#: its own, the three as one batch of gray images through the model.
COLOUR_MODES = (None, "per-channel")
#: The refusal of a colour image by a grayscale denoising model, with the way out.
RGB_FOR_GRAY = ("an RGB image for the grayscale denoising model (--colour per-channel "
                "denoises each RGB channel on its own)")

#: The refusal of a gray photo by a colour denoising model: replicated to RGB, its
#: noise would be the same in the three channels, not the independent noise per
#: channel such a model is trained to remove.
GRAY_FOR_RGB = ("a grayscale image for the colour denoising model (3 input channels; its noise "
                "would be the same in all three): use a grayscale model")


def _check_colour(colour, who):
    """Whether ``colour`` (one of COLOUR_MODES) asks for per-channel restoration."""
    if colour not in COLOUR_MODES:
        raise ValueError(f"{who}: colour: expected None or 'per-channel', got {colour!r}")
    return colour == "per-channel"


def _check_image_channels(channels, who):
    """``channels``, the image channels of a denoising model: 1 (gray) or 3 (RGB)."""
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"{who}: channels: expected 1 (a grayscale model) or 3 (a colour "
                         f"model), got {channels!r}")
    return channels


def denoise_samples(sigma, data=None, limit=None, crop=None, colour=None, channels=1):
    """Noisy/clean samples: PNG/JPG/BMP/TIFF files in ``data`` (grayscale; an RGB
    file raises a ValueError), or the built-in photos in gray. Noise
    ``sigma/255 * N(0, 1)``, numpy seed 0 per image, not clipped.

    ``channels=3``, for a colour model (3 input channels, e.g. ``DnCNN(image_channels=3)``):
    every image in RGB, input ``[1, 3, H, W]``, noise ``add_gaussian_noise`` of the
    H x W x 3 image (i.i.d. over pixels and channels, one seed-0 draw), PSNR over
    all the channels' pixels and SSIM their mean, as below. A gray file (and the
    built-in ``camera``) is replicated to RGB before the noise is drawn: the noisy
    input is then a true colour one (independent noise per channel), which is what
    a colour model expects (``spikingir restore`` refuses a gray photo instead: its
    noise is already there, the same in the three channels).

    ``colour="per-channel"``: RGB files (and the built-in photos that are in colour)
    are evaluated in RGB, each channel denoised on its own by the grayscale model.
    The noise is ``add_gaussian_noise`` of the H x W x 3 image (the protocol's one
    seed-0 draw, here of H x W x 3 normals: i.i.d. over pixels and channels); the
    input is the noisy channels as a batch of gray images, ``[3, 1, H, W]``; the clean target stays H x W x 3, so PSNR is
    over all the channels' pixels (one MSE), SSIM the mean of the channels' SSIMs
    (``channel_axis=-1``, :mod:`spikingir.metrics`) and the energy the whole
    image's (three channels' operations). Gray files stay gray. Alpha is dropped
    and a 16-bit colour PNG read at 8 bits, as :func:`spikingir.data.load_image` does."""
    per_channel = _check_colour(colour, "denoise_samples")
    rgb = _check_image_channels(channels, "denoise_samples") == 3
    if per_channel and rgb:
        raise ValueError("denoise_samples: colour='per-channel' runs a grayscale model on each "
                         "channel; a colour model (channels=3) takes the RGB images as they are")
    if data is None:
        # gray=None: each photo in its own kind (camera stays gray); False: all RGB
        kind = False if rgb else None if per_channel else True
        named = [(n, _skimage_photo(n, gray=kind)) for n in DENOISE_EVAL]
    else:
        named = []
        for p in list_images(data):
            img = load_image(p, gray=False if rgb else None)
            if img.ndim == 3 and not (per_channel or rgb):
                raise ValueError(f"{p}: {RGB_FOR_GRAY}")
            named.append((p.stem, img))
    named = named[:limit] if limit else named
    out = []
    for name, clean in named:
        clean = center_crop(clean, crop)
        x = _to_input(add_gaussian_noise(clean, sigma, seed=0))  # [1, C, H, W]
        # per channel: an RGB image's channels as a batch of three gray images, [3, 1, H, W]
        out.append(Sample(name, x.transpose(0, 1).contiguous() if per_channel and x.shape[1] > 1
                          else x, clean))
    return out


def dehaze_samples(data=None, limit=None, crop=None, scenes=None):
    """Hazy/clean samples from a paired folder (``DIR/hazy`` + ``DIR/gt`` or
    ``DIR/clear``; ``scenes`` selects scene ids), or the built-in hazy
    motorcycle scene (half resolution)."""
    from spikingir.data import DehazePairs, motorcycle_haze

    out = []
    if data is None:
        hs = motorcycle_haze(seed=0)
        hazy, clean = hs.hazy[::2, ::2], hs.clean[::2, ::2]
        out.append(Sample("motorcycle", _to_input(center_crop(hazy, crop)), center_crop(clean, crop)))
        return out
    pairs = DehazePairs(data)
    if scenes:
        pairs = pairs.subset(scenes)
    for hazy_path, clean_path, _ in pairs.pairs[:limit] if limit else pairs.pairs:
        hazy, clean = load_image(hazy_path, gray=False), load_image(clean_path, gray=False)
        out.append(Sample(hazy_path.stem, _to_input(center_crop(hazy, crop)), center_crop(clean, crop)))
    return out


#: Smallest calibration / refit image side: a threshold percentile or a mapper
#: fit from a few pixels (a 1x1 image was taken) is noise, not a calibration.
MIN_CALIB_SIDE = 16


def _calib_image(path, load, crop):
    """``path`` read by ``load`` (load_gray, load_rgb, or load_image in RGB for
    dehazing), centre-cropped to ``crop``; a ValueError naming the file when it is
    smaller than MIN_CALIB_SIDE."""
    img = load(path)
    if min(img.shape[:2]) < MIN_CALIB_SIDE:
        raise ValueError(f"{path}: {img.shape[0]} x {img.shape[1]} is too small to calibrate on "
                         f"(at least {MIN_CALIB_SIDE} x {MIN_CALIB_SIDE})")
    return center_crop(img, crop)


def _load_rgb_as_is(path):
    """A dehazing image in RGB (a gray one replicated, as AOD-Net's restore does)."""
    return load_image(path, gray=False)


def calibration_inputs(task, sigma=None, crop=128, data=None, channels=1):
    """Degraded inputs for threshold calibration, disjoint from the evaluation
    images: from the training data ``data`` (Train400 with noise; dehazing:
    hazy images of the training scenes) or built-in photos. ``channels``: the
    denoising model's image channels, 1 (images in gray, colour files as luma) or
    3 (a colour model: images in RGB, gray ones replicated, noise drawn per channel)."""
    from spikingir.data import synthesize_haze

    if task == "denoise":
        gray = _check_image_channels(channels, "calibration_inputs") == 1
        if data is not None:
            cleans = [_calib_image(p, load_gray if gray else load_rgb, crop)
                      for p in list_images(data)[:8]]
        else:
            cleans = [center_crop(_skimage_photo(n, gray=gray), crop) for n in DENOISE_CALIB]
        return [_to_input(add_gaussian_noise(c, sigma, seed=i)) for i, c in enumerate(cleans)]
    if data is not None:  # hazy images of the training scenes (validation scenes held out)
        from spikingir.data import DehazePairs
        from spikingir.train import held_out_scenes
        pairs = DehazePairs(data)
        # a folder of one scene calibrates on it (there is nothing to hold out)
        train_pairs = pairs.split(held_out_scenes(pairs))[0] if len(pairs.scenes) > 1 else pairs
        return [_to_input(_calib_image(h, _load_rgb_as_is, crop * 2))
                for h, _, _ in train_pairs.pairs[::max(1, len(train_pairs.pairs) // 8)][:8]]
    cleans = [center_crop(_skimage_photo(n, gray=False), crop) for n in DEHAZE_CALIB]
    return [_to_input(synthesize_haze(c, rng=i).hazy) for i, c in enumerate(cleans)]


def denoise_pairs(sigma, data, n, crop=128, seed=100, channels=1):
    """(noisy, clean) lists of ``n`` [1, channels, crop, crop] centre crops of images
    spread over the folder ``data`` (``channels`` 1: gray, 3: RGB for a colour
    model, as :func:`calibration_inputs`), with noise by the evaluation protocol at
    seeds ``seed``, ``seed + 1``, ... (other noise than :func:`calibration_inputs`')."""
    gray = _check_image_channels(channels, "denoise_pairs") == 1
    paths = list_images(data)
    paths = paths[::max(1, len(paths) // n)][:n]
    cleans = [_calib_image(p, load_gray if gray else load_rgb, crop) for p in paths]
    return ([_to_input(add_gaussian_noise(c, sigma, seed=seed + k)) for k, c in enumerate(cleans)],
            [_to_input(c) for c in cleans])


def load_ann(task, sigma=None, path=None, module=None):
    """The ANN: from ``path`` (a state dict), else the shipped weights. With
    ``module`` (``"FILE.py:FUNCTION"``), ``FUNCTION()`` from FILE.py builds the
    network (your own conv chain, :mod:`spikingir.models.chain`, or another CNN
    ``to_snn`` converts, :mod:`spikingir.models.graph`) and ``path`` is loaded into it."""
    if module is not None:
        return _load_ann_module(module, path, task)
    if path is None:
        from spikingir.weights import load_shipped_ann
        return load_shipped_ann(task, sigma).eval()
    sd = _read_state_dict(path)
    if task == "denoise":
        try:
            return load_dncnn(sd).eval()
        except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a DnCNN checkpoint ({_first_line(err)})") from None
    model = AODNet()
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not an AOD-Net checkpoint ({_first_line(err)})") from None
    return model.eval()


def _first_line(err, limit=120):
    """An exception's message in one line of at most about ``limit`` characters,
    with its detail: load_state_dict's first line is only a header, so the first
    line that says more is kept (a list of 80 missing keys is cut short)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch's messages carry terminal bold
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    line = f"{lines[0]} {lines[1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read_weights(path):
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is missing,
    unreadable, truncated or not PyTorch weights (or holds pickled code) raises a
    FileNotFoundError or ValueError naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds here: pickle, zip, OS, type errors
        raise ValueError(f"{path}: cannot read as PyTorch weights ({type(err).__name__}: "
                         f"{_first_line(err)})") from None


def _read_state_dict(path):
    """The state dict in ``path``: a plain one, or a checkpoint's ``"state_dict"``
    entry (no pickled code: weights_only)."""
    sd = read_weights(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return sd


def _load_ann_module(spec, path, task=None):
    """``FUNCTION()`` of ``FILE.py`` (``spec`` = "FILE.py:FUNCTION") with the
    state dict ``path`` loaded, checked to be a network ``to_snn`` converts (a
    conv chain, or any CNN of the graph conversion, :mod:`spikingir.models.graph`)
    and to take an image of its input channels (``task``'s where no conv reads the
    input directly). The file is the user's code: whatever fails in it is
    reported in one line."""
    import importlib.util
    import os

    file, sep, func = str(spec).rpartition(":")
    if not sep or not file or not func:
        raise ValueError(f"--ann-module: expected FILE.py:FUNCTION, got {spec!r}")
    if path is None:
        raise ValueError("--ann-module needs --ann-weights (the state dict to load into the network)")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such file (--ann-module)")
    loader_spec = importlib.util.spec_from_file_location("spikingir_user_ann", file)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"{file}: not a Python file (--ann-module)")
    code = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(code)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's code; one line
        raise ValueError(f"{file}: importing it failed ({type(err).__name__}: {err})") from None
    factory = getattr(code, func, None)
    if not callable(factory):
        raise ValueError(f"{file}: has no function {func!r} (--ann-module)")
    try:
        model = factory()
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a sys.exit() in it too
        raise ValueError(f"{spec}: calling it failed ({type(err).__name__}: {err})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}: returned a {type(model).__name__}, not an nn.Module")
    # refuse a network to_snn cannot convert, before any work, with the refusal of the
    # path to_snn takes: a conv chain's, or (any other CNN) the graph conversion's
    try:
        channels = input_channels(model)
    except (TypeError, ValueError) as err:
        raise ValueError(str(err)) from None
    if channels is None:  # no conv reads the input directly: the task's image channels
        channels = 3 if task == "dehaze" else 1
    try:
        model.load_state_dict(_read_state_dict(path))
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: does not fit the network of {spec} "
                         f"({_first_line(err)})") from None
    model.eval()
    # One small forward before any work: a network that cannot take an image (a
    # residual whose body changes the size, channels that do not chain) fails here
    # in one line instead of deep inside the conversion.
    probe = torch.zeros(1, channels, 48, 48)
    try:
        with torch.no_grad():
            model(probe)
    except Exception as err:  # noqa: BLE001 - the user's network
        raise ValueError(f"{spec}: the network fails on a {tuple(probe.shape)} image "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    return model


def input_channels(net):
    """The image channels ``net`` takes, as ``to_snn`` sees them: a conv chain's
    (DnCNN's) first conv's input channels, AOD-Net's 3, another CNN's through its
    traced graph (:mod:`spikingir.models.graph`; its first Conv2d need not read the
    image), an SNN's those of the network it was converted from; None where no conv
    reads the image directly. A network ``to_snn`` cannot convert raises its
    TypeError or ValueError. The CLI reads it before any image, to take gray
    images for a 1-channel denoiser and RGB ones for a 3-channel one."""
    from spikingir.convert import _graph_net, _is_chain
    from spikingir.models import conv_chain
    from spikingir.models.graph import GraphNet, SpikingGraph
    if isinstance(net, (SpikingChain, SpikingAODNet, GraphNet, SpikingGraph)):
        return _image_channels(net)
    if _is_chain(net):
        return conv_chain(net).convs()[0].in_channels
    if isinstance(net, AODNet):
        return 3
    return _graph_net(net).in_channels


def ann_fingerprint(ann) -> str:
    """16 hex digits of a SHA-256 over an ANN's weights (DnCNN BN folded first, as
    the conversion does): the same network gives the same digits whatever file
    or form it came in. SNN files record the fingerprint of the ANN they were
    converted from (``meta["ann_fingerprint"]``), so that an evaluation against
    another ANN can say so."""
    import hashlib

    from spikingir.models import DnCNN, fold_batchnorm
    if isinstance(ann, DnCNN) and ann.batchnorm:
        ann = fold_batchnorm(ann)
    digest = hashlib.sha256()
    for name, t in sorted(ann.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -------------------------------------------------------------------- SNN files

def snn_config(snn):
    """What is needed, besides the state dict, to rebuild a converted SNN."""
    from spikingir.models.graph import SpikingGraph, graph_config
    if not isinstance(snn, SpikingChain | SpikingAODNet | SpikingGraph):
        raise TypeError(f"save_snn: expected an SNN from to_snn or load_snn, got "
                        f"{type(snn).__name__}")
    n0 = snn.neurons_[0]
    arch = ("dncnn" if isinstance(snn, SpikingDnCNN) else "aodnet" if isinstance(snn, SpikingAODNet)
            else "graph" if isinstance(snn, SpikingGraph) else "chain")
    extra = {}
    if arch == "graph":  # its program (the traced computation) and layer geometry, plain data
        extra = graph_config(snn)
    if arch == "chain":  # the geometry of every conv, in order, and the skip
        extra = {"residual": snn.residual, "layers": [
            {"in": c.in_channels, "out": c.out_channels, "kernel": list(c.kernel_size),
             "stride": list(c.stride), "padding": list(c.padding), "dilation": list(c.dilation)}
            for c in snn.convs()]}
    return {"arch": arch, **extra, "timesteps": snn.timesteps, "neuron": snn.neuron_kind,
            "recycling": snn.recycling, "readout_clamp": snn.readout_clamp,
            "per_channel": n0.num_channels is not None, "v0": n0.v_init,
            "reuse_alpha": getattr(n0, "reuse_alpha", 0.75), "surrogate": n0.surrogate,
            # a per-channel tensor of sharpnesses as a list (plain JSON types)
            "alpha": n0.alpha.tolist() if isinstance(n0.alpha, torch.Tensor) else float(n0.alpha)}


def save_snn(snn, path, extra=None):
    """Saves a converted SNN as a plain dict (loads with weights_only=True):
    its config, state dict and ``extra`` as metadata, plus the fingerprint of
    the ANN it was converted from (``snn.meta``) unless ``extra`` gives one."""
    from spikingir.atomic import write_atomic
    import io

    import json
    # plain JSON types only (e.g. torch.__version__ is a str subclass that
    # weights_only loading rejects)
    fingerprint = getattr(snn, "meta", {}).get("ann_fingerprint")
    source = {} if fingerprint is None else {"ann_fingerprint": fingerprint}
    meta = json.loads(json.dumps({**source, **dict(extra or {})}, default=str))
    obj = {"config": snn_config(snn), "state_dict": snn.state_dict(), "meta": meta}
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


SNN_TASKS = {"dncnn": "denoise", "aodnet": "dehaze"}


def for_inference(snn, backend="auto"):
    """``snn`` in eval mode with its hidden convolutions on
    :func:`spikingir.ops.spike_conv2d` where it has them (DnCNN): the same
    network up to float32 rounding; on the CPU the event-driven kernel is ~2x
    faster than F.conv2d at DnCNN's firing rates, on a GPU ``auto`` runs Triton on
    the neurons' channel masks (18 % faster than cuDNN on float spikes, H100)."""
    if hasattr(snn, "use_spike_conv"):
        snn.use_spike_conv(True, backend=backend)
    return snn.eval()


def load_shipped_snn(task, sigma=None, timesteps=10, backend="auto"):
    """The fine-tuned SNN shipped for ``task`` ("denoise": ``sigma`` 15, 25 or
    50; "dehaze"), run at ``timesteps``, ready for inference on the CPU
    (:func:`for_inference`; move it with ``.to(device)``)."""
    from spikingir.weights import snn_weights_name, weights_path
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps: expected an int >= 1, got {timesteps!r}")
    snn = load_snn(weights_path(snn_weights_name(task, sigma)), backend=backend, task=task)
    snn.timesteps = timesteps
    return for_inference(snn, backend)


def _image_channels(net):
    """The image channels ``net`` takes: its first Conv2d's input channels; for a
    converted graph (:mod:`spikingir.models.graph`), whose first Conv2d need not
    read the image (a transposed conv or a concatenation before it), its
    ``in_channels``, None where no conv reads the image directly (any number)."""
    from spikingir.models.graph import GraphNet, SpikingGraph
    if isinstance(net, (GraphNet, SpikingGraph)):
        return net.in_channels
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def restore(image, snn, *, tile=None, amp=False, colour=None):
    """Restores one image with ``snn`` (or any model that maps [1, C, H, W] to
    [1, C, H, W]) on the device its parameters are on: ``image`` a float numpy
    array in [0, 1], H x W for a network of one input channel (the shipped
    DnCNNs) or H x W x 3 for one of three (AOD-Net, a colour DnCNN; a gray image
    is replicated to three channels: ``spikingir restore`` refuses a gray photo
    for a colour denoiser, whose noise would be the same in the three channels;
    other mismatches raise a ValueError). ``colour="per-channel"``: a grayscale network
    (one input channel, e.g. the shipped DnCNNs) restores each channel of an
    H x W x C image on its own, the C channels as one batch of gray images (one
    forward, C times the memory of a gray image's; a smaller ``tile`` bounds it),
    into an H x W x C result: each channel restored alone as a gray image, up to
    float32 rounding (the denoising SNNs on the CPU spike the same; oneDNN's
    float32 convolutions, their read-out's or an ANN's, can round a batch one ulp
    apart from one image); a network of more input channels raises a ValueError.
    Runs in overlapping tiles of ``tile`` pixels plus the network's
    receptive radius (:func:`spikingir.tiling.run_tiled`; the whole image's result
    in bounded memory; default ``DEFAULT_TILE``, 0: whole), without autograd;
    ``amp``: bf16 autocast, channels-last
    (:func:`spikingir.evaluate.bf16_inference`; on a GPU ~3x faster, not bit-exact;
    the network's settings are restored afterwards). Threads may share one network
    (each call's result is its own image's), except with ``amp``, which switches the
    network's settings for the call: another thread's call then runs with them, and
    two overlapping ``amp`` calls can leave the network switched (a copy per thread).
    Returns float32 numpy of the image's layout, not clipped."""
    from spikingir.evaluate import amp_context, bf16_inference_scope
    from spikingir.tiling import DEFAULT_TILE, receptive_radius, run_tiled

    if not isinstance(image, np.ndarray) or not np.issubdtype(image.dtype, np.floating):
        raise TypeError("restore: expected a float numpy image in [0, 1]")
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"restore: expected an H x W or H x W x C image with H, W >= 1, got "
                         f"shape {image.shape}")
    if not isinstance(snn, nn.Module):
        raise TypeError(f"restore: expected the network as an nn.Module, got {type(snn).__name__}")
    first = next((m for m in snn.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"restore: {type(snn).__name__} has no Conv2d layer; expected an SNN from "
                         "load_shipped_snn / load_snn / to_snn or a restoration CNN")
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, numbers.Integral)
                             or tile < 0):
        raise ValueError(f"restore: tile: expected None or an int >= 0 (0: the whole image at "
                         f"once), got {tile!r}")
    per_channel = _check_colour(colour, "restore")
    channels = _image_channels(snn)
    if per_channel and channels not in (None, 1):  # each channel goes in as a gray image
        raise ValueError(f"restore: colour='per-channel' runs a grayscale network on each "
                         f"colour channel; this one takes {channels} channels (a colour "
                         "model: pass the RGB image without colour=)")
    if not per_channel:
        if channels is None:  # no conv reads the image directly: the image's own
            channels = 1 if image.ndim == 2 else image.shape[2]
        if image.ndim == 2 and channels == 3:
            image = np.repeat(image[..., None], 3, 2)
        if (image.ndim == 2 and channels != 1) or (image.ndim == 3 and image.shape[2] != channels):
            hint = (" (colour='per-channel' restores each channel on its own)"
                    if channels == 1 else "")
            raise ValueError(f"restore: the network takes {channels} channel(s), got an image of "
                             f"shape {image.shape}{hint}")
    param = next(snn.parameters())
    device, dtype = param.device, param.dtype  # e.g. a .double() or .half() network
    fmt = torch.contiguous_format
    if amp:  # bf16 for this call only: the network comes back as it came
        fmt, dtype = torch.channels_last, torch.float32
    tile = DEFAULT_TILE if tile is None else tile
    # the margin only where the image is tiled: a network whose reach has no
    # simple radius (strides, pooling) restores an image of one tile
    tiled = tile > 0 and max(image.shape[:2]) > tile
    x = _to_input(image)  # [1, C, H, W]
    if per_channel:  # the channels as a batch of gray images: [C, 1, H, W]
        x = x.transpose(0, 1)
    with torch.no_grad(), bf16_inference_scope(snn, amp), amp_context(device, amp):
        out = run_tiled(lambda t: snn(t.to(device, dtype).contiguous(memory_format=fmt))
                        .float().cpu(),
                        x, tile, receptive_radius(snn) if tiled else 0)
    out = (out[:, 0] if per_channel else out[0]).numpy()  # [C, H, W]
    return out[0] if out.shape[0] == 1 and image.ndim == 2 else out.transpose(1, 2, 0)


def load_snn(path, backend="auto", task=None):
    """Rebuilds a converted SNN saved by :func:`save_snn`. With ``task``
    (``"denoise"`` or ``"dehaze"``), a file holding the other task's network
    raises a ValueError."""
    if task not in (None, *SNN_TASKS.values()):
        raise ValueError(f"task: expected None, 'denoise' or 'dehaze', got {task!r}")
    obj = read_weights(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict) or \
            not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{path}: not a SpikingIR SNN checkpoint (expected config + state_dict)")
    try:
        return _build_snn(path, obj, backend, task)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a complete SpikingIR SNN checkpoint ({type(err).__name__}: "
                         f"{_first_line(err)})") from None
    except ValueError as err:  # a bad config value: name the file it came from
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: invalid SNN config ({_first_line(err)})") from None


def _build_snn(path, obj, backend, task):
    """load_snn's network from a checkpoint dict that has a config and a state."""
    cfg, sd = obj["config"], obj["state_dict"]
    extra = {}
    if task is not None and SNN_TASKS.get(cfg.get("arch")) not in (None, task):
        names = {"dncnn": "a DnCNN SNN (denoise)", "aodnet": "an AOD-Net SNN (dehaze)"}
        raise ValueError(f"{path}: holds {names[cfg['arch']]}, not one for the {task} task")
    if cfg["arch"] == "dncnn":
        convs = [m for m in DnCNN(depth=sum(1 for k in sd if k.endswith("weight") and sd[k].dim() == 4),
                                  channels=sd["conv1.weight"].shape[0],
                                  image_channels=sd["conv1.weight"].shape[1],
                                  batchnorm=False).convs()]
        cls = SpikingDnCNN
    elif cfg["arch"] == "aodnet":
        convs = AODNet().convs()
        cls = SpikingAODNet
        if "offset" not in sd:  # saved before AOD-Net SNNs had DC offsets: none
            sd = {**sd, "offset": torch.zeros(convs[-1].in_channels)}
    elif cfg["arch"] == "chain":
        try:
            convs = [nn.Conv2d(c["in"], c["out"], tuple(c["kernel"]), stride=tuple(c["stride"]),
                               padding=tuple(c["padding"]), dilation=tuple(c["dilation"]))
                     for c in cfg["layers"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed conv chain config ({err!r})") from None
        cls, extra = SpikingChain, {"residual": bool(cfg.get("residual", False))}
    elif cfg["arch"] == "graph":  # a converted network of the user's (spikingir.models.graph)
        from spikingir.models.graph import SpikingGraph, graph_from_config
        try:
            convs = graph_from_config(cfg)
        except ValueError as err:
            raise ValueError(f"{path}: malformed graph network config "
                             f"({_first_line(err)})") from None
        cls = SpikingGraph
    else:
        raise ValueError(f"{path}: unknown SNN architecture {cfg['arch']!r}")
    alpha = torch.tensor(cfg["alpha"]) if isinstance(cfg["alpha"], list) else cfg["alpha"]
    neurons = []
    # each neuron layer follows its conv (in a graph, where a conv feeds it directly): a
    # per-channel size that differs would load, then fail inside the first forward
    widths = (convs.relu_channels() if cfg["arch"] == "graph" else
              [c.out_channels for c in convs[:-1]])
    for i, width in enumerate(widths):
        th = sd[f"neurons_.{i}.theta"]
        for name, value in (("theta", th), ("alpha", alpha)):
            if isinstance(value, torch.Tensor) and width is not None and \
                    value.numel() not in (1, width):
                raise ValueError(f"{path}: neuron layer {i} has {value.numel()} {name} values for "
                                 f"the {width} channels of its conv")
        neurons.append(make_neuron(cfg["neuron"], 1.0,
                                   num_channels=th.numel() if th.dim() == 1 else None,
                                   v_init=cfg["v0"], backend=backend, surrogate=cfg["surrogate"],
                                   alpha=alpha, reuse_alpha=cfg["reuse_alpha"]))
    snn = cls(convs, neurons, int(cfg["timesteps"]), cfg["neuron"], bool(cfg["recycling"]), **extra)
    # files saved before the key existed clamped the residual: they keep doing so
    snn.readout_clamp = cfg.get("readout_clamp", "residual")
    if snn.readout_clamp not in READOUT_CLAMPS:
        raise ValueError(f"{path}: unknown readout_clamp {snn.readout_clamp!r}")
    try:
        snn.load_state_dict(sd)
    except RuntimeError as err:
        raise ValueError(f"{path}: SNN state does not fit its config ({_first_line(err)})") from None
    snn.meta = dict(obj.get("meta") or {})  # what the fine-tuning run recorded (task, sigma, ...)
    return snn.eval()
