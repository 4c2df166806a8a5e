"""Triton kernels of spikingir (installed as ``spikingir.kernels``).

Importing this package needs ``triton``; spikingir.ops imports it lazily and
reports a clear error when Triton is missing. Set ``TRITON_INTERPRET=1`` before
import to run the kernels on CPU tensors (tests do this in CI).
"""
