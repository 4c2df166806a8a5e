"""Restoration ANNs: DnCNN (denoising) and AOD-Net (dehazing), and the chain
form in which ``spikingir.convert.to_snn`` takes other CNNs."""
from .aodnet import AODNet
from .chain import ConvChain, Residual, conv_chain
from .dncnn import DnCNN, fold_batchnorm, load_dncnn, load_dncnn_pytorch_bn

__all__ = ["DnCNN", "AODNet", "ConvChain", "Residual", "conv_chain", "fold_batchnorm", "load_dncnn",
           "load_dncnn_pytorch_bn"]
