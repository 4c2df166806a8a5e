"""DnCNN (Zhang et al., TIP 2017): residual denoiser, ``output = x - dncnn(x)``.

Two forms share one class (DESIGN §5):

- ``batchnorm=True`` (training form, the layout of cszn/DnCNN's dncnn_pytorch)::

      Conv(C,64,bias) ReLU  15 x [Conv(64,64,bias=False) BatchNorm2d(64, eps=1e-4, momentum=0.95) ReLU]
      Conv(64,C,bias=False)

- ``batchnorm=False`` (deployment / conversion form)::

      Conv(C,64,bias) ReLU  15 x [Conv(64,64,bias) ReLU]  Conv(64,C,bias)

  ``self.dncnn`` is exactly [Conv, ReLU, Conv, ReLU, ..., Conv], so the
  MatConvNet-converted official weights (keys ``dncnn.{0,2,...,32}.weight/.bias``)
  load with ``strict=True``.

``fold_batchnorm`` turns the first form into the second (eval-mode BN statistics);
``load_dncnn`` builds whichever form a state dict describes.
"""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["DnCNN", "fold_batchnorm", "load_dncnn", "load_dncnn_pytorch_bn"]

BN_EPS = 1e-4
BN_MOMENTUM = 0.95


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DnCNN: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"DnCNN: {name} must be >= {minimum}, got {value}")


class DnCNN(nn.Module):
    """DnCNN denoiser predicting the noise: ``forward(x) = x - self.dncnn(x)``.

    Args:
        depth: number of conv layers (17 for DnCNN-S, 20 for DnCNN-B); >= 2.
        channels: feature channels of the hidden layers.
        image_channels: 1 for grayscale, 3 for colour.
        batchnorm: True for the training form (hidden convs without bias + BN,
            last conv without bias); False for the folded form (every conv has a bias).

    Input: ``[B, image_channels, H, W]`` float tensor (any H, W; padding keeps size).
    """

    def __init__(self, depth: int = 17, channels: int = 64, image_channels: int = 1,
                 batchnorm: bool = True):
        super().__init__()
        _check_int("depth", depth, 2)
        _check_int("channels", channels, 1)
        _check_int("image_channels", image_channels, 1)
        if not isinstance(batchnorm, bool):
            raise TypeError(f"DnCNN: batchnorm must be a bool, got {type(batchnorm).__name__}")
        self.depth, self.channels = depth, channels
        self.image_channels, self.batchnorm = image_channels, batchnorm

        layers = [nn.Conv2d(image_channels, channels, 3, padding=1, bias=True), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(channels, image_channels, 3, padding=1, bias=not batchnorm))
        self.dncnn = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the reference PyTorch code: orthogonal conv weights,
        zero biases, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def convs(self) -> list[nn.Conv2d]:
        """The conv layers in order (for converters and energy counting)."""
        return [m for m in self.dncnn if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DnCNN: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"DnCNN: input must be [B, {self.image_channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        return x - self.dncnn(x)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, channels={self.channels}, "
                f"image_channels={self.image_channels}, batchnorm={self.batchnorm}")


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv followed by bn (eval mode), computed in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm: BatchNorm2d has no running statistics "
                         "(track_running_stats=False) and cannot be folded")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                             device=w.device)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
    scale = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    w_f = w * scale.view(-1, 1, 1, 1)
    b_f = (b - bn.running_mean.detach().double()) * scale + beta
    return w_f.to(conv.weight.dtype), b_f.to(conv.weight.dtype)


