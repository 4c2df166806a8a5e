"""Tiled inference: restore an image of any size in bounded memory.

An SNN keeps T (+1) steps of 64-channel feature maps per layer: the DnCNN SNN at
T=10 holds ~2.8 GB of float32 per megapixel in each layer's input currents, so a
12-megapixel photo does not fit in memory whole. Both networks are stacks of
stride-1 convolutions and per-pixel operations (neurons, recycling, mapper, the
DnCNN residual, AOD-Net's ``K I - K + 1``), so an output pixel depends only on
the input within the receptive radius ``r`` (the sum of the convolutions' kernel
radii: 17 for DnCNN-17, 7 for AOD-Net). :func:`run_tiled` runs the network on
overlapping tiles that extend ``margin >= r`` pixels past their core (clipped at
the image border, where the zero padding is the image's own) and keeps each
core: the same computation as the whole image, tile by tile. For the converted
DnCNN SNNs on the CPU bit for bit (the input current is rounded once from
float64, the hidden convolutions run the cpp ``spike_conv2d`` in a fixed
order); elsewhere up to float32 rounding (a convolution's summation order can
depend on the input's size, and a potential that lands on a threshold flips a
spike). AOD-Net's SNN runs dense float32 convolutions: measured on SOTS crops,
tiles of 64 moved up to ~1000 output floats by <= 2.4e-7 and no 8-bit pixel.

torch is imported inside the functions: the ``spikingir`` command reads
:data:`DEFAULT_TILE` before torch loads (see ``spikingir/__init__.py``).
"""
import numbers

#: Core size of a tile (pixels per side): a 512 x 512 tile of the DnCNN SNN at
#: T=10 (with its margins) holds ~1 GB per layer's currents.
DEFAULT_TILE = 512


def receptive_radius(model) -> int:
    """Sum over the model's ``nn.Conv2d`` modules of how far each reaches from an
    output pixel, ``max(p, d (k - 1) - p)`` per axis (padding p, dilation d; with
    ``padding="same"`` torch pads ``d (k - 1) // 2`` before and the rest after, so
    an even kernel reaches one pixel further on one side): the receptive radius
    of a network of stride-1 convolutions and per-pixel operations (an upper
    bound when not every conv lies on one path). A network that changes scale
    inside (pooling, upsampling, transposed convs: a converted graph,
    spikingir.models.graph) raises a ValueError: its reach is not this sum, and
    tiles must line up with its scales."""
    from torch import nn
    # layers that change scale (or, adaptive pooling, read the whole image): a U-Net ANN
    # of the user's holds them as modules
    rescaling = (nn.ConvTranspose2d, nn.Upsample, nn.AvgPool2d, nn.MaxPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.PixelShuffle, nn.PixelUnshuffle)
    r = 0
    for m in model.modules():
        kinds = {op[1] for op in getattr(m, "program", ())}  # a graph's ops (GraphNet, SpikingGraph)
        if isinstance(m, rescaling) or kinds & {"avgpool", "upsample"}:
            raise ValueError("receptive_radius: pooling, upsampling and transposed convolutions "
                             "are not supported; pass margin= explicitly (or restore with tile=0)")
        if isinstance(m, nn.Conv2d):
            if any(s != 1 for s in m.stride):
                raise ValueError("receptive_radius: strided convolutions are not supported; "
                                 "pass margin= explicitly (or restore with tile=0)")
            reach = []
            for i, (d, k) in enumerate(zip(m.dilation, m.kernel_size)):
                span = d * (k - 1)
                p = (span // 2 if m.padding == "same" else 0) if isinstance(m.padding, str) \
                    else m.padding[i]
                reach.append(max(p, span - p))
            r += max(reach)
    return r


def run_tiled(fn, x, tile: int = DEFAULT_TILE, margin: int = 0):
    """``fn(x)`` for an image batch ``x`` [B, C, H, W], computed on tiles.

    Each tile's core is ``tile x tile`` output pixels (smaller at the right and
    bottom edges); ``fn`` sees the core plus ``margin`` pixels on each side
    (clipped to the image). With ``margin`` at least the receptive radius of a
    translation-equivariant ``fn`` (see :func:`receptive_radius`) the result is
    that of ``fn(x)``. ``tile <= 0`` or an image that fits one tile: one call.
    """
    import torch
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"run_tiled: expected an image batch [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    for name, v in (("tile", tile), ("margin", margin)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"run_tiled: {name} must be an int, got {v!r}")
    if margin < 0:
        raise ValueError(f"run_tiled: margin must be >= 0, got {margin}")
    H, W = x.shape[-2:]
    if tile <= 0 or (H <= tile and W <= tile):
        return fn(x)
    out = None
    for y0 in range(0, H, tile):
        for x0 in range(0, W, tile):
            y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
            ya, xa = max(0, y0 - margin), max(0, x0 - margin)
            yb, xb = min(H, y1 + margin), min(W, x1 + margin)
            o = fn(x[..., ya:yb, xa:xb])
            if o.shape[-2:] != (yb - ya, xb - xa):
                raise ValueError(f"run_tiled: fn must keep the spatial size, got "
                                 f"{tuple(o.shape[-2:])} for a {yb - ya}x{xb - xa} tile")
            if out is None:
                out = o.new_empty(*o.shape[:-2], H, W)
            out[..., y0:y1, x0:x1] = o[..., y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    return out
