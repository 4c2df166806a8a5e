"""Fused multi-timestep spiking neurons: ``if_multistep`` and ``mprn_multistep``.

Chain of names: kernels/neuron.py ``_neuron_fwd_kernel`` -> ``neuron_fwd_triton``;
csrc/cpu/neuron.cpp ``neuron_fwd_cpu`` and csrc/cuda/neuron.cu ``neuron_fwd_cuda``
-> ``torch.ops.spikingir.neuron_fwd``; all -> ``if_multistep`` / ``mprn_multistep``
-> ``spikingir.nn.IFNeuron`` / ``MPRNeuron``. The backward is its own op
(``neuron_bwd``), registered as the autograd formula of ``neuron_fwd``.

Inputs are checked here, once; the kernels trust what reaches them.
"""
import math
import numbers

import numpy as np
import torch

from . import backends
from .masks import SpikeMasks
from .registry import (fused_forward, fused_op, refuse_other_autodiff, register_fused_op,
                       register_inference_op)
from .reference import neuron_reference
from .surrogate import SURROGATES

# --------------------------------------------------------------------------
# Registration of the compiled and Triton ops: fake kernels, autograd, and the
# Python (Triton) implementations of the *_triton schemas of csrc/ops.cpp.
# --------------------------------------------------------------------------


def _fake_fwd(x, theta, beta, v0, alpha, surrogate, reuse_alpha, reuse_step, scale_output,
              detach_reset, inner, save_bytes):
    y = torch.empty_like(x)
    vT = x.new_empty(x.shape[1:], dtype=torch.float32)
    saved = x.new_empty(0, dtype=torch.float32) if save_bytes == 0 else \
        torch.empty_like(x, dtype=torch.bfloat16 if save_bytes == 2 else torch.float32)
    return y, vT, saved


def _fake_bwd(grad_y, grad_v, saved, theta, beta, alpha, surrogate, reuse_alpha, reuse_step,
              scale_output, detach_reset, inner, need_theta_grad, need_beta_grad):
    C = theta.numel()
    return (torch.empty_like(grad_y), grad_y.new_empty(grad_y.shape[1:], dtype=torch.float32),
            theta.new_empty(C), theta.new_empty(C))


def _setup_context(ctx, inputs, output, triton=False):
    (x, theta, beta, v0, alpha, surrogate, reuse_alpha, reuse_step, scale_output,
     detach_reset, inner, save_bytes) = inputs
    ctx.save_for_backward(output[2], theta, beta, alpha)
    # Outputs without a gradient (always `saved`, often v_final) reach backward as None
    # instead of materialised zeros: a full-size zero fill per layer (profiled at
    # [11, 8, 64, 40, 40] fp32, one thread: 16.8 ms beside the op's ~140 ms).
    ctx.set_materialize_grads(False)
    ctx.config = (surrogate, reuse_alpha, reuse_step, scale_output, detach_reset, inner)
    ctx.reuse_step = reuse_step
    ctx.y_dtype = output[0].dtype


def _backward_via(bwd_op):
    def backward(ctx, grad_y, grad_v, _grad_saved):
        saved, theta, beta, alpha = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_v = None if grad_v is None else grad_v.float().contiguous()
        # beta acts only through the reuse step's scaled output (v_final's reset
        # subtracts theta): without it its gradient is None, as autograd of the
        # reference gives (not zeros, which an optimiser with weight decay would
        # still apply)
        beta_used = ctx.reuse_step and ctx.config[3] and grad_y is not None
        if grad_y is None:  # only v_final was used
            grad_y = saved.new_zeros(saved.shape, dtype=ctx.y_dtype)
        gx, gv0, gth, gbe = bwd_op(grad_y.contiguous(), grad_v, saved, theta, beta, alpha,
                                   *ctx.config, need[1], need[2] and beta_used)
        return (gx, gth if need[1] else None, gbe if need[2] and beta_used else None,
                gv0 if need[3] else None) + (None,) * 8
    return backward


register_fused_op("neuron", "neuron", _fake_fwd, _fake_bwd, _setup_context, _backward_via)


