"""SpikingIR: spiking neural networks for image restoration, with fused neuron kernels."""
from . import nn, ops

__version__ = "0.1.0"
__all__ = ["ops", "nn", "__version__"]
