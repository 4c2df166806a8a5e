"""Pure-PyTorch references of the spikingir ops. Readable on purpose: every
fast backend is tested against these; never optimise them.

The references take the same arguments as the compiled ops (csrc/ops.cpp):
parameters already expanded to ``[C]`` and the channel of neuron ``m`` in one
step being ``(m // inner) % C``.
"""
import torch

from .surrogate import spike


def neuron_reference(x, theta, beta, v0, alpha, surrogate, reuse_alpha, reuse_step,
                     scale_output, detach_reset, inner, smooth=False):
    """IF neuron with soft reset over x[0..T_if-1], then (``reuse_step``) the MPRN
    reuse step on x[T_if] (DESIGN.md section 3). Returns (y like x, v_final).

    h[t] = v[t-1] + x[t];  s[t] = H(h[t] - theta);  v[t] = h[t] - theta s[t]
    y[t] = theta s[t]  (or s[t] when not scale_output)
    reuse step:  s = H(h - reuse_alpha theta);  y = beta s;  v_final = h - theta s
    """
    T = x.shape[0]
    C = theta.numel()
    state_dtype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 state in fp32
    xs = x.to(state_dtype).reshape(T, -1, C, inner)

    def per_channel(p):
        return p.to(state_dtype).reshape(1, C, 1)

    th, be, a = per_channel(theta), per_channel(beta), per_channel(alpha).detach()
    v = torch.zeros_like(xs[0]) if v0 is None else v0.to(state_dtype).reshape(xs[0].shape)
    ys = []
    for t in range(T):
        reuse = reuse_step and t == T - 1
        h = v + xs[t]
        s = spike(h - (reuse_alpha * th if reuse else th), a, surrogate, smooth)
        reset = th * (s.detach() if detach_reset else s)
        v = h - reset
        size = be if reuse else th
        ys.append(size * s if scale_output else s)
    y = torch.stack(ys).reshape(x.shape).to(x.dtype)
    return y, v.reshape(x.shape[1:])


def spike_conv2d_reference(s, weight, bias=None, stride=1, padding=0):
    """``F.conv2d`` of the spike map ``s`` [N, Cin, H, W] in the promoted dtype of
    ``s`` and ``weight`` (float64 in the tests)."""
    dtype = torch.promote_types(s.dtype, weight.dtype)
    b = None if bias is None else bias.to(dtype)
    return torch.nn.functional.conv2d(s.to(dtype), weight.to(dtype), b, stride, padding)