def _fake_fwd_masks(x, theta, v0, reuse_alpha, reuse_step, steps):
    N, C = x.shape[1:3]
    masks = x.new_empty((steps, N, *x.shape[3:], (C + 63) // 64), dtype=torch.int64)
    return masks, x.new_empty(x.shape[1:], dtype=torch.float32)


register_inference_op("neuron_fwd_masks", "neuron", _fake_fwd_masks)


# --------------------------------------------------------------------------
# Input checks (once, at the op boundary).
# --------------------------------------------------------------------------

def _check_x(x_seq, min_steps):
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"x_seq: expected a torch.Tensor, got {type(x_seq).__name__}")
    if not x_seq.is_floating_point():
        raise TypeError(f"x_seq: expected a floating-point tensor, got {x_seq.dtype}")
    if x_seq.dim() < 2:
        raise ValueError("x_seq: expected shape [T, ...] with at least one neuron axis, "
                         f"got shape {tuple(x_seq.shape)}")
    if x_seq.shape[0] < min_steps:
        what = "T + 1 >= 2 steps (T IF steps and the reuse step)" if min_steps == 2 else "T >= 1"
        raise ValueError(f"x_seq: expected {what}, got {x_seq.shape[0]} step(s)")


def _param(name, value, x_seq, positive, can_check_values):
    """float / 0-d / [C] tensor -> float32 tensor of shape [] or [C] on x's device."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name}: expected a float or a tensor, got {type(value).__name__}")
    if isinstance(value, numbers.Real):
        # Under torch.compile a float argument that changes between calls is a
        # symbolic float: checking it would need its value (no check there, like
        # check_values), and float() would specialise the graph to it.
        if not torch.compiler.is_compiling():
            value = float(value)
            if not math.isfinite(value) or (positive and value <= 0):
                raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} "
                                 f"value, got {value}")
        dtype = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
        # torch.full fills on the device (torch.tensor(value, device="cuda") would copy
        # from the host and synchronise).
        return torch.full((), value, dtype=dtype, device=x_seq.device)
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if value.device != x_seq.device:
        raise ValueError(f"{name}: expected a tensor on {x_seq.device} (like x_seq), "
                         f"got {value.device}")
    channels = x_seq.shape[2] if x_seq.dim() >= 3 else None
    n = value.numel()  # `n in (1, C)` is not traceable with a symbolic C (torch.compile)
    if value.dim() > 1 or (value.dim() == 1 and n != 1 and n != channels):
        expect = f"a 1-d tensor of length C = x_seq.shape[2] = {channels}" if channels \
            else "a 1-d tensor of length 1 (x_seq has no channel axis)"
        raise ValueError(f"{name}: expected a float, a 0-d tensor or {expect}, "
                         f"got shape {tuple(value.shape)}")
    if can_check_values:
        check_values(name, value, positive)
    return value.reshape(()) if value.numel() == 1 else value


def check_values(name, value, positive):
    """Raise a ValueError unless every value of the tensor ``value`` is finite
    (and > 0 if ``positive``). A tensor off the CPU is checked when first seen
    and after each in-place change only (see below)."""
    if torch.compiler.is_compiling() or _checked_before(value, positive):
        return
    bad = ~torch.isfinite(value) | (value <= 0) if positive else ~torch.isfinite(value)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite{' positive' if positive else ''} "
                         f"values, got {value.detach().flatten()[:8].tolist()}")
    _mark_checked(value, positive)


# Reading a check's verdict back from a GPU synchronises with it (bool(bad.any())),
# three times per neuron layer (theta, beta, alpha): the host then waits for the queue
# to drain before every layer. A GPU parameter tensor is therefore checked when first
# seen and again after each in-place change (its version counter moves: optimizer
# steps, copy_, fill_), not on every call. Tensors on the CPU are checked every call
# (no synchronisation to save). Writes through `.data` bypass the version counter.
_CHECKED = "_spikingir_checked"


def _checked_before(value, positive):
    if value.device.type == "cpu":
        return False
    seen = getattr(value, _CHECKED, None)
    return seen is not None and seen[0] == value._version and (seen[1] or not positive)


def _mark_checked(value, positive):
    if value.device.type != "cpu":
        try:
            setattr(value, _CHECKED, (value._version, positive))
        except (AttributeError, RuntimeError):  # tensors that take no attributes: check each call
            pass


def check_flags(**flags):
    """Each keyword is True or False (a numpy bool too)."""
    for name, flag in flags.items():
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")


def check_reuse_alpha(reuse_alpha):
    if not (isinstance(reuse_alpha, numbers.Real) and not isinstance(reuse_alpha, (bool, np.bool_))
            and 0.5 < float(reuse_alpha) <= 1.0):
        raise ValueError(f"reuse_alpha: expected a float in (0.5, 1], got {reuse_alpha!r}")


def check_options(surrogate, save_dtype, detach_reset, scale_output):
    """The neurons' non-tensor options, checked by the ops and by the modules'
    constructors."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate: expected one of {sorted(SURROGATES)}, got {surrogate!r}")
    if save_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"save_dtype: expected torch.float32 or torch.bfloat16, got {save_dtype}")
    check_flags(detach_reset=detach_reset, scale_output=scale_output)


