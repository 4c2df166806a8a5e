"""SpikingIR: spiking neural networks for image restoration, with fused neuron kernels.

``spikingir.ops`` (the fused ops, registered as ``torch.ops.spikingir``) and
``spikingir.nn`` load on first use, so that ``import spikingir`` does not import
torch: the ``spikingir`` command sets torch's allocator options
(``THP_MEM_ALLOC_ENABLE``, read once, at torch's first allocation) before torch
loads. ``import spikingir.ops`` or any submodule imports torch as usual.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["ops", "nn", "__version__"]


def __getattr__(name):  # PEP 562: the submodules load (and import torch) on first access
    if name in ("ops", "nn"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
