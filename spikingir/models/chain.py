"""Your own CNN, in the form ``spikingir.convert.to_snn`` takes.

Besides DnCNN and AOD-Net, ``to_snn`` converts any feed-forward chain

    Conv2d [BatchNorm2d] ReLU  ...  Conv2d [BatchNorm2d] ReLU  Conv2d

given as an ``nn.Sequential`` (nested ones are flattened; ``nn.Identity`` and
dropout layers, identities in eval mode, are skipped), optionally wrapped in
:class:`Residual` for a global skip: ``x - body(x)`` (DnCNN's residual
learning: the body predicts the noise) or ``x + body(x)``. Every ReLU becomes
a spiking layer; the first convolution sees the image (computed once, as in
DnCNN); the last one becomes the pixel mapper. :func:`conv_chain` brings such a
network into one canonical form, :class:`ConvChain`: BatchNorm folded into the
conv before it, every conv with a bias and numeric zero padding, and the sign
of ``x + body(x)`` folded into the last conv (``x + c(r) = x - (-c)(r)``), so a
residual chain always reads ``x - convs[-1](...)``. Its forward computes what
the given network computes (up to float rounding of the folding).
"""
import torch
from torch import nn

from .dncnn import DnCNN, _fold_conv_bn

__all__ = ["ConvChain", "Residual", "conv_chain"]

#: layers that are identities in eval mode and are skipped
_SKIPPED = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.AlphaDropout)


def skip(x, y, subtract=True):
    """``x - y`` (or ``x + y``) of a global skip, whose body output ``y`` must have
    ``x``'s shape: a broadcast would hide a wrong body (a 1-channel output under a
    3-channel input) or fail with torch's size message."""
    if y.shape != x.shape:
        raise ValueError(f"Residual: the body maps {tuple(x.shape)} to {tuple(y.shape)}; a "
                         "global skip needs the same shape (check its paddings and its last "
                         "conv's channels)")
    return x - y if subtract else x + y


# one call in a torch.fx trace (its shape check is Python control flow): a Residual
# inside a network of the user's converts through spikingir.models.graph
torch.fx.wrap("skip")


class Residual(nn.Module):
    """A global skip around ``body``: ``x - body(x)`` with ``subtract=True``
    (DnCNN's form) or ``x + body(x)``. ``body``'s output must have ``x``'s shape."""

    def __init__(self, body: nn.Module, subtract: bool = True):
        super().__init__()
        self.body = body
        self.subtract = bool(subtract)

    def forward(self, x):
        return skip(x, self.body(x), self.subtract)

    def extra_repr(self):
        return f"subtract={self.subtract}"


class ConvChain(nn.Module):
    """``convs[0] -> ReLU -> convs[1] -> ReLU -> ... -> convs[-1]``, and with
    ``residual`` the output ``x - chain(x)``: the canonical BN-free form of a
    convertible CNN (build it with :func:`conv_chain`)."""

    def __init__(self, convs, residual: bool = False):
        super().__init__()
        if len(convs) < 2:
            raise ValueError(f"ConvChain: expected at least two convolutions (one ReLU between), "
                             f"got {len(convs)}")
        self.layers = nn.ModuleList(convs)
        self.relus = nn.ModuleList(nn.ReLU() for _ in convs[:-1])
        self.residual = bool(residual)

    def convs(self) -> list[nn.Conv2d]:
        return list(self.layers)

    def forward(self, x):
        y = x
        for conv, relu in zip(self.layers, self.relus):
            y = relu(conv(y))
        y = self.layers[-1](y)
        return skip(x, y) if self.residual else y

    def extra_repr(self):
        return f"residual={self.residual}"


def _plain(m, base, where):
    """Refuses a subclass of ``base`` that overrides ``forward`` (or, for a conv,
    ``_conv_forward``, which ``Conv2d.forward`` calls): the conversion reproduces
    ``base``'s computation from the layer's parameters, not that code (a
    weight-standardised conv, a circular-padding conv, a scaled ReLU, a Sequential
    with its own forward would convert silently into another network)."""
    own = [f for f in ("forward", "_conv_forward")
           if hasattr(base, f) and getattr(type(m), f) is not getattr(base, f)]
    if own:
        cls = type(m)
        raise ValueError(f"to_snn: {where} ({cls.__module__}.{cls.__qualname__}) overrides "
                         f"{base.__name__}.{own[0]}; expected a plain {base.__name__} (the "
                         f"conversion reproduces {base.__name__}'s computation, not that code)")


def _flatten(seq, path=""):
    """(name, module) of an nn.Sequential's leaves in order, nested Sequentials opened."""
    for name, m in seq.named_children():
        full = f"{path}{name}"
        if isinstance(m, nn.Sequential):
            _plain(m, nn.Sequential, f"layer {full}")
            yield from _flatten(m, full + ".")
        elif not isinstance(m, _SKIPPED):
            yield full, m