def _neuron(x_seq, theta, beta, alpha, *, reuse_step, reuse_alpha, v0, surrogate,
            detach_reset, scale_output, save_dtype, backend, op, emit, validate=True):
    _check_x(x_seq, 2 if reuse_step else 1)
    if emit not in ("values", "masks"):
        raise ValueError(f"emit: expected 'values' or 'masks', got {emit!r}")
    if emit == "masks" and x_seq.dim() != 5:
        raise ValueError(f"x_seq: emit='masks' takes [T, N, C, H, W] (the input of a "
                         f"convolution), got shape {tuple(x_seq.shape)}")
    check_options(surrogate, save_dtype, detach_reset, scale_output)
    if reuse_step:
        check_reuse_alpha(reuse_alpha)
    detach_reset, scale_output = bool(detach_reset), bool(scale_output)
    check = validate and not torch.compiler.is_compiling()
    theta = _param("theta", theta, x_seq, True, check)
    beta = theta if beta is None else _param("beta", beta, x_seq, False, check)
    alpha = _param("alpha", alpha, x_seq, True, check).detach()
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or not v0.is_floating_point():
            raise TypeError(f"v0: expected None or a floating-point tensor, got "
                            f"{getattr(v0, 'dtype', type(v0).__name__)}")
        if v0.shape != x_seq.shape[1:] or v0.device != x_seq.device:
            raise ValueError(f"v0: expected shape {tuple(x_seq.shape[1:])} on {x_seq.device} "
                             f"(one step of x_seq), got {tuple(v0.shape)} on {v0.device}")
    chosen = backends.choose(op, x_seq.device, x_seq.dtype, backend)
    if x_seq.numel() == 0:  # an empty batch or image: nothing to simulate, shapes kept
        v_final = torch.zeros(x_seq.shape[1:], device=x_seq.device,
                              dtype=torch.float64 if x_seq.dtype == torch.float64 else torch.float32)
        if emit == "masks":
            return SpikeMasks.from_dense(torch.zeros_like(x_seq, dtype=torch.bool)), v_final
        return x_seq * 0, v_final  # (x_seq * 0: empty, and connected for autograd)

    # Channel layout of the kernels: C values per parameter, channel of neuron m
    # within a step = (m // inner) % C. Scalars only: C = 1.
    per_channel = any(p.dim() == 1 for p in (theta, beta, alpha))
    C = x_seq.shape[2] if per_channel else 1
    inner = math.prod(x_seq.shape[3:]) if per_channel else 1
    theta_c, beta_c, alpha_c = (p.expand(C) for p in (theta, beta, alpha))
    flags = (float(reuse_alpha), reuse_step, scale_output, detach_reset, inner)
    if emit == "masks":
        return _neuron_masks(x_seq, theta_c, beta_c, v0, alpha_c, surrogate, flags, chosen)
    if chosen == "torch":
        return neuron_reference(x_seq, theta_c, beta_c, v0, alpha_c, surrogate, *flags)
    refuse_other_autodiff(op, chosen, x_seq, theta_c, beta_c, v0)
    theta_c, beta_c, alpha_c = (p.float().contiguous() for p in (theta_c, beta_c, alpha_c))
    # Channels-last input ([T, N, C, *spatial] with C innermost in memory, what a
    # channels-last convolution returns): the kernels run on the permuted view
    # [T, N, *spatial, C], contiguous as it is, where the channel of neuron m is
    # m % C (inner = 1); the outputs are permuted back (views). No copies, and the
    # next channels-last convolution reads y as it is.
    perm = _channels_last_perm(x_seq)
    if perm is not None:
        inv = tuple(perm.index(d) for d in range(len(perm)))
        x_seq = x_seq.permute(perm)
        v0 = None if v0 is None else v0.permute([d - 1 for d in perm[1:]])
        flags = flags[:-1] + (1,)
    v0 = None if v0 is None else v0.float().contiguous()
    # Keep u for backward only when a gradient can flow (inference saves 4 B/neuron-step).
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_seq, theta_c, beta_c, v0))
    save_bytes = (2 if save_dtype == torch.bfloat16 else 4) if needs_grad else 0
    y, v_final, _ = fused_forward("neuron", chosen)(x_seq.contiguous(), theta_c, beta_c, v0,
                                                    alpha_c, SURROGATES[surrogate], *flags,
                                                    save_bytes)
    if perm is not None:
        y = y.permute(inv)
        v_final = v_final.permute([d - 1 for d in inv[1:]])
    return y, v_final


