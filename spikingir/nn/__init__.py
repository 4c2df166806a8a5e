"""Drop-in spiking modules."""
from .neuron import IFNeuron, MPRNeuron, SeqToBatch

__all__ = ["IFNeuron", "MPRNeuron", "SeqToBatch"]
