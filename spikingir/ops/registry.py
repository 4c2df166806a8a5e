"""Registration shared by the fused ops: fake kernels, autograd, and the Python
implementations of the ``*_triton`` schemas (all schemas: csrc/ops.cpp).

An op ``spikingir::<stem>_fwd`` / ``<stem>_bwd`` has a compiled CPU/CUDA kernel;
its twin ``<stem>_fwd_triton`` / ``<stem>_bwd_triton`` is implemented by
``spikingir.kernels.<module>.<stem>_{fwd,bwd}_triton`` for the CPU (Triton
interpreter) and CUDA dispatch keys. Both get the same fake kernels and the same
autograd formula, whose backward calls the matching backward op.
"""
import functools
import importlib
import threading

import torch

from . import backends


def register_fused_op(stem, kernel_module, fake_fwd, fake_bwd, setup_context, backward_via):
    """Registers ``spikingir::<stem>_fwd`` and its Triton twin (when triton imports).

    ``backward_via(bwd_op)`` returns the autograd backward that calls ``bwd_op``;
    ``setup_context(ctx, inputs, output, triton=False)`` is called with
    ``triton=True`` for the twin.
    """
    if not backends.HAS_CPP_OPS:
        return
    ops = torch.ops.spikingir
    pairs = [(f"spikingir::{stem}_fwd", f"spikingir::{stem}_bwd", getattr(ops, f"{stem}_bwd"),
              setup_context)]
    if backends.HAS_TRITON:
        for part in ("fwd", "bwd"):
            _register_triton(f"{stem}_{part}", kernel_module)
        pairs.append((f"spikingir::{stem}_fwd_triton", f"spikingir::{stem}_bwd_triton",
                      getattr(ops, f"{stem}_bwd_triton"),
                      functools.partial(setup_context, triton=True)))
    for fwd, bwd, bwd_op, setup in pairs:
        torch.library.register_fake(fwd)(_on_one_device(fake_fwd))
        torch.library.register_fake(bwd)(_on_one_device(fake_bwd))
        torch.library.register_autograd(fwd, backward_via(bwd_op), setup_context=setup)
        torch.library.register_autograd(bwd, _no_double_backward(stem),
                                        setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(stem):
    """The backward op's own autograd formula: a clear error. The fused backward
    kernels compute first-order gradients only; without a formula, a gradient taken
    with ``create_graph=True`` would be silently treated as constant (its own
    gradient zero)."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"spikingir: double backward through the fused {stem} op is not supported "
            "(its gradient is not differentiable); use backend='torch' for "
            "higher-order gradients")
    return backward


def refuse_other_autodiff(op, backend, *tensors):
    """A clear error when a fused op's input is differentiated by something other than
    reverse-mode autograd. The fused ops' formula (register_autograd) is reverse mode
    only: forward-mode AD (torch.autograd.forward_ad) dropped the tangents silently (a
    zero derivative), and torch.func.grad / jacrev / jvp / jacfwd failed inside torch
    with a message about autograd.Function.setup_context."""
    if torch.compiler.is_compiling():
        return
    # fast path (0.5 us against 7 us for the per-tensor test: a GPU call's host time
    # matters): no forward-AD level and no torch.func transform active
    if torch.autograd.forward_ad._current_level < 0 and \
            torch._C._functorch.maybe_current_level() is None:
        return
    for t in tensors:
        if t is None:
            continue
        tangent = torch.autograd.forward_ad.unpack_dual(t).tangent is not None
        if torch._C._functorch.is_gradtrackingtensor(t):
            # every tensor made inside a torch.func transform is wrapped: only those
            # that carry a derivative there are refused
            if not (t.requires_grad or tangent):
                continue
            what = "torch.func.grad / jacrev / jvp / jacfwd"
        elif tangent:
            what = "forward-mode AD (torch.autograd.forward_ad)"
        else:
            continue
        raise RuntimeError(
            f"spikingir: {op} on the fused {backend!r} backend has reverse-mode gradients "
            f"only (loss.backward(), torch.autograd.grad); {what} is not supported there: "
            "use backend='torch' for it (torch.func.vmap runs on every backend)")


def register_inference_op(name, kernel_module, fake):
    """Registers ``spikingir::<name>`` and its Triton twin ``<name>_triton``: fake
    kernels and the Triton implementation, no autograd (inference-only ops, e.g.
    ``neuron_fwd_masks``: their outputs carry no gradient)."""
    if not backends.HAS_CPP_OPS:
        return
    names = [f"spikingir::{name}"]
    if backends.HAS_TRITON:
        _register_triton(name, kernel_module)
        names.append(f"spikingir::{name}_triton")
    for qualname in names:
        torch.library.register_fake(qualname)(_on_one_device(fake))


def _on_one_device(fake):
    """``fake`` after a check that its tensor arguments share one device. The fake
    kernels also serve the Meta key: a call that mixes a meta tensor with CPU ones
    would otherwise return uninitialised CPU tensors as its result."""
    @functools.wraps(fake)
    def checked(*args, **kwargs):
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"spikingir: expected all tensor arguments on one device, got "
                               f"{sorted(map(str, devices))}")
        return fake(*args, **kwargs)
    return checked


def _register_triton(name, kernel_module):
    """``spikingir::<name>_triton`` on the CPU (interpreter) and CUDA keys:
    ``spikingir.kernels.<kernel_module>.<name>_triton``."""
    kernels = importlib.import_module(f"spikingir.kernels.{kernel_module}")
    impl = getattr(kernels, f"{name}_triton")
    torch.library.impl(f"spikingir::{name}_triton", "CPU")(_on_interpreter(name, impl))
    torch.library.impl(f"spikingir::{name}_triton", "CUDA")(_on_input_device(impl))


#: Serialises the interpreted Triton kernels: the interpreter patches triton.language
#: for the duration of a launch and keeps the program id in one global builder, so two
#: threads launching at once broke each other's runs ("Did you forget to add
#: @triton.jit?"). Reentrant: a launcher may call another op.
_INTERPRETER_LOCK = threading.RLock()


def _on_interpreter(name, impl):
    """``impl`` for CPU tensors: only Triton's interpreter runs kernels on the CPU
    (one call at a time, see ``_INTERPRETER_LOCK``)."""
    @functools.wraps(impl)
    def checked(*args, **kwargs):
        if not backends.TRITON_INTERPRET:
            raise RuntimeError(f"spikingir::{name}_triton runs on CPU tensors only under Triton's "
                               "interpreter: set TRITON_INTERPRET=1 before importing spikingir")
        with _INTERPRETER_LOCK:
            return impl(*args, **kwargs)
    return checked


def _on_input_device(impl):
    """``impl`` run with the current CUDA device set to its first tensor argument's.

    Triton launches on ``torch.cuda.current_device()`` and that device's current
    stream, and torch's dispatcher adds no device guard for Python kernels: without
    this, inputs on ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU
    (an illegal address, or no ordering with the torch ops on cuda:1's stream). The
    compiled CUDA ops guard themselves (CUDAGuard in csrc/cuda)."""
    @functools.wraps(impl)
    def guarded(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            return impl(*args, **kwargs)
    return guarded


def fused_op(name, backend):
    """The op ``spikingir::<name>`` that runs ``backend`` (its Triton twin for "triton")."""
    return getattr(torch.ops.spikingir, f"{name}_triton" if backend == "triton" else name)


def fused_forward(stem, backend):
    """The forward op that runs ``backend`` ("triton": the Triton twin; "cpp" and
    "cuda": the compiled op, which the dispatcher sends to the tensor's device)."""
    return fused_op(f"{stem}_fwd", backend)
