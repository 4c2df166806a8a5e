"""The one place a backend is chosen.

=========  =====================================  ==========================================
backend    runs                                   available when
=========  =====================================  ==========================================
torch      pure-PyTorch reference (autograd)      always, any device and float dtype
cpp        C++ kernel (spikingir._C)              CPU tensors, the extension is built
cuda       CUDA C++ kernel (spikingir._C)         CUDA tensors, built with nvcc + CUDA torch
triton     Triton kernel (spikingir.kernels)      CUDA tensors and triton; CPU tensors only
                                                  under TRITON_INTERPRET=1
=========  =====================================  ==========================================

``auto`` picks the fastest available backend for the device; a backend named
explicitly is used or refused with an error that says why, never swapped.
"""
import functools
import os
import re
import warnings

import torch

#: The oldest torch spikingir supports (pyproject.toml's floor). The ops register
#: with torch.library.register_fake / register_autograd and look for torch.func
#: transforms with torch._C._functorch.maybe_current_level, all torch 2.4 APIs: an
#: older torch failed at import with an AttributeError from inside the registration.
TORCH_MIN = (2, 6)


def _check_torch_version(version):
    """ImportError unless ``version`` (``torch.__version__``) is at least
    :data:`TORCH_MIN`; a pre-release or local build counts as its release
    (``2.6.0a0+git...`` is 2.6)."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m and (int(m[1]), int(m[2])) < TORCH_MIN:
        raise ImportError(f"spikingir needs torch >= {TORCH_MIN[0]}.{TORCH_MIN[1]}, found torch "
                          f"{version}: upgrade torch, then rebuild spikingir's extension against "
                          "it (pip install --no-build-isolation -e .)")


_check_torch_version(torch.__version__)

try:  # importing the extension runs its TORCH_LIBRARY registrations
    from spikingir import _C  # noqa: F401

    HAS_CPP_OPS = True
    _CPP_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the build
    HAS_CPP_OPS = False
    _CPP_ERROR = str(exc)


def _explain_import_error(message):
    """The extension's import error, with the usual cause of an undefined symbol:
    a build against another torch than the one running."""
    if "undefined symbol" in message:
        message += (f" -- spikingir._C was built against another torch than the running "
                    f"{torch.__version__}; rebuild it with `pip install --no-build-isolation -e .`")
    return message


_CPP_ERROR = _explain_import_error(_CPP_ERROR)

HAS_CUDA_OPS = HAS_CPP_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
    "spikingir::neuron_fwd", "CUDA")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
    _TRITON_ERROR = ""
except ImportError as exc:
    HAS_TRITON = False
    _TRITON_ERROR = str(exc)

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("torch", "cpp", "cuda", "triton")
#: Backends each op implements, fastest first (the order ``auto`` tries).
OP_BACKENDS = {
    "if_multistep": ("cuda", "triton", "cpp", "torch"),
    "mprn_multistep": ("cuda", "triton", "cpp", "torch"),
    "spike_conv2d": ("cuda", "triton", "cpp", "torch"),
    # spike_conv2d with its spikes given as SpikeMasks (channel bit masks)
    "spike_conv2d_masks": ("cuda", "triton", "cpp", "torch"),
}
#: (op, device type) where ``auto`` tries its own order, because measurements say
#: so (the first available backend of the tuple wins). On an H100 (benchmarks/
#: RESULTS.md, GPU runs 2026-11-27):
#: - spike_conv2d of float spikes: cuDNN (the ``torch`` backend). Single convs of
#:   DnCNN's layers ([20, 64, 96, 96] real maps) took cuDNN fp32 0.39 ms, the event
#:   CUDA kernel 0.43-0.62 ms, Triton 0.64-0.86 ms.
#: - spike_conv2d of SpikeMasks (what the neurons emit in a spiking net): Triton.
#:   The DnCNN SNN (321x481, T=10) ran in 47.1 ms with Triton reading the
#:   neurons' masks, 57.5 ms with float spikes through cuDNN, 79.1 ms with the
#:   CUDA masks kernel; without Triton, cuDNN (the net then emits float spikes).
AUTO_OVERRIDE = {("spike_conv2d", "cuda"): ("torch",),
                 ("spike_conv2d_masks", "cuda"): ("triton", "torch")}
#: The compiled op whose CUDA kernel a ``cuda`` backend of each op needs.
_CUDA_SCHEMA = {"spike_conv2d": "spikingir::spike_conv2d_fwd",
                "spike_conv2d_masks": "spikingir::spike_conv2d_fwd_masks"}
#: Input dtypes of the fused backends (the reference takes any float dtype).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _device_type(device) -> str:
    return torch.device(device).type


def why_unavailable(backend: str, device, op: str = "if_multistep"):
    """None when ``backend`` can run ``op`` on ``device``, else the reason."""
    if op not in OP_BACKENDS:
        raise ValueError(f"op: expected one of {sorted(OP_BACKENDS)}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in OP_BACKENDS[op]:
        return f"{op} has no {backend!r} implementation"
    dev = _device_type(device)
    if backend == "torch":
        return None
    if backend == "cpp":
        if dev != "cpu":
            return f"'cpp' runs on CPU tensors, got a {dev} tensor"
        if not HAS_CPP_OPS:
            return f"the compiled extension spikingir._C failed to import ({_CPP_ERROR})"
        return None
    if backend == "cuda":
        if dev != "cuda":
            return f"'cuda' runs on CUDA tensors, got a {dev} tensor"
        if torch.cuda.is_available():
            major, minor = _device_capability(device)
            if major < 8:  # no kernel image would load: a call would fail inside CUDA
                return (f"spikingir's CUDA kernels are built for compute capability 8.0 and newer "
                        f"(the spike convolution uses cp.async); this GPU is {major}.{minor}")
        if not HAS_CUDA_OPS or not torch._C._dispatch_has_kernel_for_dispatch_key(
                _CUDA_SCHEMA.get(op, "spikingir::neuron_fwd"), "CUDA"):
            return ("spikingir._C was built without CUDA kernels (needs nvcc and a CUDA "
                    "torch at build time; see README 'Building for a GPU')")
        return None
    # triton
    if not HAS_TRITON:
        return f"triton is not installed ({_TRITON_ERROR}); pip install 'spikingir[triton]'"
    if not HAS_CPP_OPS:
        return f"the op schemas live in spikingir._C, which failed to import ({_CPP_ERROR})"
    if dev == "cuda":
        if op.startswith("spike_conv2d") and torch.cuda.is_available():
            major, minor = _device_capability(device)
            if major < 8:
                return (f"the Triton spike_conv2d accumulates in int8 tensor-core dots, which "
                        f"need compute capability 8.0 or newer; this GPU is {major}.{minor}")
        return None
    if dev == "cpu" and TRITON_INTERPRET:
        return None
    return f"'triton' runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {dev}"


def _device_capability(device):
    """(major, minor) of the CUDA device ``device`` names (its current device when
    it names no index)."""
    index = torch.device(device).index
    return _capability(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _capability(index):
    """(major, minor) compute capability of CUDA device ``index`` (cached: choose()
    runs on every op call)."""
    return torch.cuda.get_device_capability(index)


def available_backends(device, op: str = "if_multistep") -> list:
    """Backends that can run ``op`` on ``device``, fastest first."""
    if op not in OP_BACKENDS:
        raise ValueError(f"op: expected one of {sorted(OP_BACKENDS)}, got {op!r}")
    return [b for b in OP_BACKENDS[op] if why_unavailable(b, device, op) is None]


_warned_fallback = set()


def choose(op: str, device, dtype: torch.dtype, requested: str = "auto") -> str:
    """Returns the backend that runs ``op`` for inputs on ``device`` of ``dtype``.

    ``auto``: the fastest available fused backend (the interpreted Triton
    backend is never picked automatically), or the first available backend of
    the measured order in ``AUTO_OVERRIDE``; the reference for float64, which
    no fused kernel takes; on a device with no fused backend (the extension failed
    to build or import, or has no CUDA kernels), the reference with a warning. A
    named backend that cannot run raises an error saying why.
    """
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str, got {type(requested).__name__}")
    fused_dtype = dtype in FUSED_DTYPES
    if requested == "auto":
        if not fused_dtype:
            return "torch"
        dev = _device_type(device)
        for b in AUTO_OVERRIDE.get((op, dev), ()):
            if why_unavailable(b, device, op) is None:
                return b
        for b in OP_BACKENDS[op]:
            if b == "triton" and dev != "cuda":
                continue
            if b != "torch" and why_unavailable(b, device, op) is None:
                return b
        if (op, dev) not in _warned_fallback:
            # A missing fused backend is a build or install failure the caller should
            # see (a CPU torch install whose extension did not build, a CUDA machine
            # without the CUDA kernels), not a silent 5-20x slowdown.
            _warned_fallback.add((op, dev))
            expected = "cpp" if dev == "cpu" else "cuda"
            warnings.warn(f"spikingir: no fused backend for {op} on {dev} "
                          f"({why_unavailable(expected, device, op)}); using the slow "
                          "PyTorch reference", RuntimeWarning, stacklevel=3)
        return "torch"
    reason = why_unavailable(requested, device, op)
    if reason is not None:
        raise ValueError(f"backend={requested!r} is not available for {op}: {reason}")
    if requested != "torch" and not fused_dtype:
        raise TypeError(f"x_seq: backend {requested!r} takes float32, float16 or bfloat16 "
                        f"inputs, got {dtype}; use backend='torch' for {dtype}")
    return requested
