"""Convolution of binary spike maps: ``spike_conv2d`` (DESIGN.md section 4).

Chain of names: kernels/spike_conv.py ``_spike_conv2d_fwd_kernel`` ->
``spike_conv2d_fwd_triton``; csrc/cpu/spike_conv.cpp ``spike_conv2d_fwd_cpu`` and
csrc/cuda/spike_conv.cu ``spike_conv2d_fwd_cuda`` -> ``torch.ops.spikingir.spike_conv2d_fwd``;
all -> ``spike_conv2d`` -> ``spikingir.nn.SpikeConv2d``. The backward is its own op
(``spike_conv2d_bwd``), registered as the autograd formula of the forward; it
reads the spikes from the 1-bit-per-spike copy the forward kept.

Inputs are checked here, once; the kernels trust what reaches them.
"""
import numbers

import torch

from . import backends
from .masks import SpikeMasks
from .registry import (fused_forward, fused_op, refuse_other_autodiff, register_fused_op,
                       register_inference_op)
from .reference import spike_conv2d_reference

#: Kernel sizes the fused backends take (AOD-Net uses all four).
KERNEL_SIZES = (1, 3, 5, 7)
STRIDES = (1, 2)
#: Firing rates ``(forward, backward)`` above which a GPU backend takes its dense
#: path (< 0: always, >= 1: never; the result is the same either way).
#: Forward: above it the triton kernel does not build the block-occupancy map and
#: skip empty K-blocks; cuda has a single event-driven path. Triton: never skips
#: (-1). On an H100 (benchmarks/RESULTS.md, GPU runs 2026-11-27) random spikes left
#: no block empty from 1 % on (occupancy 1.00), real DnCNN maps only 6-10 % of
#: blocks, and the skipping path was the slower one at every rate ([80, 64, 128,
#: 128]: 4.31 ms at 1 % vs 3.38 ms dense at 50 %); deciding also needs the firing
#: rate, which on a GPU means reading a count back (a host sync per call).
#: Backward (the weight gradient; grad_s is always the dense transposed
#: convolution): triton's GEMM kernel over the bit-packed spikes, which skips
#: spike-free pixel blocks inside the kernel (no count, no sync), never the dense
#: path (-1 there: cuDNN's weight gradient of the unpacked spikes). cuda: always
#: the dense path (cuDNN on the unpacked spikes, under torch's cuDNN TF32 switch as
#: F.conv2d's backward): its event loop measured 40-47x slower than cuDNN fp32 at
#: every rate on an H200 (RESULTS.md, twentieth session).
#: cpp: see :func:`dense_rates`.
DENSE_RATE = {"triton": (-1.0, 2.0), "cuda": (2.0, -1.0)}


def dense_rates(backend, cin, cout, masks=False):
    """Firing rates ``(forward, backward)`` above which ``backend`` runs its dense
    path for a ``cin -> cout`` layer (< 0: always dense, >= 1: never); ``masks``:
    for spikes given as SpikeMasks.

    cpp: the crossovers of the event-driven kernels and oneDNN measured on 2
    threads (AMD EPYC, AVX2; benchmarks/RESULTS.md, "Crossovers of the
    event-driven kernels and oneDNN"), with some margin: the forward wins up to
    80-95 % firing on 16..64 -> 32..64 channel layers, to ~60 % with fewer than
    32 output channels (one or two vectors of work per spike: the walk
    dominates) or more than 64 input channels (a tap's weights leave L1), to
    ~25 % with 8-15 input channels, and never with fewer than 8 (AOD-Net's 3-
    and 6-channel layers). The weight gradient wins up to 20-30 % firing.
    From masks the event path has no packing pass and the dense one must unpack
    them first: the event path won at every rate measured (20-95 %) on 12 -> 64,
    64 -> 16, 64 -> 64 and 128 -> 64 layers, and lost on 4 -> 16 (benchmarks/
    RESULTS.md, "dense paths from masks").
    """
    if backend != "cpp":
        return DENSE_RATE[backend]
    if masks:
        return (-1.0 if cin < 8 else 2.0), 0.25
    if cin < 8:
        forward = -1.0
    elif cin < 16:
        forward = 0.25
    elif cout < 32:
        forward = 0.5
    elif cin > 64:
        forward = 0.45
    else:
        forward = 0.75
    return forward, 0.25


# --------------------------------------------------------------------------
# Registration: fake kernels, autograd, the Triton implementations.
# --------------------------------------------------------------------------


