"""Restoration ANNs: DnCNN (denoising) and AOD-Net (dehazing)."""
from .aodnet import AODNet
from .dncnn import DnCNN, fold_batchnorm, load_dncnn, load_dncnn_pytorch_bn

__all__ = ["DnCNN", "AODNet", "fold_batchnorm", "load_dncnn", "load_dncnn_pytorch_bn"]
