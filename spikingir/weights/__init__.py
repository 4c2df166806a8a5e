"""Weights shipped with the package (see README.md in this folder for how each
file was trained and what it scores).

- ``dncnn_s{15,25,50}.pt``: DnCNN-S, BN folded: plain state dicts that load with
  ``strict=True`` into ``DnCNN(batchnorm=False)``.
- ``aodnet.pt``: AOD-Net state dict.

Each ANN file ``NAME.pt`` has a ``NAME.json`` beside it with its metadata (task,
sigma, steps, validation figures, ...); the SNN files ``snn_*.pt`` carry theirs
inside (``spikingir.pipeline.save_snn``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["WEIGHTS_DIR", "ANN_FILES", "SNN_FILES", "DENOISE_SIGMAS", "weights_path",
           "ann_weights_name", "snn_weights_name", "load_shipped_ann", "shipped_metadata"]

WEIGHTS_DIR = Path(__file__).resolve().parent
DENOISE_SIGMAS = (15, 25, 50)
ANN_FILES = {("denoise", s): f"dncnn_s{s}.pt" for s in DENOISE_SIGMAS} | {("dehaze", None): "aodnet.pt"}
#: The fine-tuned SNNs of those ANNs (``spikingir.pipeline.load_shipped_snn``).
SNN_FILES = {("denoise", s): f"snn_dncnn_s{s}.pt" for s in DENOISE_SIGMAS} | {("dehaze", None): "snn_aodnet.pt"}
TASKS = ("denoise", "dehaze")


def weights_path(name: str) -> Path:
    """Path of the shipped file ``name`` (e.g. ``"dncnn_s25.pt"``);
    FileNotFoundError if the package does not hold it."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"weights_path: expected a file name such as 'dncnn_s25.pt', got {name!r}")
    path = WEIGHTS_DIR / name
    if not path.is_file():
        have = sorted(p.name for p in WEIGHTS_DIR.glob("*.pt"))
        raise FileNotFoundError(f"no shipped weights file {name!r} in {WEIGHTS_DIR} "
                                f"(have: {', '.join(have) or 'none'})")
    return path


def _norm_sigma(task: str, sigma):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "dehaze":
        if sigma is not None:
            raise ValueError("sigma applies to the denoise task only")
        return None
    if sigma is None:
        raise ValueError(f"the denoise task needs a sigma, one of {', '.join(map(str, DENOISE_SIGMAS))}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma not in DENOISE_SIGMAS:
        raise ValueError(f"no shipped DnCNN for sigma={sigma!r}; shipped: "
                         f"{', '.join(map(str, DENOISE_SIGMAS))}")
    return int(sigma)


def ann_weights_name(task: str, sigma=None) -> str:
    """File name of the shipped ANN for ``task`` (and ``sigma`` for denoise)."""
    return ANN_FILES[(task, _norm_sigma(task, sigma))]


def snn_weights_name(task: str, sigma=None) -> str:
    """File name of the shipped fine-tuned SNN for ``task`` (and ``sigma`` for denoise)."""
    return SNN_FILES[(task, _norm_sigma(task, sigma))]


def shipped_metadata(task: str, sigma=None) -> dict:
    """The JSON metadata written next to the shipped ANN weights."""
    path = weights_path(ann_weights_name(task, sigma)).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"no metadata file {path}")
    with open(path) as f:
        return json.load(f)


def load_shipped_ann(task: str, sigma=None) -> nn.Module:
    """The shipped ANN in eval mode on the CPU: ``DnCNN(batchnorm=False)`` for
    ``task="denoise"`` (sigma 15, 25 or 50), ``AODNet()`` for ``"dehaze"``.
    ValueError for an unknown task or sigma, FileNotFoundError for a missing file."""
    from spikingir.models import AODNet, DnCNN

    name = ann_weights_name(task, sigma)
    path = weights_path(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = DnCNN(batchnorm=False) if task == "denoise" else AODNet()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold {type(model).__name__} weights: "
                         f"{str(err).splitlines()[0]}") from err
    return model.eval()