def supports(conv) -> bool:
    """Whether ``conv`` (an ``nn.Conv2d``) has a geometry spike_conv2d computes:
    groups 1, zero padding equal on both sides of both axes, no dilation, a
    square kernel of size 1, 3, 5 or 7 and equal strides of 1 or 2."""
    k, st, p = conv.kernel_size, conv.stride, conv.padding
    return (conv.groups == 1 and conv.padding_mode == "zeros" and tuple(conv.dilation) == (1, 1)
            and k[0] == k[1] and k[0] in KERNEL_SIZES and st[0] == st[1] and st[0] in STRIDES
            and not isinstance(p, str) and p[0] == p[1])


def conv_out_hw(H, W, kh, kw, stride, padding):
    """Output (Ho, Wo) of a kh x kw convolution with this stride and zero padding."""
    return (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1


def _fake_fwd(s, weight, bias, stride, padding, dense_rate, validate, save):
    N, Cin, H, W = s.shape
    Ho, Wo = conv_out_hw(H, W, weight.shape[2], weight.shape[3], stride, padding)
    out = s.new_empty((N, weight.shape[0], Ho, Wo), dtype=torch.float32)
    packed = s.new_empty((N, Cin, H, (W + 7) // 8) if save else (0,), dtype=torch.uint8)
    return out, packed


def _fake_bwd(grad_out, packed, weight, height, width, stride, padding, dense_rate, need_s,
              need_weight, need_bias):
    N, Cout = grad_out.shape[:2]
    f32 = dict(dtype=torch.float32)
    gs = grad_out.new_empty((N, weight.shape[1], height, width) if need_s else (0,), **f32)
    gw = grad_out.new_empty(weight.shape if need_weight else (0,), **f32)
    gb = grad_out.new_empty((Cout,) if need_bias else (0,), **f32)
    return gs, gw, gb


def _setup_context(ctx, inputs, output, triton=False):
    s, weight, bias, stride, padding, dense_rate, validate, save = inputs
    ctx.save_for_backward(output[1], weight)
    # The backward's own threshold, for the backend that ran the forward (the
    # schema carries the forward's): the Triton twin, else the device's kernel.
    backend = "triton" if triton else ("cpp" if s.device.type == "cpu" else "cuda")
    dense_rate = dense_rates(backend, weight.shape[1], weight.shape[0])[1]
    ctx.config = (s.shape[2], s.shape[3], stride, padding, dense_rate)
    ctx.has_bias = bias is not None


def _backward_via(bwd_op):
    def backward(ctx, grad_out, _grad_packed):
        packed, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gs, gw, gb = bwd_op(grad_out.float().contiguous(), packed, weight, *ctx.config,
                            need[0], need[1], need[2] and ctx.has_bias)
        return (gs if need[0] else None, gw if need[1] else None,
                gb if need[2] and ctx.has_bias else None, None, None, None, None, None)
    return backward


register_fused_op("spike_conv2d", "spike_conv", _fake_fwd, _fake_bwd, _setup_context, _backward_via)


def _fake_fwd_masks(masks, channels, weight, bias, stride, padding, dense_rate):
    N, H, W = masks.shape[:3]
    Ho, Wo = conv_out_hw(H, W, weight.shape[2], weight.shape[3], stride, padding)
    return masks.new_empty((N, weight.shape[0], Ho, Wo), dtype=torch.float32)


register_inference_op("spike_conv2d_fwd_masks", "spike_conv", _fake_fwd_masks)
register_inference_op("spike_conv2d_fwd_masks_out", "spike_conv",
                      lambda masks, channels, weight, bias, stride, padding, dense_rate, out: None)


# --------------------------------------------------------------------------
# Input checks (once, at the op boundary).
# --------------------------------------------------------------------------

def _int_arg(name, value, allowed=None, minimum=None):
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}: expected an int or a pair of equal ints, got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check(s, weight, bias, stride, padding):
    if isinstance(s, SpikeMasks):
        if len(s.shape) != 4:
            raise ValueError(f"s: expected SpikeMasks of shape [N, Cin, H, W] (merge the steps "
                             f"into the batch: masks.flatten(0, 1)), got shape {tuple(s.shape)}")
    elif not isinstance(s, torch.Tensor):
        raise TypeError(f"s: expected a torch.Tensor or SpikeMasks, got {type(s).__name__}")
    elif s.dtype not in backends.FUSED_DTYPES + (torch.float64,):
        raise TypeError(f"s: expected float32, float16 or bfloat16 spikes (float64 for the "
                        f"reference), got {s.dtype}")
    elif s.dim() != 4:
        raise ValueError(f"s: expected shape [N, Cin, H, W], got shape {tuple(s.shape)}")
    if s.shape[0] == 0:
        raise ValueError(f"s: empty batch (N = 0), shape {tuple(s.shape)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected shape [Cout, Cin, kh, kw], got {tuple(weight.shape)}")
    if weight.device != s.device:
        raise ValueError(f"weight: expected a tensor on {s.device} (like s), got {weight.device}")
    if weight.shape[1] != s.shape[1]:
        raise ValueError(f"weight: has {weight.shape[1]} input channels but s has {s.shape[1]} "
                         "(channel mismatch; spike_conv2d supports groups=1 only)")
    if weight.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"weight: expected Cout >= 1 and Cin >= 1, got {tuple(weight.shape)}")
    kh, kw = weight.shape[2:]
    if kh not in KERNEL_SIZES or kw not in KERNEL_SIZES:
        raise ValueError(f"weight: kernel size {kh}x{kw} is not supported (each side one of "
                         f"{KERNEL_SIZES})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias: expected None or a floating-point tensor, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if bias.shape != (weight.shape[0],) or bias.device != s.device:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) on {s.device}, got "
                             f"{tuple(bias.shape)} on {bias.device}")
    stride = _int_arg("stride", stride, allowed=STRIDES)
    padding = _int_arg("padding", padding, minimum=0)
    H, W = s.shape[2:]
    if H + 2 * padding < kh or W + 2 * padding < kw:
        raise ValueError(f"weight: kernel {kh}x{kw} is larger than the padded input "
                         f"{H + 2 * padding}x{W + 2 * padding} (H, W = {H}, {W}, padding {padding})")
    return stride, padding


#: The usual cause of non-binary spikes, and why validate=False is no way out of it.
NOT_BINARY_HINT = ("a neuron feeding spike_conv2d must emit 0/1 (scale_output=False, its "
                   "threshold folded into the weights); validate=False only skips this check "
                   "for inputs known to be binary, the GPU kernels then count any nonzero as 1")


def check_binary(s):
    bad = (s != 0) & (s != 1)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"s: expected a binary spike map (only 0 and 1), found {s[idx].item()!r} "
                         f"at index {idx}; {NOT_BINARY_HINT}")


