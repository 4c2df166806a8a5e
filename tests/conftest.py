"""Test set-up: on a machine without a GPU the Triton kernels run under the
Triton interpreter on CPU tensors (set before spikingir imports triton); the
package and its kernels must come from this checkout."""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def _from_this_checkout():
    """``spikingir.kernels`` is ``kernels/`` mapped in by setup.py's package_dir (and
    ``spikingir._C`` can resolve the same way). Tests run from another checkout
    (PYTHONPATH=clone while an editable install of a different checkout is active)
    would import this checkout's ``spikingir`` but the other one's kernels, and pass
    or fail for the wrong code: refuse that."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, want in (("spikingir", os.path.join(root, "spikingir", "__init__.py")),
                       ("spikingir.kernels", os.path.join(root, "kernels", "__init__.py"))):
        spec = importlib.util.find_spec(name)
        got = spec.origin if spec is not None else None
        if got is None or not os.path.samefile(got, want):
            raise RuntimeError(f"tests of {root} would import {name} from {got}, not {want}: "
                               "install this checkout (pip install --no-build-isolation -e .) "
                               "or run the tests of the checkout that is installed")
    # the compiled kernels: none is allowed (their tests skip), another checkout's is not
    spec = importlib.util.find_spec("spikingir._C")
    if spec is not None and not os.path.samefile(os.path.dirname(spec.origin),
                                                 os.path.join(root, "spikingir")):
        raise RuntimeError(f"tests of {root} would import spikingir._C from {spec.origin}: build "
                           "this checkout (pip install --no-build-isolation -e .)")


_from_this_checkout()
