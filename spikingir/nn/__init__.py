"""Drop-in spiking modules."""
from .neuron import IFNeuron, MPRNeuron, SeqToBatch
from .spike_conv import SpikeConv2d

__all__ = ["IFNeuron", "MPRNeuron", "SeqToBatch", "SpikeConv2d"]