def spike_conv2d(s, weight, bias=None, stride=1, padding=0, *, validate=True, backend="auto",
                 out=None):
    """``F.conv2d(s, weight, bias, stride, padding)`` for a binary spike map ``s``.

    Args:
        s: spikes ``[N, Cin, H, W]``, float32 / float16 / bfloat16 holding only
            0 and 1 (float64 runs the reference). Differentiable (grad_s is the
            dense transposed convolution). Or :class:`~spikingir.ops.SpikeMasks`
            of that shape (what the neurons emit with ``emit="masks"``): no
            float spike tensor is read; inference only (no gradient).
        weight: ``[Cout, Cin, kh, kw]``, kh and kw in {1, 3, 5, 7}; groups = 1.
        bias: ``[Cout]`` or None.
        stride: 1 or 2. padding: zero padding, an int >= 0.
        validate: check that ``s`` is binary (SpikeMasks: that no bit is set
            past the last channel); ``ValueError`` if not. Spiking layers that
            produce the spikes pass False: it skips the checks that cost a
            pass over ``s``. The caller then vouches for a binary ``s`` (the
            fused GPU backends read any nonzero as a spike); the ``cpp``
            kernel still refuses non-binary values wherever it reads ``s``
            anyway (its event path, and the packing of spikes saved for
            backward). A neuron emits 0/1 with ``scale_output=False``. Under
            ``torch.func.vmap`` the check (data-dependent control flow) raises on
            the ``torch`` and ``cuda`` backends: validate the spikes before
            vmapping and pass False there.
        backend: ``"auto" | "torch" | "cpp" | "cuda" | "triton"`` (see
            :mod:`spikingir.ops.backends`).
        out: SpikeMasks input only: a contiguous float32 ``[N, Cout, Ho, Wo]``
            tensor (e.g. a slice of a larger one) to write the result into,
            which is returned.

    Returns:
        ``[N, Cout, Ho, Wo]`` in the promoted dtype of ``s`` and ``weight``.
        The fused backends compute in float32 (triton: exact integer
        accumulation of a 23-bit per-channel fixed point), equal to ``F.conv2d``
        to float32 rounding and bitwise reproducible run to run. For backward
        the spikes are kept bit-packed (1 bit per spike); first-order reverse-mode
        gradients only (double backward, forward-mode AD and ``torch.func.grad``
        raise on the fused backends). On a GPU the
        gradient of ``s`` (both backends) and of ``weight`` (``cuda``) are
        cuDNN's, reproducible under ``torch.use_deterministic_algorithms(True)``
        or ``torch.backends.cudnn.deterministic = True`` as for ``nn.Conv2d``.
        On the CPU (``cpp``) the forward is also the same for any thread count
        (the event path sums in a fixed order; oneDNN's dense path measured the
        same on 1-8 threads), and so is the weight gradient up to 25 % firing
        (the event kernel, fixed order). grad_s (oneDNN's transposed
        convolution), the weight gradient above 25 % firing (oneDNN's) and the
        bias gradient (``at::sum``) are reproducible at a fixed thread count but
        may differ in the last bits between thread counts, as ``nn.Conv2d``'s
        gradients do (measured: up to 5e-6 relative, weight gradient of
        AOD-Net-sized layers).
    """
    stride, padding = _check(s, weight, bias, stride, padding)
    if isinstance(s, SpikeMasks):
        return _spike_conv2d_masks(s, weight, bias, stride, padding, validate, backend, out)
    if out is not None:
        raise TypeError("out: supported for SpikeMasks input (inference) only")
    if backend not in ("auto", "torch") and s.dtype not in backends.FUSED_DTYPES:
        raise TypeError(f"s: backend {backend!r} takes float32, float16 or bfloat16 spikes, "
                        f"got {s.dtype}; use backend='torch' for {s.dtype}")
    chosen = backends.choose("spike_conv2d", s.device, s.dtype, backend)
    # cpp and triton check inside the op (cpp in its packing pass, no extra read of s).
    if validate and chosen in ("torch", "cuda") and not torch.compiler.is_compiling():
        check_binary(s)
    if chosen == "torch":
        return spike_conv2d_reference(s, weight, bias, stride, padding)
    refuse_other_autodiff("spike_conv2d", chosen, s, weight, bias)
    out_dtype = torch.promote_types(s.dtype, weight.dtype)
    w = weight.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    save = torch.is_grad_enabled() and w.requires_grad
    dense_rate = dense_rates(chosen, w.shape[1], w.shape[0])[0]
    try:
        out, _ = fused_forward("spike_conv2d", chosen)(s.contiguous(), w, b, stride, padding,
                                                       dense_rate, bool(validate), save)
    except ValueError:
        if validate and not torch.compiler.is_compiling():
            check_binary(s)  # the kernels only say "other values": name the first one
        raise
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def _check_out(out, masks, weight, stride, padding):
    N, _, H, W = masks.shape
    shape = (N, weight.shape[0],
             *conv_out_hw(H, W, weight.shape[2], weight.shape[3], stride, padding))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected None or a torch.Tensor, got {type(out).__name__}")
    if (out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous()
            or out.device != masks.device):
        raise ValueError(f"out: expected a contiguous float32 tensor of shape {shape} on "
                         f"{masks.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")