def _channels_last_perm(x):
    """The permutation [T, N, C, *spatial] -> [T, N, *spatial, C] when each step of
    ``x`` is channels last (and ``x`` is not contiguous as it is), else None. A
    step expanded over time (stride 0) qualifies: it is copied in that order."""
    if x.dim() < 4 or x.is_contiguous() or x.shape[2] == 1:
        return None
    perm = (0, 1, *range(3, x.dim()), 2)
    return perm if x.permute(perm)[0].is_contiguous() else None


def _neuron_masks(x_seq, theta_c, beta_c, v0, alpha_c, surrogate, flags, chosen):
    """The spikes as :class:`SpikeMasks` and v_final (emit="masks"): inference only."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x_seq, theta_c, v0)):
        raise ValueError("emit='masks' is for inference: the masks carry no gradient; run "
                         "under torch.no_grad() (or torch.inference_mode()), or use "
                         "emit='values' to train")
    reuse_alpha, reuse_step = flags[0], flags[1]
    C = x_seq.shape[2]
    if chosen == "torch":
        s, v_final = neuron_reference(x_seq, theta_c, beta_c, v0, alpha_c, surrogate,
                                      reuse_alpha, reuse_step, False, False, flags[4])
        return SpikeMasks.from_dense(s), v_final
    if v0 is not None and v0.dim() >= 3 and v0.stride(0) == 0 and all(
            st == 0 for st in v0.stride()[2:]):
        v0 = v0[(0, slice(None)) + (0,) * (v0.dim() - 2)]  # one value per channel: [C]
    v0 = None if v0 is None else v0.float().contiguous()
    steps = x_seq.shape[0]
    # An input expanded over time (the same current every step, e.g. a first
    # layer's image current) is read from one copy instead of T.
    x_in = x_seq[:1] if steps > 1 and x_seq.stride(0) == 0 else x_seq
    bits, v_final = fused_op("neuron_fwd_masks", chosen)(
        x_in.contiguous(), theta_c.float().contiguous(), v0, reuse_alpha, reuse_step, steps)
    return SpikeMasks(bits, C), v_final


def if_multistep(x_seq, theta, *, v0=None, surrogate="sigmoid", alpha=4.0, detach_reset=False,
                 scale_output=True, save_dtype=torch.float32, backend="auto", emit="values",
                 validate=True):
    """Integrate-and-fire neuron with soft reset over T steps, fused.

    Args:
        x_seq: input currents ``[T, ...]`` (``[T, B, C, ...]`` for per-channel
            parameters), float32 / float16 / bfloat16 (the reference also takes
            float64). Membrane state is kept in float32 (float64 for float64).
        theta: threshold: a float, a 0-d tensor or a ``[C]`` tensor (C =
            ``x_seq.shape[2]``); finite and > 0. Differentiable.
        v0: initial membrane potential shaped like one step, or None (zeros).
        surrogate: ``"sigmoid" | "atan" | "triangle" | "rectangle"`` (formulas:
            spikingir/ops/surrogate.py; the sigmoid one is 0 beyond |alpha u| = 40).
        alpha: surrogate sharpness, a float or a 0-d / ``[C]`` tensor
            (``alpha = a / theta`` makes it scale-free); no gradient.
        detach_reset: the reset ``theta * s`` carries no gradient through s.
        scale_output: return ``theta * s`` (True) or ``s`` in {0, 1}.
        save_dtype: what is kept per neuron-step for backward: float32 (4 B)
            or bfloat16 (2 B; the surrogate is evaluated on u rounded to 8 bits
            of mantissa, spikes are recomputed exactly).
        backend: ``"auto" | "torch" | "cpp" | "cuda" | "triton"`` (see
            :mod:`spikingir.ops.backends`).
        emit: ``"values"`` (``y_seq`` as below) or ``"masks"``: the binary
            spikes as :class:`~spikingir.ops.SpikeMasks` (1 bit per spike,
            channels last), what :func:`spikingir.ops.spike_conv2d` reads
            fastest; inference only (a ``ValueError`` when a gradient could
            flow), ``x_seq`` must be ``[T, N, C, H, W]``.
        validate: check the values of tensor parameters (finite; theta and
            alpha > 0). On a GPU reading the verdict back synchronises, so a
            tensor is checked when first seen and after each in-place change
            (its version counter), not on every call; ``False`` skips the
            check (the neuron modules check their own parameters that way and
            pass tensors derived from them). Shapes, dtypes and devices are
            always checked.

    Returns:
        ``(y_seq, v_final)``: ``y_seq`` like ``x_seq`` (or ``SpikeMasks`` of
        shape ``[T, N, C, H, W]``), ``v_final`` float32 (float64 for float64
        input) shaped like one step.

    A NaN input makes that neuron's potential NaN from then on: it never fires
    again (``NaN >= theta`` is false) and its ``v_final`` is NaN.

    The fused backends give first-order reverse-mode gradients: differentiating a
    gradient taken with ``create_graph=True``, forward-mode AD and
    ``torch.func.grad`` / ``jacrev`` / ``jvp`` raise (``backend="torch"``
    supports them; ``torch.func.vmap`` runs on every backend).
    """
    return _neuron(x_seq, theta, None, alpha, reuse_step=False, reuse_alpha=0.75, v0=v0,
                   surrogate=surrogate, detach_reset=detach_reset, scale_output=scale_output,
                   save_dtype=save_dtype, backend=backend, op="if_multistep", emit=emit,
                   validate=validate)


def mprn_multistep(x_seq, theta, beta, *, reuse_alpha=0.75, v0=None, surrogate="sigmoid",
                   alpha=4.0, detach_reset=False, scale_output=True, save_dtype=torch.float32,
                   backend="auto", emit="values", validate=True):
    """Membrane Potential Reuse Neuron: T IF steps, then one reuse step.

    ``x_seq`` has T + 1 steps: the first T are IF steps (as
    :func:`if_multistep`), the last is the reuse step, which fires a spike of
    size ``beta`` when ``h >= reuse_alpha * theta`` and leaves
    ``v_final = h - theta * s``. ``beta`` is a float, 0-d or ``[C]`` tensor,
    differentiable; ``reuse_alpha`` is in (0.5, 1]. Other arguments and the
    return value as :func:`if_multistep`; ``y_seq`` has T + 1 steps. With
    ``emit="masks"`` the spikes of every step are binary (the reuse step's size
    ``beta`` is for the consumer to apply).
    """
    return _neuron(x_seq, theta, beta, alpha, reuse_step=True, reuse_alpha=reuse_alpha, v0=v0,
                   surrogate=surrogate, detach_reset=detach_reset, scale_output=scale_output,
                   save_dtype=save_dtype, backend=backend, op="mprn_multistep", emit=emit,
                   validate=validate)
