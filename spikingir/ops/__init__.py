"""The op layer: public functional API of spikingir's ops."""
from .backends import HAS_CPP_OPS, HAS_CUDA_OPS, HAS_TRITON, available_backends
from .masks import SpikeMasks
from .neuron import if_multistep, mprn_multistep
from .spike_conv import spike_conv2d

__all__ = ["if_multistep", "mprn_multistep", "spike_conv2d", "SpikeMasks", "available_backends",
           "HAS_CPP_OPS", "HAS_CUDA_OPS", "HAS_TRITON"]
