"""Restoration ANNs: DnCNN (denoising) and AOD-Net (dehazing); ``Residual`` for
your own CNN's global skip (``spikingir.convert.to_snn`` takes an
``nn.Sequential``, optionally inside it), and ``ConvChain``, the flat form
``to_snn`` reads such a network into (``conv_chain``)."""
from .aodnet import AODNet
from .chain import ConvChain, Residual, conv_chain
from .dncnn import DnCNN, fold_batchnorm, load_dncnn, load_dncnn_pytorch_bn

__all__ = ["DnCNN", "AODNet", "ConvChain", "Residual", "conv_chain", "fold_batchnorm", "load_dncnn",
           "load_dncnn_pytorch_bn"]
