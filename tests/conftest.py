"""Test set-up: on a machine without a GPU the Triton kernels run under the
Triton interpreter on CPU tensors (set before spikingir imports triton)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