def _numeric_padding(conv, name):
    """``conv.padding`` as a pair of ints (PyTorch keeps 'same' / 'valid' as strings)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # stride 1 (PyTorch's rule); symmetric only for odd extents
        extents = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(e % 2 for e in extents):
            raise ValueError(f"to_snn: {name}: padding='same' with an even kernel extent pads "
                             "unevenly; give the padding as numbers")
        return tuple(e // 2 for e in extents)
    return tuple(conv.padding)


def _canonical_conv(conv, bn, name):
    """A float32 copy of ``conv`` with ``bn`` (or None) folded in, a bias and numeric padding."""
    if conv.groups != 1:
        raise ValueError(f"to_snn: {name}: grouped convolutions (groups={conv.groups}) are not "
                         "supported; spiking layers need groups=1")
    if conv.padding_mode != "zeros":
        raise ValueError(f"to_snn: {name}: padding_mode={conv.padding_mode!r} is not supported "
                         "(zero padding only)")
    return folded_copy(conv, bn, _numeric_padding(conv, name))


def folded_copy(conv, bn, padding):
    """A float32 ``nn.Conv2d`` copy of ``conv`` (its groups, stride, dilation) with
    ``bn`` (or None) folded in, a bias, and ``padding`` (numeric, zeros)."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                    device=conv.weight.device)
    with torch.no_grad():
        if bn is not None:
            w, b = _fold_conv_bn(conv, bn)
        else:
            w = conv.weight.detach()
            b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(out.bias)
        out.weight.copy_(w.float())
        out.bias.copy_(b.float())
    return out


def _what(m):
    return type(m).__name__


def conv_chain(model: nn.Module) -> ConvChain:
    """The canonical form (:class:`ConvChain`, eval mode, float32 copies) of
    ``model``: an ``nn.Sequential`` of ``Conv2d [BatchNorm2d] ReLU ... Conv2d``,
    a :class:`Residual` around one, or a ``DnCNN``. Anything else, or a layer
    the spiking form cannot reproduce (another activation, a grouped conv, a
    BatchNorm not right after a conv or without running statistics, a trailing
    activation, a layer class with its own forward), raises a ValueError
    (TypeError for another kind of model) that names the layer."""
    if isinstance(model, DnCNN):
        return conv_chain(Residual(model.dncnn, subtract=True))
    subtract = None
    body = model
    if isinstance(model, Residual):
        body, subtract = model.body, model.subtract
    if not isinstance(body, nn.Sequential):
        raise TypeError(f"to_snn: expected a DnCNN, an AODNet, an nn.Sequential of Conv2d / "
                        f"BatchNorm2d / ReLU layers or spikingir.models.Residual around one; got "
                        f"{_what(body)}")
    if subtract is not None:
        _plain(model, Residual, "the model")
    _plain(body, nn.Sequential, "the body" if subtract is not None else "the model")
    layers = list(_flatten(body))
    convs, i = [], 0
    while i < len(layers):
        name, m = layers[i]
        if not isinstance(m, nn.Conv2d):
            raise ValueError(f"to_snn: layer {name} ({_what(m)}): expected a Conv2d here (the chain "
                             "is Conv2d [BatchNorm2d] ReLU ... Conv2d)")
        _plain(m, nn.Conv2d, f"layer {name}")
        bn = None
        if i + 1 < len(layers) and isinstance(layers[i + 1][1], nn.BatchNorm2d):
            bn_name, bn = layers[i + 1]
            _plain(bn, nn.BatchNorm2d, f"layer {bn_name}")
            if bn.num_features != m.out_channels:
                raise ValueError(f"to_snn: layer {bn_name} (BatchNorm2d): expected "
                                 f"{m.out_channels} features (its conv's outputs), got "
                                 f"{bn.num_features}")
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"to_snn: layer {bn_name} (BatchNorm2d) has no running "
                                 "statistics (track_running_stats=False): it normalises every "
                                 "batch by that batch's own statistics, which no fixed conv "
                                 "reproduces")
            i += 1
        convs.append(_canonical_conv(m, bn, name))
        i += 1
        if i == len(layers):
            break
        name, m = layers[i]
        if not isinstance(m, nn.ReLU):
            raise ValueError(f"to_snn: layer {name} ({_what(m)}) is not supported: spiking neurons "
                             "replace ReLU activations only, and the chain must end with a Conv2d "
                             "(the pixel mapper)")
        _plain(m, nn.ReLU, f"layer {name}")
        i += 1
        if i == len(layers):
            raise ValueError(f"to_snn: the chain ends with the activation {name}; it must end with "
                             "a Conv2d (the pixel mapper)")
    if len(convs) < 2:
        raise ValueError("to_snn: the chain needs at least two Conv2d layers with a ReLU between "
                         f"them, got {len(convs)} conv(s)")
    for a, b in zip(convs, convs[1:]):
        if a.out_channels != b.in_channels:
            raise ValueError(f"to_snn: a conv with {a.out_channels} outputs feeds one with "
                             f"{b.in_channels} inputs")
    if subtract is not None and convs[-1].out_channels != convs[0].in_channels:
        raise ValueError(f"to_snn: Residual: the body returns {convs[-1].out_channels} channels "
                         f"for {convs[0].in_channels} input channels")
    if subtract is False:  # x + c(r) = x - (-c)(r)
        with torch.no_grad():
            convs[-1].weight.neg_()
            convs[-1].bias.neg_()
    return ConvChain(convs, residual=subtract is not None).eval()
