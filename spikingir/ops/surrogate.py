"""Surrogate gradients of the spike function H(u), u = h - threshold.

Each surrogate is the derivative of a smooth step ``sigma_a(u)`` that integrates
to 1 over u; ``a`` (alpha) sets its sharpness. The fused kernels evaluate the
derivative directly (csrc/neuron_math.h, kernels/neuron.py); the reference
uses an autograd function whose forward is exactly H(u) and whose gradient is
exactly ``sigma_a'(u)``; ``smooth=True`` uses ``sigma_a(u)`` itself.

=========  ==========================================  ===========================
name       sigma_a'(u)                                 sigma_a(u)
=========  ==========================================  ===========================
sigmoid    a sig(a u) (1 - sig(a u)), |a u| <= 40      sig(a u)
atan       (a/2) / (1 + (pi a u / 2)^2)                atan(pi a u / 2) / pi + 1/2
triangle   a max(0, 1 - a |u|)                         piecewise quadratic
rectangle  a [|u| < 1/(2a)]                            clamp(a u + 1/2, 0, 1)
=========  ==========================================  ===========================

The sigmoid surrogate is 0 beyond ``|a u| = SIGMOID_CUTOFF`` (40), where it would be
at most ``a e^-40 ~ 4e-18 a``: there it only ever made subnormal floats after a
product or two, and subnormal gradients made CPU fine-tuning of the DnCNN SNN 5.6x
slower on an Intel Xeon (oneDNN's conv backward; benchmarks/RESULTS.md). The
smooth step keeps its exact form (its derivative differs by less than 4e-18 a).
"""
import math

import torch

#: Surrogate name -> integer id used by the compiled and Triton kernels.
SURROGATES = {"sigmoid": 0, "atan": 1, "triangle": 2, "rectangle": 3}

#: |a u| beyond which the sigmoid surrogate is exactly 0 (csrc/neuron_math.h
#: kSigmoidCutoff, kernels/neuron.py SIGMOID_CUTOFF).
SIGMOID_CUTOFF = 40.0


def smooth_step(name: str, u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The smooth step sigma_a(u) whose derivative is the surrogate."""
    if name == "sigmoid":
        return torch.sigmoid(a * u)
    if name == "atan":
        return torch.atan(math.pi / 2 * a * u) / math.pi + 0.5
    if name == "triangle":
        z = (a * u).clamp(-1.0, 1.0)
        return torch.where(z < 0, 0.5 * (1 + z) ** 2, 1 - 0.5 * (1 - z) ** 2)
    if name == "rectangle":
        return (a * u + 0.5).clamp(0.0, 1.0)
    raise ValueError(f"surrogate: expected one of {sorted(SURROGATES)}, got {name!r}")


def surrogate_grad(name: str, u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sigma_a'(u), written out (the formula the kernels implement)."""
    if name == "sigmoid":
        sig = torch.sigmoid(a * u)
        return torch.where((a * u).abs() > SIGMOID_CUTOFF, 0.0, a * sig * (1 - sig))
    if name == "atan":
        return (a / 2) / (1 + (math.pi / 2 * a * u) ** 2)
    if name == "triangle":
        return a * (1 - a * u.abs()).clamp_min(0.0)
    if name == "rectangle":
        return a * (u.abs() < 0.5 / a).to(u.dtype)
    raise ValueError(f"surrogate: expected one of {sorted(SURROGATES)}, got {name!r}")


def spike(u: torch.Tensor, a: torch.Tensor, name: str, smooth: bool = False) -> torch.Tensor:
    """H(u) forward with gradient sigma_a'(u); ``smooth=True`` returns sigma_a(u)
    itself (forward and backward), which makes the whole neuron differentiable
    so that gradcheck can verify the backward-through-time algebra."""
    if smooth:
        return smooth_step(name, u, a)
    return _Heaviside.apply(u, a, name)


class _Heaviside(torch.autograd.Function):
    """H(u) = [u >= 0] (0 for NaN u, as in the kernels), gradient sigma_a'(u).
    Written with setup_context and a generated vmap rule so that the reference
    also runs under torch.func (grad, vmap, jacrev, functional_call), and a jvp
    for forward mode."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, a, name):
        return (u >= 0).to(u.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, a, name = inputs
        ctx.save_for_backward(u, a)
        ctx.save_for_forward(u, a)
        ctx.name = name

    @staticmethod
    def jvp(ctx, u_t, _a_t, _name_t):
        """Forward mode (torch.func.jvp, jacfwd): the same straight-through derivative."""
        u, a = ctx.saved_tensors
        return u_t * surrogate_grad(ctx.name, u, a)

    @staticmethod
    def backward(ctx, grad):
        u, a = ctx.saved_tensors
        return grad * surrogate_grad(ctx.name, u, a), None, None