def fold_batchnorm(model: DnCNN) -> DnCNN:
    """Return an equivalent ``DnCNN(batchnorm=False)`` with every BN folded into
    the conv before it.

    Equivalence holds for the BN layers in eval mode (running statistics),
    whatever ``model.training`` is. The new model is in eval mode, on the
    model's device and dtype; ``model`` is left unchanged. A model that has no
    BN already is deep-copied.
    """
    if not isinstance(model, DnCNN):
        raise TypeError(f"fold_batchnorm: expected a DnCNN, got {type(model).__name__}")
    if not model.batchnorm:
        return copy.deepcopy(model).eval()
    ref = next(model.parameters())
    folded = DnCNN(model.depth, model.channels, model.image_channels, batchnorm=False).to(
        device=ref.device, dtype=ref.dtype)
    src = list(model.dncnn)
    src_convs = [(i, m) for i, m in enumerate(src) if isinstance(m, nn.Conv2d)]
    dst_convs = folded.convs()
    with torch.no_grad():
        for (i, conv), dst in zip(src_convs, dst_convs):
            nxt = src[i + 1] if i + 1 < len(src) else None
            if isinstance(nxt, nn.BatchNorm2d):
                w, b = _fold_conv_bn(conv, nxt)
            else:
                w = conv.weight.detach()
                b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(dst.bias)
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    return folded.eval()


def _clean_state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"load_dncnn: expected a state dict or a module, got {type(obj).__name__}")
    sd = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        sd[k] = v
    return sd


def _read(path, allow_pickle: bool):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_dncnn: no such weights file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled whole module needs full unpickling
        if not allow_pickle:
            raise ValueError(
                f"load_dncnn: {path} is not a plain state dict ({type(err).__name__}: {err}). "
                "If it is a pickled whole module from a trusted source, pass allow_pickle=True "
                "(this runs torch.load(weights_only=False), which can execute code).") from err
        return torch.load(path, map_location="cpu", weights_only=False)


def load_dncnn(source, allow_pickle: bool = False, strict: bool = True) -> DnCNN:
    """Build a DnCNN from a weights file, a state dict or a module, inferring the
    form (BN or not), depth, channels and image channels from the keys and shapes.

    Accepts ``dncnn.N.*`` keys (an optional ``module.`` prefix is dropped). The
    returned model is in eval mode on the CPU.
    """
    obj = _read(os.fspath(source), allow_pickle) if isinstance(source, (str, os.PathLike)) else source
    sd = _clean_state_dict(obj)
    conv_idx = sorted(int(m.group(1)) for k, v in sd.items()
                      if (m := re.fullmatch(r"dncnn\.(\d+)\.weight", k)) and v.dim() == 4)
    if len(conv_idx) < 2:
        raise ValueError("load_dncnn: found fewer than two conv weights named dncnn.N.weight; "
                         f"keys start with {list(sd)[:4]}")
    batchnorm = any(k.endswith("running_mean") for k in sd)
    first, last = sd[f"dncnn.{conv_idx[0]}.weight"], sd[f"dncnn.{conv_idx[-1]}.weight"]
    model = DnCNN(depth=len(conv_idx), channels=first.shape[0], image_channels=first.shape[1],
                  batchnorm=batchnorm)
    if last.shape[0] != model.image_channels:
        raise ValueError(f"load_dncnn: last conv has {last.shape[0]} outputs but the first has "
                         f"{model.image_channels} inputs")
    model.load_state_dict(sd, strict=strict)
    return model.eval()


def load_dncnn_pytorch_bn(path, fold: bool = False, allow_pickle: bool = False) -> DnCNN:
    """Load ``dncnn_s25_pytorch_bn.pt`` (cszn/DnCNN dncnn_pytorch retraining) into
    ``DnCNN(batchnorm=True)``, or its BN-folded form when ``fold=True``.

    The stored file is a plain ``OrderedDict`` state dict whose keys already
    match this class's BN layout (``dncnn.0`` conv, ``dncnn.{2+3i}`` conv,
    ``dncnn.{3+3i}`` BN, ``dncnn.47`` conv), so no key mapping is needed; a
    pickled whole module is accepted with ``allow_pickle=True``.
    """
    model = load_dncnn(path, allow_pickle=allow_pickle)
    if not model.batchnorm:
        raise ValueError(f"load_dncnn_pytorch_bn: {path} has no BatchNorm statistics; "
                         "use load_dncnn for BN-free weights")
    return fold_batchnorm(model) if fold else model