def _spike_conv2d_masks(masks, weight, bias, stride, padding, validate, backend, out):
    """spike_conv2d of SpikeMasks [N, Cin, H, W] (inputs checked by the caller)."""
    if out is not None:
        _check_out(out, masks, weight, stride, padding)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)):
        raise ValueError("s: SpikeMasks input is for inference (it carries no gradient); run "
                         "under torch.no_grad(), or pass the spikes as a float tensor to train")
    C = masks.channels
    if validate and C % 64 and not torch.compiler.is_compiling():
        stray = masks.bits[..., -1] >> (C % 64)  # bits of channels >= C in the last word
        if bool((stray != 0).any()):
            raise ValueError(f"s: SpikeMasks has bits set for channels >= {C} (only the first "
                             f"{C} bits of the masks may be set)")
    out_dtype = torch.promote_types(torch.float32, weight.dtype)
    chosen = backends.choose("spike_conv2d_masks", masks.device, torch.float32, backend)
    if chosen == "torch":  # in out_dtype, like the fused backends' results
        y = spike_conv2d_reference(masks.to_dense(out_dtype), weight.to(out_dtype),
                                   None if bias is None else bias.to(out_dtype), stride, padding)
        return y if out is None else out.copy_(y)
    w = weight.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    dense_rate = dense_rates(chosen, w.shape[1], w.shape[0], masks=True)[0]
    args = (masks.bits.contiguous(), C, w, b, stride, padding, dense_rate)
    if out is not None:
        fused_op("spike_conv2d_fwd_masks_out", chosen)(*args, out)
        return out
    y = fused_op("spike_conv2d_fwd_masks", chosen)(*args)
    return y if out_dtype == torch.float32 else y.to(out_dtype)
