"""Your own CNN with skip connections, concatenations and functional ReLUs,
in the form ``spikingir.convert.to_snn`` converts (through ``torch.fx``).

``to_snn`` takes DnCNN, AOD-Net and conv chains (:mod:`spikingir.models.chain`)
as they are; any other ``nn.Module`` is traced with ``torch.fx.symbolic_trace``
and read into :class:`GraphNet`, a canonical form of the same computation:
BatchNorm folded into the conv before it (a BatchNorm elsewhere becomes a 1x1
depthwise conv, its eval-mode affine map), identities and dropouts removed,
in-place ops resolved (a later reader of a tensor that ``relu_`` or
``ReLU(inplace=True)`` changed reads the changed value; torch.fx traces
``h += y`` as ``h = h + y``, so ``to_snn`` checks the form against the network
on a calibration image and refuses a difference), every conv a float32
copy with a bias. Everything the spiking form cannot reproduce is refused, with
the node named: an untraceable model (data-dependent control flow), another
nonlinearity (max pooling, sigmoid, ReLU6, LeakyReLU, ...), a product of two
tensors, a concatenation along another dim than the channels.

:class:`SpikingGraph` is the converted network (rate coding, as
:class:`~spikingir.models.spiking.SpikingChain`): every ReLU becomes a spiking
neuron layer; the linear ops run on ``[steps, B, C, H, W]`` sequences, one step
at a time (merged into the batch). A node that depends on the input through
linear ops only (the first conv, a skip from the input) is computed once and
fed to every step: the analog input current. The output is the mean over the T
steps of the output node. The output is linear in the rates of the neurons
whose spikes reach it through linear ops only, so it is computed once, on their
rates (``sum_t y[t] / T`` over all steps, the MPRN reuse step included, plus
the recycled residual ``v_res / T``; :func:`spikingir.nn.mapper.spike_rate`):
biases are added once, as by the chain's pixel mapper. For a chain this is the
chain SNN's read-out, bit for bit.
"""
import copy
import numbers
import operator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import fx, nn

from spikingir import ops
from spikingir.energy import (E_MAC_PJ, E_SOP_PJ, _pair, conv_call_macs, conv_mean_fanout,
                              conv_sops, transposed_conv_macs)
from spikingir.ops.spike_conv import supports as spike_conv_supports

from .chain import _SKIPPED, _numeric_padding, _plain, folded_copy, skip
from .spiking import SpikingChain, _has_hooks, _per_channel, _SpikingNet

__all__ = ["GraphNet", "SpikingGraph", "graph_net", "graph_config", "graph_from_config",
           "SUPPORTED"]

#: What the graph conversion reads (the refusals list it).
SUPPORTED = ("nn.Conv2d (any groups; a BatchNorm2d right after it is folded in), "
             "nn.ConvTranspose2d, nn.BatchNorm2d (eval statistics), nn.ReLU / F.relu / "
             "torch.relu / .relu() (in-place too), + and - of tensors and numbers, * and / by "
             "numbers, torch.cat along dim 1, nn.AvgPool2d / F.avg_pool2d, nn.Upsample / "
             "F.interpolate in mode 'nearest', nn.Identity, dropouts, spikingir.models.Residual, "
             "x.shape / x.size()")


class _Ref:
    """A reference to another node's value in a program's arguments."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __getstate__(self):
        return self.name

    def __setstate__(self, name):
        self.name = name

    def __repr__(self):
        return f"%{self.name}"


def _refs(args):
    """The node names referenced (at any depth) in ``args``."""
    if isinstance(args, _Ref):
        return [args.name]
    if isinstance(args, (list, tuple)):
        return [n for a in args for n in _refs(a)]
    if isinstance(args, dict):
        return [n for a in args.values() for n in _refs(a)]
    return []


def _resolve(args, env):
    """``args`` with every reference replaced by its value in ``env``."""
    if isinstance(args, _Ref):
        return env[args.name]
    if isinstance(args, (list, tuple)):
        return type(args)(_resolve(a, env) for a in args)
    if isinstance(args, dict):
        return {k: _resolve(a, env) for k, a in args.items()}
    return args


def _renamed(args, names):
    """``args`` with every reference to a node in ``names`` renamed to ``names[node]``."""
    if isinstance(args, _Ref):
        return _Ref(names.get(args.name, args.name))
    if isinstance(args, (list, tuple)):
        return type(args)(_renamed(a, names) for a in args)
    if isinstance(args, dict):
        return {k: _renamed(a, names) for k, a in args.items()}
    return args


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ARITH = {operator.add: "add", operator.iadd: "add", torch.add: "add",
          operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
          operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
          operator.truediv: "div", operator.itruediv: "div", torch.div: "div"}
_ARITH_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
                  "mul_": "mul", "div": "div", "div_": "div"}
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_, F.relu_,
             "add_", "sub_", "mul_", "div_", "relu_"}
_CATS = {torch.cat, torch.concat, torch.concatenate}
#: The info of a conv node that is a BatchNorm's affine map (a BatchNorm not right
#: after a conv). The energy model counts conv MACs only (DESIGN: no ReLU, BN or
#: additions; spikingir.energy.ann_energy_mj counts the ANN's nn.Conv2d calls), so
#: the SNN counts no MACs or SOPs for it and leaves it out of the ANN figure of
#: ``energy_ratio``: a per-channel a * v + b, as the BatchNorm costs in the ANN,
#: and folded into the weights and biases of the convs next to it in hardware,
#: as a number times spikes is. Counted on one side only it biased the ratio
#: (OddOps at 128x128, T=10: 1.4 M analog MACs per image in the SNN, none in the ANN).
_AFFINE = "affine"


class _Builder:
    """Reads a traced ``fx.GraphModule`` into a program: a list of
    ``(name, kind, args, info)`` in evaluation order, with the layers it uses."""

    def __init__(self, gm, what):
        self.gm, self.what = gm, what
        self.modules = dict(gm.named_modules())
        self.program, self.layers = [], {}
        self.root, self.version = {}, {}  # in-place ops: the tensor a name aliases, its latest value
        self.kind = {}  # name -> kind, for BN folding
        self.n_relus = 0

    def refuse(self, node, why):
        raise ValueError(f"to_snn: {self.what}: node {node.name!r} ({self.describe(node)}): {why}. "
                         f"The graph conversion supports {SUPPORTED}")

    def describe(self, node):
        if node.op == "call_module":
            m = self.modules[node.target]
            return f"{type(m).__name__} {node.target}"
        if node.op == "call_function":
            t = node.target
            mod = getattr(t, "__module__", None) or ""
            prefix = f"{mod}." if mod and mod != "_operator" else "operator."
            return prefix + getattr(t, "__name__", str(t))
        if node.op == "call_method":
            return f"Tensor.{node.target}"
        return f"{node.op} {node.target}"

    def read(self, a):
        """Argument ``a`` of a node as the program sees it (nodes as references to
        their latest value: an in-place op changed what later readers see)."""
        if isinstance(a, fx.Node):
            return _Ref(self.version[self.root[a.name]])
        if isinstance(a, (list, tuple)):
            return type(a)(self.read(x) for x in a)
        if isinstance(a, dict):
            return {k: self.read(x) for k, x in a.items()}
        if isinstance(a, slice):
            return slice(self.read(a.start), self.read(a.stop), self.read(a.step))
        return a

    def emit(self, node, kind, args, info=None, in_place_of=None):
        name = node.name
        self.program.append((name, kind, args, info))
        self.kind[name] = kind
        if in_place_of is not None and isinstance(in_place_of, fx.Node):
            # the op changed its input tensor: every later reader of it (or of an
            # alias of it) reads this node's value
            r = self.root[in_place_of.name]
            self.root[name] = r
            self.version[r] = name
        else:
            self.root[name] = self.version[name] = name

    def alias(self, node, src):
        """``node`` is ``src`` (an identity in eval mode)."""
        if not isinstance(src, fx.Node):
            self.refuse(node, "expected a tensor input")
        self.root[node.name] = self.root[src.name]

    def tensor_arg(self, node, a):
        if not isinstance(a, fx.Node):
            self.refuse(node, f"expected a tensor, got {a!r}")
        return self.read(a)

    def build(self):
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"to_snn: {self.what}: forward takes {len(placeholders)} inputs "
                             f"({', '.join(n.name for n in placeholders)}); expected one image batch")
        for node in self.gm.graph.nodes:
            getattr(self, "_" + node.op)(node)
        return self.program, self.layers

    def _placeholder(self, node):
        self.emit(node, "input", ())

    def _get_attr(self, node):
        self.refuse(node, "forward reads a parameter or buffer directly; only the listed layers "
                          "and ops are reproduced")

    def _output(self, node):
        out = node.args[0]
        if not isinstance(out, fx.Node):
            self.refuse(node, f"expected forward to return one tensor, got {type(out).__name__}")
        self.emit(node, "output", (self.read(out),))

    def _call_module(self, node):
        m = self.modules[node.target]
        where = f"layer {node.target}"
        if len(node.args) != 1 or node.kwargs:
            self.refuse(node, "expected a call with one tensor argument")
        src = node.args[0]
        if isinstance(m, _SKIPPED):
            return self.alias(node, src)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            base = nn.ConvTranspose2d if isinstance(m, nn.ConvTranspose2d) else nn.Conv2d
            _plain(m, base, where)
            if m.padding_mode != "zeros":
                self.refuse(node, f"padding_mode={m.padding_mode!r}: zero padding only")
            self.layers[node.name] = (m, None)
            return self.emit(node, "conv", (self.tensor_arg(node, src),))
        if isinstance(m, nn.BatchNorm2d):
            _plain(m, nn.BatchNorm2d, where)
            if m.running_mean is None or m.running_var is None:
                self.refuse(node, "a BatchNorm2d without running statistics "
                                  "(track_running_stats=False) normalises every batch by its own "
                                  "statistics, which no fixed conv reproduces")
            ref = self.tensor_arg(node, src)
            prev = next((p for p in self.program if p[0] == ref.name), None)
            conv = self.layers.get(ref.name)
            if prev is not None and prev[1] == "conv" and conv is not None and \
                    isinstance(conv[0], nn.Conv2d) and conv[1] is None:
                # folded: conv then BN is one conv (the plain conv stays for other readers)
                self.layers[node.name] = (conv[0], m)
                return self.emit(node, "conv", prev[2])
            self.layers[node.name] = (None, m)  # its affine map, a 1x1 depthwise conv
            # marked "affine": no conv of the ANN, so no MACs in the energy count (_AFFINE)
            return self.emit(node, "conv", (ref,), _AFFINE)
        if isinstance(m, nn.ReLU):
            _plain(m, nn.ReLU, where)
            return self.relu(node, src, m.inplace)
        if isinstance(m, nn.AvgPool2d):
            _plain(m, nn.AvgPool2d, where)
            info = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                        ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                        divisor_override=m.divisor_override)
            return self.emit(node, "avgpool", (self.tensor_arg(node, src),), info)
        if isinstance(m, nn.Upsample):
            _plain(m, nn.Upsample, where)
            return self.upsample(node, src, dict(size=m.size, scale_factor=m.scale_factor,
                                                 mode=m.mode,
                                                 recompute_scale_factor=m.recompute_scale_factor))
        self.refuse(node, self.nonlinear_hint(type(m).__name__))

    def nonlinear_hint(self, name):
        low = name.lower()
        if any(k in low for k in ("relu", "elu", "gelu", "silu", "sigmoid", "tanh", "softplus",
                                  "hardswish", "mish", "prelu", "maxpool", "max_pool", "softmax")):
            return (f"{name} is not supported: spiking neurons replace ReLU activations only "
                    "(rate coding reproduces max(x, 0), not other nonlinearities; use ReLU, or "
                    "average pooling instead of max pooling)")
        return f"{name} is not supported"

    def relu(self, node, src, in_place):
        ref = self.tensor_arg(node, src)
        self.emit(node, "relu", (ref,), self.n_relus, in_place_of=src if in_place else None)
        self.n_relus += 1

    def upsample(self, node, src, kw):
        if kw.get("mode", "nearest") not in ("nearest", "nearest-exact"):
            self.refuse(node, f"upsampling mode {kw.get('mode')!r}: 'nearest' only")
        if kw.get("antialias"):
            self.refuse(node, "antialias=True")
        kw = {k: self.read(v) for k, v in kw.items() if k in
              ("size", "scale_factor", "mode", "recompute_scale_factor")}
        self.emit(node, "upsample", (self.tensor_arg(node, src),), kw)

    def _call_method(self, node):
        t = node.target
        if t in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return self.relu(node, node.args[0], t == "relu_")
        if t in _ARITH_METHODS:
            return self.arith(node, _ARITH_METHODS[t], node.args, node.kwargs,
                              in_place=t.endswith("_"))
        if t == "neg" and len(node.args) == 1:
            return self.emit(node, "mul", (self.tensor_arg(node, node.args[0]), -1), None)
        if t == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.emit(node, "shape", (self.tensor_arg(node, node.args[0]),), dim)
        if t in ("contiguous",) and len(node.args) == 1:
            return self.alias(node, node.args[0])
        self.refuse(node, self.nonlinear_hint(f"Tensor.{t}"))

    def _call_function(self, node):
        t, args, kw = node.target, node.args, node.kwargs
        if t in _RELU_FUNCTIONS:
            if len(args) != 1 or set(kw) - {"inplace"}:
                self.refuse(node, "expected relu(x) or relu(x, inplace=...)")
            return self.relu(node, args[0], t in _IN_PLACE or bool(kw.get("inplace", False)))
        if t in _ARITH:
            return self.arith(node, _ARITH[t], args, kw, in_place=t in _IN_PLACE)
        if t is skip:  # spikingir.models.Residual's x -/+ body(x), its shape checked in the ANN
            subtract = args[2] if len(args) > 2 else kw.get("subtract", True)
            return self.emit(node, "sub" if subtract else "add",
                             (self.tensor_arg(node, args[0]), self.tensor_arg(node, args[1])),
                             "same shape")
        if t is operator.neg:
            return self.emit(node, "mul", (self.tensor_arg(node, args[0]), -1), None)
        if t is operator.pos:
            return self.alias(node, args[0])
        if t in _CATS:
            tensors = args[0] if args else kw.get("tensors")
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            if dim not in (1, -3):
                self.refuse(node, f"a concatenation along dim {dim!r}: along the channels "
                                  "(dim=1) only")
            if not isinstance(tensors, (list, tuple)) or not all(isinstance(a, fx.Node)
                                                                 for a in tensors):
                self.refuse(node, "expected a list of tensors")
            return self.emit(node, "cat", ([self.read(a) for a in tensors],))
        if t is F.avg_pool2d:
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override")
            info = dict(zip(names, args[1:]), **kw)
            if any(isinstance(v, fx.Node) for v in info.values()):
                self.refuse(node, "pooling sizes computed in forward")
            return self.emit(node, "avgpool", (self.tensor_arg(node, args[0]),), info)
        if t is F.interpolate:
            names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                     "antialias")
            return self.upsample(node, args[0], dict(dict(zip(names, args[1:])), **kw))
        if t in (F.dropout, F.dropout2d, F.dropout1d, F.dropout3d, F.alpha_dropout):
            training = args[2] if len(args) > 2 else kw.get("training", True)
            if training is not False:
                self.refuse(node, "a functional dropout that is on in eval mode (pass "
                                  "training=self.training, or use nn.Dropout)")
            return self.alias(node, args[0])
        if t is getattr and len(args) == 2 and args[1] == "shape":
            return self.emit(node, "shape", (self.tensor_arg(node, args[0]),), None)
        if t is operator.getitem and isinstance(args[0], fx.Node) and \
                self.kind.get(self.version.get(self.root.get(args[0].name))) in ("shape", "item"):
            return self.emit(node, "item", (self.read(args[0]), self.read(args[1])))
        self.refuse(node, self.nonlinear_hint(getattr(t, "__name__", str(t))))

    def arith(self, node, op, args, kw, in_place):
        if len(args) != 2 or set(kw) - ({"alpha"} if op in ("add", "sub") else set()) or \
                kw.get("alpha", 1) != 1:
            self.refuse(node, "expected a binary + - * / (no alpha, no rounding_mode)")
        a, b = args
        shapes = [isinstance(x, fx.Node) and self.kind.get(self.version.get(self.root.get(x.name)))
                  in ("shape", "item") for x in (a, b)]
        if any(shapes):  # arithmetic on sizes (e.g. x.shape[-1] * 2): Python numbers
            return self.emit(node, "size_arith", (self.read(a), self.read(b)), op)
        tensors = [isinstance(x, fx.Node) for x in (a, b)]
        if not any(tensors) or not all(isinstance(x, fx.Node) or _is_number(x) for x in (a, b)):
            self.refuse(node, f"expected tensors and Python numbers, got {a!r} and {b!r}")
        if op in ("mul", "div"):
            if all(tensors):
                self.refuse(node, "a product or quotient of two tensors is not linear in the "
                                  "spikes; multiply or divide by Python numbers only")
            if op == "div" and not tensors[0]:
                self.refuse(node, "a number divided by a tensor is not linear")
        self.emit(node, op, (self.read(a), self.read(b)), None,
                  in_place_of=a if in_place and tensors[0] else None)


class _Structure:
    """What a program's nodes are (built once per network): ``static`` nodes depend
    on the input through linear ops only; ``seq`` nodes are computed per step
    (some neuron reads them); ``rate`` nodes are computed once on the read-out
    neurons' rates (the output reads them)."""

    def __init__(self, program):
        self.ops = {p[0]: p for p in program}
        self.order = [p[0] for p in program]
        self.static = set()
        for name, kind, args, info in program:
            if kind == "input" or (kind not in ("relu", "output") and
                                   all(r in self.static for r in _refs((args, info)))):
                self.static.add(name)
        self.relus = [p[0] for p in program if p[1] == "relu"]
        self.seq = self._closure([self.deps(r) for r in self.relus])
        out = next(p for p in program if p[1] == "output")
        self.output = out[2][0].name
        self.rate = self._closure([[self.output]])
        self.readout = [r for r in self.relus if r in self.rate]
        # per-step values are freed after their last reader there (the chain SNN holds
        # one layer's at a time); static values and read-out spikes are kept
        self.keep = self.static | set(self.readout)
        self.last_read = {}
        self.seq_readers = {n: [] for n in self.order}  # who reads a node per step
        for n in self.order:
            if n in self.seq or n in self.static or self.ops[n][1] == "relu":
                for d in self.deps(n):
                    self.last_read[d] = n
                    if n in self.seq or self.ops[n][1] == "relu":  # a neuron reads its input
                        self.seq_readers[d].append(n)  # per step (relu(relu(h)) too)

    def _closure(self, starts):
        """The nodes those in ``starts`` need, down to neurons (whose outputs
        come from the neuron) and static nodes (computed once, first)."""
        seen, todo = set(), [n for s in starts for n in s]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if self.ops[n][1] != "relu" and n not in self.static:
                todo += self.deps(n)
        return seen

    def needed(self):
        """Every node the network computes (the static ones included)."""
        todo, seen = [n for n in self.order if self.ops[n][1] == "output"], set()
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += self.deps(n)
        return seen

    def deps(self, name):
        """The nodes node ``name`` reads (sizes in its options included)."""
        _, _, args, info = self.ops[name]
        return _refs((args, info))


class _ChunkPlan:
    """How :class:`SpikingGraph` runs with ``step_chunk`` (layer-major): the neuron
    layers one after another, each over all steps, its input current made one
    chunk at a time. Every op between neuron layers is linear and per step, so a
    chunk's current needs only the same chunk (the same steps) of what it reads.

    ``compute[r]``: the per-step nodes neuron layer ``r``'s current needs (graph
    order), made anew per chunk unless ``shared``: needed by the currents of
    several neuron layers, each chunk of those is made once and kept until the
    last of them has run it. ``reads[r]``: the kept values (neuron layers'
    spikes, shared nodes) its chunks read; ``last[n]``: the last neuron layer
    that reads kept value ``n`` (its chunk is freed once that layer has run the
    chunk); ``last_in[r][d]``: the node of ``r``'s chunk that reads ``d`` last
    (what a chunk made is freed after)."""

    def __init__(self, st):
        self.compute, self.reads, self.last, self.last_in = {}, {}, {}, {}
        where = {n: k for k, n in enumerate(st.order)}
        for r in st.relus:
            need = st._closure([st.deps(r)])
            self.compute[r] = sorted((n for n in need if n not in st.static
                                      and st.ops[n][1] != "relu"), key=where.get)
        uses = {}
        for r in st.relus:
            for n in self.compute[r]:
                uses[n] = uses.get(n, 0) + 1
        self.shared = {n for n, k in uses.items() if k > 1}
        for r in st.relus:
            readers = self.compute[r] + [r]
            self.last_in[r] = {d: n for n in readers for d in st.deps(n)}
            self.reads[r] = [d for d in self.last_in[r] if d in self.shared
                             or st.ops[d][1] == "relu"]
            self.reads[r] += [n for n in self.compute[r] if n in self.shared
                              and n not in self.reads[r]]
            for d in self.reads[r]:
                self.last[d] = r


def _values_of_masks(masks, neuron, T, dtype):
    """The values ``neuron`` emits for the spikes ``masks`` (SpikeMasks [steps, B, C, H,
    W]: T IF steps, then the reuse step when it has more), as a contiguous ``dtype``
    tensor: theta per IF-step spike, beta per reuse-step one, 0 elsewhere; the same
    bits as the neuron's (1 x size is exact, and rounded to ``dtype`` as the neuron
    rounds it). Byte b of a pixel's words holds channels 8 b .. 8 b + 7 (the masks
    layout): each of the 8 bit positions is copied, as 0/1, into its channels of
    the output, then the steps are scaled in place. 2.3x faster than
    ``SpikeMasks.to_dense`` and a multiplication (a [5, 1, 32, 256, 256] chunk: 67
    against 158 ms, half of it the new tensor's page faults; 1 thread): uint8 to
    float conversions and new tensors are the slow parts on the CPU."""
    n, B, C, H, W = masks.shape
    nb = (C + 7) // 8  # the bytes holding channels
    u = masks.bits.view(torch.uint8).movedim(-1, -3)[:, :, :nb]  # [n, B, nb, H, W]
    out = torch.empty(n, B, nb, 8, H, W, dtype=dtype, device=masks.device)
    for j in range(8):
        out[:, :, :, j].copy_((u >> j) & 1)
    out = out.flatten(2, 3)[:, :, :C]
    out = out if C % 8 == 0 else out.contiguous()
    out[:T].mul_(_per_channel(neuron.effective_theta()))
    if n > T:
        out[T:].mul_(_per_channel(neuron.beta))
    return out


def _canonical(conv, bn, name):
    """A float32, trainable copy of a layer for the program: a Conv2d with a bias and
    numeric padding (``bn`` folded in), a ConvTranspose2d, or (``conv`` None) a
    BatchNorm2d's eval-mode affine map as a 1x1 depthwise conv."""
    if conv is None:
        c = bn.num_features
        out = nn.Conv2d(c, c, 1, groups=c, device=bn.running_mean.device)
        with torch.no_grad():
            scale = (bn.weight.detach().double() if bn.weight is not None else 1.0) / \
                torch.sqrt(bn.running_var.double() + bn.eps)
            shift = (bn.bias.detach().double() if bn.bias is not None else 0.0) - \
                bn.running_mean.double() * scale
            out.weight.copy_(scale.view(c, 1, 1, 1).float())
            out.bias.copy_(shift.float())
        return out
    if isinstance(conv, nn.ConvTranspose2d):
        out = copy.deepcopy(conv).float().requires_grad_(True)
        if out.bias is None:
            out.bias = nn.Parameter(torch.zeros(out.out_channels, device=out.weight.device))
        return out
    return folded_copy(conv, bn, _numeric_padding(conv, f"node {name!r}"))


def _upsample(x, info):
    kw = {k: (tuple(v) if isinstance(v, (list, torch.Size)) else v) for k, v in info.items()}
    return F.interpolate(x, **kw)


def _apply(kind, layer, args, info):
    """One op of the program on [N, C, H, W] tensors (and Python numbers)."""
    if kind == "conv":
        return layer(args[0])
    if kind in ("add", "sub", "mul", "div"):
        a, b = args
        if info == "same shape":  # a Residual: its shape check (a broadcast would hide a bug)
            return skip(a, b, kind == "sub")
        return {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                "div": operator.truediv}[kind](a, b)
    if kind == "cat":
        return torch.cat(args[0], 1)
    if kind == "avgpool":
        return F.avg_pool2d(args[0], **info)
    if kind == "upsample":
        return _upsample(args[0], info)
    raise AssertionError(kind)


def _size_op(kind, args, info, shape_of):
    """The value of a size node: a shape, an element of one, or arithmetic on them."""
    if kind == "shape":
        size = shape_of(args[0])
        return size if info is None else size[info]
    if kind == "item":
        return args[0][args[1]]
    return {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
            "div": operator.truediv}[info](*args)


class GraphNet(nn.Module):
    """The canonical form of a traced CNN (build it with :func:`graph_net`): the
    same computation, as a program of convs (BatchNorm folded, float32 copies),
    ReLUs (``relus``, in graph order: the layers that become neurons) and linear
    ops. ``in_channels``: the input's channels, as the first conv that depends on
    the input needs them (also through pooling, sums and concatenations:
    :func:`_input_channels`), else None."""

    def __init__(self, program, layers, in_channels=None):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict(layers)
        self.relus = nn.ModuleList(nn.ReLU() for p in program if p[1] == "relu")
        self.in_channels = in_channels

    def forward(self, x):
        return self.node_values(x)[self.program[-1][0]]  # the output node is the last

    def node_values(self, x):
        """Every node's value on ``x``, by node name (the output node's: the
        output; a ReLU's input: its pre-activation, which the layer calibration
        fits to)."""
        env = {}
        for name, kind, args, info in self.program:
            if kind == "input":
                env[name] = x
            elif kind == "output":
                env[name] = env[args[0].name]
            elif kind == "relu":
                env[name] = self.relus[info](env[args[0].name])
            elif kind in ("shape", "item", "size_arith"):
                env[name] = _size_op(kind, _resolve(args, env), info, lambda t: t.shape)
            else:
                env[name] = _apply(kind, self.layers[name] if kind == "conv" else None,
                                   _resolve(args, env), _resolve(info, env))
        return env

    def relu_channels(self):
        """Per ReLU (neuron layer), in order: the channels of its input where a
        conv feeds it directly, else None (a sum's, a concatenation's)."""
        return [self.layers[p[2][0].name].out_channels if p[2][0].name in self.layers else None
                for p in self.program if p[1] == "relu"]


def graph_net(model: nn.Module) -> GraphNet:
    """The canonical form (:class:`GraphNet`, eval mode, float32 copies; ``model``
    left unchanged) of any ``nn.Module`` that ``torch.fx.symbolic_trace`` traces
    and that uses only the layers and ops in ``SUPPORTED``. A model fx cannot
    trace raises a TypeError; an op the spiking form cannot reproduce a
    ValueError that names the node and lists what is supported.

    A layer that forward calls more than once (tied weights) is one layer of
    the form, held by every call site's node: its parameters stay tied in the
    SNN (one parameter, the gradients of all uses summed; saved and loaded
    tied), while each call site keeps its own place (per step, static, read-out)
    and energy count. A conv with a BatchNorm folded in is tied where the same
    conv and the same BatchNorm are called again; the same conv followed by
    different BatchNorms (or by one and by none) are different layers, so those
    call sites get copies, which fine-tuning trains apart."""
    what = type(model).__name__
    model = copy.deepcopy(model).eval()  # traced in eval mode: dropouts off, BN statistics
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, ... for what it cannot follow
        raise TypeError(f"to_snn: torch.fx cannot trace {what} ({type(err).__name__}: {err}); "
                        "the graph conversion needs a forward without data-dependent control "
                        "flow (if / for on tensor values), or a DnCNN, AODNet, or an "
                        "nn.Sequential conv chain") from err
    program, sources = _Builder(gm, what).build()
    st = _Structure(program)
    needed = st.needed()
    program = [p for p in program if p[0] in needed]
    if not st.readout:
        raise ValueError(f"to_snn: {what}: no ReLU reaches the output through linear ops; the "
                         "spiking layers replace ReLUs, so the network needs at least one")
    # neurons numbered in graph order among the ReLUs the network computes
    relu_names = [p[0] for p in program if p[1] == "relu"]
    program = [(n, k, a, relu_names.index(n) if k == "relu" else i) for n, k, a, i in program]
    # the convs are kept in an nn.ModuleDict by node name (the model's attribute name):
    # a name that is one of its attributes ("values", "update", "keys", ...) gets a suffix
    taken, names, held = {p[0] for p in program}, {}, nn.ModuleDict()
    for n, k, _, _ in program:
        if k == "conv" and hasattr(held, n):
            new = n + "_"
            while new in taken or hasattr(held, new):
                new += "_"
            taken.add(new)
            names[n] = new
    program = [(names.get(n, n), k, _renamed(a, names), _renamed(i, names))
               for n, k, a, i in program]
    sources = {names.get(n, n): v for n, v in sources.items()}
    # tied weights: one canonical layer per (conv, BatchNorm) pair of the model's modules
    layers, canonical = {}, {}
    for n, k, _, _ in program:
        if k == "conv":
            key = tuple(id(m) for m in sources[n])
            if key not in canonical:
                canonical[key] = _canonical(*sources[n], n)
            layers[n] = canonical[key]
    return GraphNet(program, layers, _input_channels(program, layers)).eval()


def _input_channels(program, layers):
    """The channels of the input that ``program`` (its convs ``layers``) takes:
    those the first conv that depends on it needs, through ops that keep the
    channels (ReLU, pooling, upsampling, + - * / by numbers, sums of tensors of
    the same channels) and concatenations (their channels summed); None where
    no conv's channels say (e.g. only broadcasting sums reach one). Each
    tensor's channels are ``a * C + b`` of the input's C: a conv's output has
    ``(0, out_channels)``; a conv that reads ``a * C + b`` with a > 0 needs
    ``C = (in_channels - b) / a``."""
    ch = {}  # node -> (a, b), or None: not known
    for name, kind, args, info in program:
        refs = [ch.get(r) for r in _refs(args)]
        if kind == "input":
            ch[name] = (1, 0)
        elif kind == "conv":
            if refs[0] is not None and refs[0][0] > 0:
                (a, b), need = refs[0], layers[name].in_channels
                if (need - b) % a == 0 and need - b > 0:
                    return (need - b) // a
            ch[name] = (0, layers[name].out_channels)
        elif kind == "cat":
            ch[name] = (None if None in refs else
                        (sum(r[0] for r in refs), sum(r[1] for r in refs)))
        elif kind in ("relu", "avgpool", "upsample", "add", "sub", "mul", "div"):
            ch[name] = refs[0] if len(set(refs)) == 1 else None  # a broadcast: not known
    return None


# -------------------------------------------------- the program as plain data (SNN files)

_KINDS = ("input", "output", "conv", "relu", "add", "sub", "mul", "div", "cat", "avgpool",
          "upsample", "shape", "item", "size_arith")
_ONE_TENSOR = ("conv", "relu", "output", "avgpool", "upsample", "shape")


def _encode(v):
    """A program value as plain JSON types (what ``torch.load(weights_only=True)``
    reads back, no pickled classes): a reference as ``{"ref": name}``, a tuple as
    ``{"tuple": [...]}``, a slice as ``{"slice": [start, stop, step]}``, a dict as
    ``{"dict": {...}}`` (so every dict in the encoding is one of these tags);
    lists, numbers, strings, bools and None as they are."""
    if isinstance(v, _Ref):
        return {"ref": v.name}
    if isinstance(v, tuple):  # torch.Size too (a size read from a shape)
        return {"tuple": [_encode(a) for a in v]}
    if isinstance(v, list):
        return [_encode(a) for a in v]
    if isinstance(v, dict):
        return {"dict": {str(k): _encode(a) for k, a in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"graph program: cannot save a value of type {type(v).__name__} ({v!r})")


def _decode(v):
    """:func:`_encode`'s inverse; a ValueError for anything it does not write."""
    if isinstance(v, list):
        return [_decode(a) for a in v]
    if isinstance(v, dict):
        tag, a = next(iter(v.items())) if len(v) == 1 else (None, None)
        if tag == "ref" and isinstance(a, str):
            return _Ref(a)
        if tag == "tuple" and isinstance(a, list):
            return tuple(_decode(x) for x in a)
        if tag == "dict" and isinstance(a, dict):
            return {k: _decode(x) for k, x in a.items()}
        if tag == "slice" and isinstance(a, list) and len(a) == 3:
            return slice(*(_decode(x) for x in a))
        raise ValueError(f"unknown program value {str(v)[:80]}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"unknown program value of type {type(v).__name__}")


def _layer_config(m):
    c = {"type": type(m).__name__, "in": m.in_channels, "out": m.out_channels,
         "kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
         "dilation": list(m.dilation), "groups": m.groups}
    if isinstance(m, nn.ConvTranspose2d):
        c["output_padding"] = list(m.output_padding)
    return c


def _layer_from_config(c):
    kw = dict(stride=tuple(c["stride"]), padding=tuple(c["padding"]),
              dilation=tuple(c["dilation"]), groups=c["groups"])
    if c["type"] == "Conv2d":
        return nn.Conv2d(c["in"], c["out"], tuple(c["kernel"]), **kw)
    if c["type"] == "ConvTranspose2d":
        return nn.ConvTranspose2d(c["in"], c["out"], tuple(c["kernel"]),
                                  output_padding=tuple(c["output_padding"]), **kw)
    raise ValueError(f"unknown layer type {c['type']!r}")


def graph_config(net) -> dict:
    """What rebuilds ``net`` (a :class:`GraphNet` or :class:`SpikingGraph`) without
    the code it was traced from, as plain JSON types (``spikingir.pipeline.save_snn``
    stores it): ``program``, a list of ``[name, kind, args, info]`` (references to
    other nodes as ``{"ref": name}``, see :func:`_encode`), ``layers``, the geometry
    of each conv by node name (a layer called at several nodes, tied weights: at
    each later one also ``"tied": first node``), and ``in_channels``."""
    layers, first = {}, {}
    for n, m in net.layers.items():
        layers[n] = _layer_config(m)
        if id(m) in first:
            layers[n]["tied"] = first[id(m)]
        first.setdefault(id(m), n)
    return {"program": [[n, k, _encode(a), _encode(i)] for n, k, a, i in net.program],
            "layers": layers, "in_channels": net.in_channels}


def graph_from_config(cfg) -> GraphNet:
    """The :class:`GraphNet` (fresh layers of the saved geometry, to load a state
    dict into) of a :func:`graph_config`. A program that is not one (cut short,
    a reference to no earlier node, an unknown op, a conv without its layer)
    raises a ValueError that says what is wrong."""
    raw = cfg["program"]
    if not isinstance(raw, list):
        raise ValueError(f"graph program: expected a list, got {type(raw).__name__}")
    program, seen = [], set()
    for k, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and entry[1] in _KINDS):
            raise ValueError(f"graph program: entry {k} is not [name, kind, args, info] with a "
                             f"kind in {_KINDS}: {str(entry)[:80]}")
        name, kind = entry[0], entry[1]
        args, info = _decode(entry[2]), _decode(entry[3])
        if name in seen or not isinstance(args, tuple):
            raise ValueError(f"graph program: entry {k} ({name!r}): a repeated name or args "
                             "that are not a tuple")
        missing = [r for r in _refs((args, info)) if r not in seen]
        if missing:
            raise ValueError(f"graph program: node {name!r} reads {missing[0]!r}, which no "
                             "earlier node computes")
        tensors = (args[0] if kind == "cat" and args and isinstance(args[0], list) else
                   args[:1] if kind in _ONE_TENSOR else [])
        if (kind in _ONE_TENSOR + ("cat",) and
                (len(args) != 1 or not tensors or not all(isinstance(a, _Ref) for a in tensors))) \
                or (kind in ("add", "sub", "mul", "div", "item", "size_arith") and len(args) != 2):
            raise ValueError(f"graph program: node {name!r}: wrong arguments for a {kind}")
        seen.add(name)
        program.append((name, kind, args, info))
    kinds = [p[1] for p in program]
    relus = [p[3] for p in program if p[1] == "relu"]
    if kinds.count("input") != 1 or kinds.count("output") != 1 or kinds[-1] != "output":
        raise ValueError("graph program: expected one input and one output node, the output last "
                         "(cut short?)")
    if relus != list(range(len(relus))):
        raise ValueError(f"graph program: the ReLUs are numbered {relus}, expected 0, 1, ...")
    layers = cfg["layers"]
    convs = [p[0] for p in program if p[1] == "conv"]
    if not isinstance(layers, dict) or sorted(layers) != sorted(convs):
        raise ValueError("graph program: its conv nodes and its layers differ")
    if not _Structure(program).readout:
        raise ValueError("graph program: no ReLU reaches the output")
    in_channels = cfg["in_channels"]
    if in_channels is not None and (isinstance(in_channels, bool) or
                                    not isinstance(in_channels, int) or in_channels < 1):
        raise ValueError(f"graph program: in_channels: expected None or an int >= 1, got "
                         f"{in_channels!r}")
    built = {n: _layer_from_config(layers[n]) for n in convs if "tied" not in layers[n]}
    for n in convs:
        tied = layers[n].get("tied")
        if tied is None:
            continue
        if not isinstance(tied, str) or tied not in built or \
                {**layers[n], "tied": None} != {**layers[tied], "tied": None}:
            raise ValueError(f"graph program: layer {n!r} is tied to {tied!r}, which is no untied "
                             "layer of the same geometry")
        built[n] = built[tied]  # one module at both nodes: the weights stay tied
    built = {n: built[n] for n in convs}
    if in_channels is None:  # saved before the channels were found through pooling, sums, ...
        in_channels = _input_channels(program, built)
    return GraphNet(program, built, in_channels).eval()


def _layer_macs(conv, shape):
    """MACs of one call of ``conv`` (Conv2d or ConvTranspose2d) on ``shape`` [B, C, H, W]."""
    B, _, H, W = shape
    if isinstance(conv, nn.ConvTranspose2d):
        return transposed_conv_macs(conv, B * conv.in_channels * H * W)
    return conv_call_macs(conv, B, H, W)[0]


def _layer_sops(conv, counts):
    """Synaptic operations of ``conv`` driven by spike ``counts`` [B, C, H, W]
    (:func:`spikingir.energy.conv_sops`; a transposed conv: each spike reaches
    Cout/groups outputs at every kernel tap that lands inside the output)."""
    if not isinstance(conv, nn.ConvTranspose2d):
        return conv_sops(conv, counts)
    g = conv.groups
    s = counts.detach().double().unflatten(1, (g, conv.in_channels // g)).sum(2)
    ones = torch.ones(g, 1, *conv.kernel_size, dtype=torch.float64, device=s.device)
    per_out = F.conv_transpose2d(s, ones, None, conv.stride, conv.padding, conv.output_padding, g,
                                 conv.dilation)
    return int(round(per_out.sum().item() * (conv.out_channels // g)))


def _mean_fanout(conv):
    if isinstance(conv, nn.ConvTranspose2d):
        kh, kw = conv.kernel_size
        return conv.out_channels // conv.groups * kh * kw
    return conv_mean_fanout(conv)


class _Value:
    """A node's value in the SNN: ``t`` is [B, C, H, W] (static or a rate) or, with
    ``seq``, [steps, B, C, H, W]; ``sources`` (spike-valued nodes: neuron
    outputs, concatenated, upsampled, multiplied or divided by a number,
    summed, or a BatchNorm's affine map of them) lists (neuron index, spikes per source spike) of the spikes it
    holds, None for analog values; ``counts`` (a rate of spike-valued inputs,
    when recording; or a sum of spike trains) the spike counts behind it;
    ``scale`` the number its spikes are multiplied by (1.0: the neurons' own
    values; None: a sum of spike trains, whose values are no spikes of one size);
    ``terms`` the parts of a value that mixes the input and spikes
    (:func:`_mixed_terms`), else None; ``t`` None (``shape`` given): such a value
    per step whose readers read only its terms (:meth:`SpikingGraph._split_read`)."""
    __slots__ = ("t", "seq", "sources", "counts", "scale", "terms", "_shape")

    def __init__(self, t, seq=False, sources=None, counts=None, scale=1.0, terms=None,
                 shape=None):
        self.t, self.seq, self.sources, self.counts = t, seq, sources, counts
        self.scale = scale
        self.terms = terms
        self._shape = shape  # with t None: a mixed value read by split convs only

    @property
    def shape(self):
        """The ANN's [B, C, H, W] shape of this value."""
        if self.t is None:
            return self._shape
        return self.t.shape[1:] if self.seq else self.t.shape


def _spike_counts(v):
    """The spike counts [B, C, H, W] behind a spike-valued per-step value ``v``:
    its ``counts`` where a sum set them (an element of a sum can hold two
    spikes, or none where two cancel), else its nonzero elements over the steps."""
    return v.counts if v.counts is not None else (v.t != 0).sum(0, dtype=torch.float32)


def _arith_spikes(kind, vals, record):
    """``(sources, counts, scale)`` of the value ``a <kind> b`` (``vals``) where it
    is spike-valued, else ``(None, None, 1.0)``. A spike train times (or divided
    by) a number c is still one event per spike: conv(c * s) is the conv with c
    folded into its weights on the spikes s, so SOPs, not MACs. A sum (or
    difference) of two spike trains of one shape drives a conv as both do,
    conv(a + b) = conv(a) + conv(b) (the bias once): the SOPs of the spikes of
    both (DESIGN: SOPs = spikes into a layer x fan-out), counted from the
    summed counts (a nonzero of the sum is not one spike)."""
    a, b = vals
    if kind in ("mul", "div"):
        v, c = (a, b) if isinstance(a, _Value) else (b, a)
        if v.sources is not None and _is_number(c) and not (kind == "div" and c == 0):
            scale = None if v.scale is None else v.scale * c if kind == "mul" else v.scale / c
            return v.sources, v.counts, scale
    elif all(isinstance(v, _Value) and v.sources is not None for v in vals) and \
            a.seq == b.seq and a.t.shape == b.t.shape:
        counts = _spike_counts(a) + _spike_counts(b) if record else None
        return a.sources + b.sources, counts, None
    return None, None, 1.0


def _pooled_spikes(v, info, record):
    """``(sources, counts, scale)`` of the average pooling (options ``info``) of
    ``v`` where it is spike-valued, else ``(None, None, 1.0)``. Where no two
    windows overlap (stride >= kernel) a spike lands in one window, and a conv
    reading the averages is a conv on the spikes (its weights / divisor spread
    over each window, its stride times the pooling's): one event per spike,
    whose SOPs conv_sops counts from the spikes summed per window. Overlapping
    windows: analog (a spike that reaches an output through two windows is one
    synapse there, not two)."""
    kernel = _pair(info["kernel_size"])
    stride = _pair(info.get("stride") or kernel)
    if v.sources is None or any(s < k for s, k in zip(stride, kernel)):
        return None, None, 1.0
    counts = None
    if record:
        sums = dict(info, divisor_override=1)
        counts = F.avg_pool2d(_spike_counts(v), **sums)
    return v.sources, counts, None


class SpikingGraph(_SpikingNet):
    """A converted :class:`GraphNet` (see the module docstring): takes and returns
    images like the ANN.

    Energy (``record_stats``, ``energy_mj``, :func:`spikingir.energy.snn_energy_mj`),
    the DESIGN's model extended to graphs: static convs (the input's analog
    current) count their MACs once (``first_layer_macs``); a per-step conv fed
    by spikes (neuron outputs, concatenated, nearest-upsampled, times or divided
    by a number, summed with other spikes, or averaged in windows that do not
    overlap: each spike one event, the numbers folded into the weights) counts
    the synaptic operations of the spikes of all steps (``sops``); a per-step
    conv of analog values (averages over overlapping windows, sums with
    per-step analog values) its MACs at every step (``analog_macs``); a conv
    of the input concatenated with (or added to, a 1-channel image broadcast
    over the channels too) spikes or per-step values, or of spikes plus a
    number, counts and computes each part as that conv split by hand would: the
    input's (the number's) once, the spikes' SOPs, the other channels' MACs at
    every step (:func:`_mixed_terms`);
    a read-out conv (computed once on rates) counts the SOPs of the spikes into
    it unless they were counted per step, and its MACs once with recycling (the
    chain's read-out rule) or when its input is analog (``readout_macs``). A
    BatchNorm that is not folded into a conv (its affine map, a 1x1 depthwise
    conv here) counts nothing, as in the ANN's count (:data:`_AFFINE`); one of
    spikes (after a ReLU) hands them on as spikes, its scale and shift folded
    into the convs that read them.

    ``use_spike_conv()``: per-step convs that read one neuron layer's spikes
    directly or times a number (folded into the weights with the spike sizes;
    groups=1, a kernel :func:`spikingir.ops.spike_conv2d` supports) run on it
    in inference (without autograd); the others stay dense, since sums and
    averages of spike trains are not spikes of one size. A neuron layer whose
    spikes only such convs read per step (the read-out takes spike counts)
    emits them as channel masks (:class:`~spikingir.ops.SpikeMasks`, as the
    chain's hidden layers do) when a fused spike_conv2d backend takes masks and
    no statistics are recorded: no float spike tensor is written and re-read.

    ``step_chunk = N`` (see :mod:`spikingir.models.spiking`) runs the neuron layers
    one after another, each over all steps, its input current (a conv of spikes,
    a sum with a skip, a concatenation, ...) made N steps at a time from the
    same steps of what it reads, its neurons continuing from the chunk before's
    potential (the MPRN reuse step ends the last chunk). Kept for all steps are
    the spikes of the neuron layers later layers read (until the last of those
    has run; in inference on masks as 1-bit masks, also those a skip reads as
    values, which get them back chunk by chunk, exact) and per-step values that
    several neuron layers' currents read; the read-out layers' spikes are summed
    over the steps as they come. The same spikes, statistics and final potentials
    as all steps at once; the output bit for bit where the read-out layers emit
    masks, up to float rounding otherwise; hooks run once per chunk. In inference
    on masks the hidden neuron layers keep no ``v_final`` then (memory, as the
    chain's). Measured: a 3-block width-32 residual net at 512 x 512, T=10
    (1 thread, peak RSS above the model): 1303 MiB all at once, 539 with N=4,
    351 with N=1."""

    def __init__(self, net: GraphNet, neurons, timesteps, neuron_kind="mprn", recycling=True):
        super().__init__(timesteps, neuron_kind, recycling)
        if not isinstance(net, GraphNet):
            raise TypeError(f"SpikingGraph: expected a GraphNet, got {type(net).__name__}")
        if len(neurons) != len(net.relus):
            raise ValueError(f"SpikingGraph: expected {len(net.relus)} neuron layers (one per "
                             f"ReLU), got {len(neurons)}")
        self.program = copy.deepcopy(net.program)
        self.layers = copy.deepcopy(net.layers)
        self.neurons_ = nn.ModuleList(neurons)
        self.in_channels = net.in_channels
        self.spike_conv = False
        self.spike_conv_backend = "auto"
        self.spike_masks = True
        self._structure = _Structure(self.program)

    def _ann_macs(self, x):
        """MACs of the ANN on ``x``, each conv at the size its input has there (after
        pooling, strides, upsampling; the base class's count takes every conv at
        the image's size), as the last recorded forward on an input of ``x``'s shape
        counted them (fine-tuning's validation records its forwards and reads it after each)."""
        shape, macs = getattr(self, "_ann_count", (None, None))
        if shape != tuple(x.shape):
            raise RuntimeError(f"SpikingGraph._ann_macs: run a forward with record_stats() on "
                               f"a {tuple(x.shape)} input first")
        return macs

    def extra_repr(self):
        return super().extra_repr() + (f", spike_conv=True, spike_conv_backend="
                                       f"{self.spike_conv_backend!r}" if self.spike_conv else "")

    def __setstate__(self, state):
        super().__setstate__(state)
        self._structure = _Structure(self.program)

    @property
    def mapper(self):
        """The read-out convs (run once on the rates), as a ModuleList: what
        ``param_groups(train_mapper=False)`` and fine-tuning's ``train_mapper``
        keep fixed, like a chain's pixel mapper."""
        st = self._structure
        return nn.ModuleList(self.layers[n] for n in st.order
                             if n in st.rate and n not in st.seq and st.ops[n][1] == "conv")

    def use_spike_conv(self, on=True, backend="auto", masks=True):
        """See the class docstring; ``masks=False``: the spikes go over as float
        tensors. Returns ``self``."""
        self.spike_conv = bool(on)
        self.spike_masks = bool(masks)
        self.spike_conv_backend = backend
        return self

    def kept_spike_conv(self):
        """Restores the :meth:`use_spike_conv` setting on exit."""
        return SpikingChain.kept_spike_conv(self)

    def _spike_conv_layer(self, conv):
        """Whether ``conv`` runs on spike_conv2d when it reads one layer's spikes."""
        return (self.spike_conv and not torch.is_grad_enabled() and type(conv) is nn.Conv2d
                and spike_conv_supports(conv) and not _has_hooks(conv))

    def _on_spike_conv(self, conv, value):
        # one layer's spikes, or those times a number (folded into the weights with
        # the spike sizes by _conv_spikes); not a sum of spike trains (scale None)
        return (value.sources is not None and len(value.sources) == 1
                and value.sources[0][1] == 1.0 and value.scale is not None
                and self._spike_conv_layer(conv))

    def _masks_allowed(self, neuron, cur):
        """The chain's conditions for a neuron layer (input current ``cur``) to emit
        channel masks (SpikingChain.forward): inference on spike_conv2d with masks,
        nothing recorded or hooked, a fused dtype and a masks backend."""
        return (self.spike_conv and self.spike_masks and not torch.is_grad_enabled()
                and not self._record and not self._track_energy and not _has_hooks(neuron)
                and cur.dtype in ops.backends.FUSED_DTYPES
                and ops.backends.choose("spike_conv2d_masks", cur.device, torch.float32,
                                        self.spike_conv_backend) != "torch")

    def _emits_masks(self, name, neuron, cur):
        """Whether neuron layer ``name`` (input current ``cur``) emits channel masks:
        every per-step reader of its spikes takes masks (:meth:`_reads_masks`: a conv
        on spike_conv2d reading them directly, or the input concatenated with them
        read by such convs only), and :meth:`_masks_allowed`."""
        return (all(self._reads_masks(r, name) for r in self._structure.seq_readers[name])
                and self._masks_allowed(neuron, cur))

    def _reads_masks(self, r, name):
        """Whether node ``r``, a per-step reader of neuron layer ``name``'s spikes,
        takes them as masks: a conv on spike_conv2d reading them directly, or a
        concatenation of them with a static node (the input mixed with spikes, so
        its spikes are a term: :func:`_mixed_terms`) that only split convs on
        spike_conv2d read: it is not made (:meth:`_split_read`), and each conv
        runs the spikes' channels on spike_conv2d (:meth:`_split_conv`)."""
        st = self._structure
        _, kind, args, _ = st.ops[r]
        if kind == "conv":
            return args[0].name == name and self._spike_conv_layer(self.layers[r])
        return (kind == "cat" and any(a.name in st.static for a in args[0])
                and self._split_read(r)
                and all(self._spike_conv_layer(self.layers[c]) for c in st.seq_readers[r]))

    def _packs(self, neuron, cur):
        """Whether a neuron layer (input current ``cur``) whose spikes are kept for
        later layers, but read as values, keeps them as channel masks with
        ``step_chunk``: :meth:`_masks_allowed`, and spikes of the neuron's own
        values (theta, beta), which its readers get back."""
        return neuron.scale_output and self._masks_allowed(neuron, cur)

    def _count_terms(self, conv, v, steps, rate_mode, in_seq, sop_terms, spike_totals,
                     first_chunk=True):
        """``forward``'s count of ``conv`` on a value ``v`` that mixes the input and
        spikes (:func:`_mixed_terms`): what the network with the conv split by hand
        (by input-channel group and by term) counts. One input channel of the
        conv costs ``macs / Cin`` MACs (each feeds Cout/groups outputs at every
        tap); static channels count theirs once (``first_layer_macs``), spike terms
        their SOPs (``conv_sops`` on their counts in their channels, the other
        channels' zero) and the energy estimate's terms, analog channels their
        MACs at every step; in the read-out (rates, once) analog channels and,
        with recycling, spike channels their MACs once (the chain's read-out
        rule). A conv run per step and again in the read-out counts the static
        part and the spikes per step only, as a static conv is counted once.
        ``first_chunk`` False (with ``step_chunk``, the chunks after the first):
        the static part (computed once) and the energy estimate's terms (the
        spike totals are all steps') were counted with the first chunk."""
        once = not (rate_mode and in_seq)
        spikes = [(lo, hi, u) for lo, hi, _, kind, u in v.terms if kind == "spikes"]
        if self._track_energy and once and first_chunk:
            fan = _mean_fanout(conv)
            sop_terms.extend(spike_totals[i] * (k * fan) for _, _, u in spikes
                             for i, k in u.sources)
        if not self._record:
            return
        with torch.no_grad():
            per = _layer_macs(conv, v.shape) // conv.in_channels  # MACs of one input channel

            def width(kind):  # the channels terms of this kind cover (a sum's overlap)
                return len({c for lo, hi, _, k, _ in v.terms if k == kind for c in range(lo, hi)})

            if spikes and once:
                counts = conv.weight.new_zeros(v.shape, dtype=torch.float32)
                for lo, hi, u in spikes:
                    counts[:, lo:hi] += u.counts if rate_mode else _spike_counts(u)
                self.stats["sops"] += _layer_sops(conv, counts)
            if once and first_chunk:  # the static conv's input channels (_static_groups)
                full, wide = _static_groups(v.terms)
                # a broadcast channel is one input channel per group it reaches (a
                # grouped conv, run whole, has no weights to sum across its groups)
                g = conv.in_channels // conv.groups
                self.stats["first_layer_macs"] += per * (
                    len({c for lo, hi, *_ in full for c in range(lo, hi)})
                    + sum(len({c // g for c in range(lo, hi)}) for lo, hi in wide))
            if not rate_mode:
                self.stats["analog_macs"] += per * width("analog") * steps
            else:
                self.stats["readout_macs"] += per * (width("analog") +
                                                     (width("spikes") if self.recycling else 0))

    def _splits(self, conv):
        """Whether a per-step conv of a value that mixes the input and spikes runs
        split (:meth:`_split_conv`): a Conv2d of one group without hooks (a hooked
        conv is called on its whole input, which its hooks see)."""
        return type(conv) is nn.Conv2d and conv.groups == 1 and not _has_hooks(conv)

    def _split_read(self, name):
        """Whether per step node ``name``, a value that mixes the input and spikes
        (:func:`_mixed_terms`), is read only by convs that run split
        (:meth:`_splits`): they read its terms, so the value itself ([steps, B,
        C, H, W], the static parts repeated over the steps) is not made (a
        :class:`_Value` of its terms and shape only; the read-out makes its own
        from the rates)."""
        st = self._structure
        readers = st.seq_readers[name]
        return bool(readers) and all(st.ops[r][1] == "conv" and self._splits(self.layers[r])
                                     for r in readers)

    def _split_conv(self, conv, v, T):
        """``conv`` of the per-step value ``v`` that mixes the input and spikes
        (:func:`_mixed_terms`), computed as it is counted: by linearity,
        conv(cat(x, h)) = conv_x(x) + conv_h(h) (the weights split by input
        channel) and conv(x + h) = conv(x) + conv(h), the bias once. The static
        terms' part is computed once, with the bias, on their channels only
        (summed in float64 on the CPU, as :meth:`_input_current` sums the input
        current); the others per step on their channels only: one layer's spikes
        (times a number) on spike_conv2d where a conv of them alone would run
        there (:meth:`_on_spike_conv`), the rest dense. The same value as the
        conv of the whole input up to float32 rounding (a sum in another order),
        that of the network with the conv split by hand bit for bit. ``T``: the
        IF steps ``v`` holds (a chunk's with ``step_chunk``)."""
        b = conv.bias

        def w(a, z):  # the weights of input channels a:z (a view)
            return conv.weight[:, a:z]

        full, wide = _static_groups(v.terms)
        xs, ws = [], []  # the static conv's inputs and their weights
        if full:
            lo, hi = min(t[0] for t in full), max(t[1] for t in full)
            if len(full) == 1 and full[0][2] == 1.0:
                xs.append(full[0][4].t)
            else:  # several static terms (a sum, or channels apart): their sum, zeros between
                xs.append(full[0][4].t.new_zeros((v.shape[0], hi - lo, *v.shape[2:])))
                for a, z, c, _, u in full:
                    xs[0][:, a - lo:z - lo] += u.t * c
            ws.append(w(lo, hi))
        for (a, z), group in wide.items():  # one channel, the weights of a:z summed
            one = (v.shape[0], 1, *v.shape[2:])
            xs.append(sum(conv.weight.new_full(one, c) if u is None else u.t * c
                          for _, _, c, _, u in group))
            ws.append(w(a, z).sum(1, keepdim=True))
        cur = None  # the static part, [B, Cout, H', W']
        if xs:
            cur = self._static_current(xs[0] if len(xs) == 1 else torch.cat(xs, 1),
                                       ws[0] if len(ws) == 1 else torch.cat(ws, 1), b, conv)
        out = None  # the per-step part, [steps, B, Cout, H', W']
        for a, z, c, kind, u in v.terms:
            if kind == "static":
                continue
            bias = b if cur is None and out is None else None  # the bias once
            if kind == "spikes" and self._on_spike_conv(conv, u):
                # the conv of these channels (what _conv_spikes reads of a conv)
                part = SimpleNamespace(weight=w(a, z), bias=bias, stride=conv.stride,
                                       padding=conv.padding, kernel_size=conv.kernel_size,
                                       out_channels=conv.out_channels)
                s = u.t if isinstance(u.t, ops.SpikeMasks) else (u.t != 0).to(u.t.dtype)
                y = SpikingChain._conv_spikes(self, part, s, self.neurons_[u.sources[0][0]],
                                              T, scale=u.scale * c)
            else:
                t = u.t if c == 1.0 else u.t * c
                y = F.conv2d(t.flatten(0, 1), w(a, z), bias, conv.stride, conv.padding,
                             conv.dilation).unflatten(0, t.shape[:2])
            out = y if out is None else out.add_(y)
        # in place: a fresh [steps, B, C, H, W] is paid in page faults on the CPU (a
        # conv's backward does not read its output, so autograd allows it)
        return out if cur is None else out.add_(cur)

    @staticmethod
    def _static_current(x, weight, bias, conv):
        """F.conv2d of the static ``x`` (``conv``'s geometry, ``weight`` and ``bias``),
        summed in float64 and rounded once in CPU float32 inference, as
        :meth:`_input_current` sums the input current (the same whatever the
        image's size, so tiles give what the whole image gives)."""
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(),
                            conv.stride, conv.padding, conv.dilation).float()
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)

    def forward(self, x):
        c = self.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or (c is not None and x.shape[1] != c):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SpikingGraph: input must be [B, {c if c is not None else 'C'}, H, "
                             f"W], got {got}")
        st, S, T = self._structure, self.steps, self.timesteps
        record, track = self._record, self._track_energy
        if record:
            self.stats = {"first_layer_macs": 0, "sops": 0, "readout_macs": 0, "analog_macs": 0,
                          "layers": []}
        ann_shapes = {}  # conv node -> its input's [B, C, H, W] (the ANN's MACs)
        sop_terms = []  # differentiable SOP estimate (track_energy)
        spike_totals = {}
        seq_env, ys, v_final = {}, {}, {}
        chunks = self._chunks()  # one, (T, steps), without step_chunk or when it is >= T
        Tc, chunk_k = T, 0  # the IF steps run now (a chunk's with step_chunk), the chunk

        def count_conv(name, conv, v, steps, rate_mode):
            if st.ops[name][3] == _AFFINE:  # a BatchNorm's map: no conv of the ANN (_AFFINE)
                return
            ann_shapes[name] = v.shape
            if v.terms is not None:  # the input mixed with spikes: counted split (_mixed_terms)
                return self._count_terms(conv, v, steps, rate_mode, name in st.seq, sop_terms,
                                         spike_totals, first_chunk=chunk_k == 0)
            in_seq = name in st.seq
            spiky = v.sources is not None
            if track and spiky and not (rate_mode and in_seq) and chunk_k == 0:
                # (spike_totals hold all steps' spikes: a conv counts them once, not per chunk)
                fan = _mean_fanout(conv)
                sop_terms.extend(spike_totals[i] * (k * fan) for i, k in v.sources)
            if not record:
                return
            with torch.no_grad():
                macs = _layer_macs(conv, v.shape)
                if name in st.static:
                    self.stats["first_layer_macs"] += macs
                elif not rate_mode:
                    if spiky:
                        counts = _spike_counts(v)  # spikes per neuron
                        self.stats["sops"] += _layer_sops(conv, counts)
                    else:
                        self.stats["analog_macs"] += macs * steps
                else:
                    if spiky and not in_seq:
                        self.stats["sops"] += _layer_sops(conv, v.counts)
                    if self.recycling or not spiky:
                        self.stats["readout_macs"] += macs

        def run(name, env, rate_mode):
            _, kind, args, info = st.ops[name]
            vals = _resolve(args, env)
            if kind in ("shape", "item", "size_arith"):
                return _size_op(kind, vals, info, lambda v: v.shape)
            info = _resolve(info, env)
            tensors = [v for v in (vals[0] if kind == "cat" else vals) if isinstance(v, _Value)]
            seq = any(v.seq for v in tensors)
            if kind == "conv":
                v, conv = vals[0], self.layers[name]
                count_conv(name, conv, v, S, rate_mode)
                if name in st.static and type(conv) is nn.Conv2d:
                    return _Value(self._input_current(v.t, conv))
                if seq and self._on_spike_conv(conv, v):
                    i = v.sources[0][0]
                    neuron = self.neurons_[i]
                    s = v.t if isinstance(v.t, ops.SpikeMasks) else (v.t != 0).to(v.t.dtype)
                    t = SpikingChain._conv_spikes(self, conv, s, neuron, Tc, scale=v.scale)
                elif seq and v.terms is not None and self._splits(conv):
                    return _Value(self._split_conv(conv, v, Tc), True)
                else:
                    t = conv(v.t.flatten(0, 1)).unflatten(0, v.t.shape[:2]) if seq else conv(v.t)
                if info == _AFFINE and v.sources is not None:
                    # a BatchNorm's a * s + b of spikes (a ReLU then a BatchNorm): one event
                    # per spike for the convs that read it, a folded into their weights and
                    # b into their biases (_AFFINE), as a number times spikes; the counts are
                    # the spikes' (b makes the zeros nonzero). Read as analog, the next conv
                    # counted its MACs at every step (conv-ReLU-BN, 16 wide, 32x32, T=10:
                    # 9.9x the ANN's energy, 0.36x counted as spikes, as without the BatchNorm).
                    # On spike_conv2d too (a 1-channel BatchNorm is a conv of one group): its
                    # readers counted analog MACs at every step there, SOPs without it
                    counts = (_spike_counts(v) if seq else v.counts) if record else None
                    return _Value(t, seq, v.sources, counts, None)
                return _Value(t, seq)
            if kind == "cat":
                spiky = all(v.sources is not None for v in vals[0])
                terms = None if spiky else _mixed_terms(kind, vals, _static_refs(args[0], st))
                if seq and terms is not None and self._split_read(name):
                    v = vals[0][0]
                    return _Value(None, True, terms=terms, shape=torch.Size(
                        (v.shape[0], sum(u.shape[1] for u in vals[0]), *v.shape[2:])))
                parts = [v.t.unsqueeze(0).expand(S, *v.t.shape) if seq and not v.seq else v.t
                         for v in vals[0]]
                t = torch.cat(parts, 2 if seq else 1)
                sources = [s for v in vals[0] for s in v.sources] if spiky else None
                # per step, a summed part's counts (the others' are read from the spikes)
                counts = (torch.cat([_spike_counts(v) for v in vals[0]], 1) if spiky and record
                          and (rate_mode or any(v.counts is not None for v in vals[0])) else None)
                scales = {v.scale for v in vals[0]}
                return _Value(t, seq, sources, counts, scales.pop() if len(scales) == 1 else None,
                              terms)
            if kind == "upsample":
                v = vals[0]
                flat = v.t.flatten(0, 1) if seq else v.t
                t = _upsample(flat, info)
                area = (t.shape[-2] * t.shape[-1]) / (flat.shape[-2] * flat.shape[-1])
                t = t.unflatten(0, v.t.shape[:2]) if seq else t
                sources = None if v.sources is None else [(i, k * area) for i, k in v.sources]
                counts = (_upsample(v.counts, info) if v.counts is not None else None)
                return _Value(t, seq, sources, counts, v.scale)
            if kind == "avgpool":
                v = vals[0]
                t = F.avg_pool2d(v.t.flatten(0, 1) if seq else v.t, **info)
                return _Value(t.unflatten(0, v.t.shape[:2]) if seq else t, seq,
                              *_pooled_spikes(v, info, record))
            # + - * /: a static [B, C, H, W] broadcasts over the steps of a sequence
            spikes = _arith_spikes(kind, vals, record)
            terms = None if spikes[0] is not None else _mixed_terms(kind, vals,
                                                                    _static_refs(args, st))
            if seq and terms is not None and self._split_read(name):
                return _Value(None, True, terms=terms, shape=torch.broadcast_shapes(
                    *(v.shape for v in vals if isinstance(v, _Value))))
            a, b = (v.t if isinstance(v, _Value) else v for v in vals)
            return _Value(_apply(kind, None, (a, b), None), seq, *spikes, terms)

        def run_chunks():
            """Step 1 with step_chunk, layer-major (_ChunkPlan): the static nodes once,
            then each neuron layer over the chunks (the MPRN reuse step ends the last),
            from the potential the chunk before left, on its current made one chunk at a
            time; the spikes later layers read are kept per chunk until the last of them
            has run that chunk (SpikeMasks where the layer emits masks). The read-out
            layers' spikes are summed over the steps (_spike_sum) into ``ys``; returns
            their spike counts when recording. Statistics are integers summed over the
            chunks (a conv's SOPs, a layer's spikes), the energy estimate's spike totals
            are the chunks' sums: the same as all steps at once."""
            nonlocal S, Tc, chunk_k
            plan = getattr(st, "chunk_plan", None) or _ChunkPlan(st)
            st.chunk_plan = plan
            for name in st.order:
                if st.ops[name][1] == "input":
                    seq_env[name] = _Value(x)
                elif name in st.static:
                    seq_env[name] = run(name, seq_env, False)
            kept, counts = {}, {}  # kept value -> its chunks; read-out layer -> spike counts
            packed = {}  # neuron layer kept as masks for readers of its values -> their dtype

            def kept_chunk(d):
                val = kept[d][chunk_k]
                if d in packed:  # the values the neuron would have emitted
                    neuron = self.neurons_[st.ops[d][3]]
                    val = _Value(_values_of_masks(val.t, neuron, Tc, packed[d]), True, val.sources)
                return val

            for r in st.relus:
                i = st.ops[r][3]
                neuron, src = self.neurons_[i], st.ops[r][2][0].name
                v = emit = layer = None
                for chunk_k, (Tc, S) in enumerate(chunks):
                    env = dict(seq_env)  # the static values, and this chunk of the kept ones
                    env.update((d, kept_chunk(d)) for d in plan.reads[r]
                               if d in kept and kept[d][chunk_k] is not None)
                    for n in plan.compute[r]:
                        if n not in env:
                            env[n] = run(n, env, False)
                            if n in plan.shared:
                                kept.setdefault(n, [None] * len(chunks))[chunk_k] = env[n]
                        for d in st.deps(n):
                            if plan.last_in[r][d] == n:
                                env.pop(d, None)
                    cur = env.pop(src)
                    env = None
                    cur = cur.t if cur.seq else cur.t.unsqueeze(0).expand(S, *cur.t.shape)
                    if emit is None:  # decided once: every chunk hands its spikes over in one form
                        emit = "masks" if self._emits_masks(r, neuron, cur) else "values"
                        if emit == "values" and r in plan.last and self._packs(neuron, cur):
                            # kept for all steps: 1 bit per spike, not a float; its readers
                            # get the values back chunk by chunk (exact: theta or beta)
                            emit, packed[r] = "masks", cur.dtype
                    vf = []
                    y = self._neuron(neuron, cur, Tc, v, v_final_out=vf, emit=emit)
                    v, cur = vf.pop(), None
                    for d in plan.reads[r]:
                        if plan.last[d] == r:  # this chunk of it is spent
                            kept[d][chunk_k] = None
                    if r in plan.last:  # read per step by later neuron layers
                        kept.setdefault(r, [None] * len(chunks))[chunk_k] = \
                            _Value(y, True, [(i, 1.0)])
                    if track:
                        part = self._spike_total(neuron, y, Tc)
                        spike_totals[i] = part if chunk_k == 0 else spike_totals[i] + part
                    if record:
                        with torch.no_grad():
                            if layer is None:
                                layer = {"name": r, "spikes": 0, "neurons": y.shape[1:].numel(),
                                         "firing_rate": 0.0}
                                self.stats["layers"].append(layer)
                            layer["spikes"] += int((y != 0).sum(dtype=torch.float64).item())
                            layer["firing_rate"] = layer["spikes"] / (layer["neurons"] * T)
                            if r in st.readout:
                                part = (y != 0).sum(0, dtype=torch.float32)
                                counts[i] = part if chunk_k == 0 else counts[i] + part
                    if r in st.readout:
                        ys[i] = self._spike_sum(y, Tc, ys.get(i))
                    y = None
                if r in st.readout:
                    v_final[i] = v
                elif emit == "masks" and not neuron.stateful:
                    # as the chain's hidden layers in masks inference: a potential per
                    # neuron layer kept as state was memory no later layer could use
                    neuron.v_final = None
            S, Tc, chunk_k = self.steps, T, 0
            return counts

        read_counts = run_chunks() if len(chunks) > 1 else None
        # 1. per step: the neurons, in graph order, and what they read
        for name in (st.order if read_counts is None else ()):
            kind = st.ops[name][1]
            if kind == "input":
                seq_env[name] = _Value(x)
            elif kind == "relu":
                i = st.ops[name][3]
                neuron = self.neurons_[i]
                cur = seq_env[st.ops[name][2][0].name]
                cur = cur.t if cur.seq else cur.t.unsqueeze(0).expand(S, *cur.t.shape)
                out = []
                emit = "masks" if self._emits_masks(name, neuron, cur) else "values"
                y = neuron(cur, emit=emit, v_final_out=out)
                cur = None
                if name in st.keep:
                    ys[i], v_final[i] = y, out[0]
                seq_env[name] = _Value(y, True, [(i, 1.0)])
                if track:
                    spike_totals[i] = self._spike_total(neuron, y)
                if record:
                    with torch.no_grad():
                        n_spikes = int((y != 0).sum(dtype=torch.float64).item())
                        neurons = y.shape[1:].numel()
                        self.stats["layers"].append({
                            "name": name, "spikes": n_spikes, "neurons": neurons,
                            "firing_rate": n_spikes / (neurons * T)})
            elif name in st.seq or name in st.static:
                seq_env[name] = run(name, seq_env, False)
            for d in st.deps(name):
                if st.last_read.get(d) == name and d not in st.keep:
                    seq_env.pop(d, None)
        # 2. the read-out, once, on the rates of the neurons whose spikes reach the output
        rate_env = {n: seq_env[n] for n in st.static if n in seq_env}
        for name in st.readout:
            i = st.ops[name][3]
            counts = (((ys[i] != 0).sum(0, dtype=torch.float32) if read_counts is None
                       else read_counts[i]) if record else None)
            rate_env[name] = _Value(self._rate(self.neurons_[i], ys[i], v_final[i]),
                                    sources=[(i, 1.0)], counts=counts)
        for name in st.order:
            if name in st.rate and name not in rate_env and st.ops[name][1] != "output":
                rate_env[name] = run(name, rate_env, True)
        out = rate_env[st.output].t
        self._release_graph()
        # the ANN's MACs on this input, each conv at its input's size (pooled, strided or
        # upsampled on the way); recorded, what _ann_macs answers for an input of this shape
        ann = sum(_layer_macs(self.layers[n], s) for n, s in ann_shapes.items()) \
            if record or track else None
        if record:
            self._ann_count = (tuple(x.shape), ann)
        if track:  # the SOP part of the SNN/ANN energy ratio, differentiable in the spikes
            self.energy_ratio = sum(sop_terms, x.new_zeros(())) * (E_SOP_PJ / (E_MAC_PJ * ann))
        return out


def _static_refs(args, st):
    """Per argument of a cat (its list) or of + - * / (``args``): whether it is a
    static node of ``st`` (a number is not)."""
    return [isinstance(a, _Ref) and a.name in st.static for a in args]


def _terms_of(v, static, lo=0):
    """``v`` (a node's value; ``static``: the node is static) as the terms of
    :func:`_mixed_terms`, its channels from ``lo``."""
    if v.terms is not None:
        return [(a + lo, z + lo, c, k, u) for a, z, c, k, u in v.terms]
    kind = "static" if static else "spikes" if v.sources is not None else "analog"
    return [(lo, lo + v.shape[1], 1.0, kind, v)]


def _operand_terms(v, static, shape):
    """An operand ``v`` of a sum of ``shape`` [B, C, H, W] (``static``: its node is
    static) as terms (:func:`_mixed_terms`), else None where its broadcast does
    not split by channel. A number c is a static term c times 1s over all C
    channels, and a static 1-channel image over the C channels a static term
    over them (value None for the number's 1s; :func:`_static_groups` computes
    both on one channel): by linearity conv(h + c) = conv(h) + conv(c * 1), and
    conv(c * 1) is static, a constant input current (with zero padding it is no
    per-channel constant near the borders, so a map, not a bias)."""
    if _is_number(v):
        return [(0, shape[1], float(v), "static", None)]
    if v.shape == shape:
        return _terms_of(v, static)
    if static and v.terms is None and v.shape[1] == 1 and v.shape[0] == shape[0] and \
            v.shape[2:] == shape[2:]:
        return [(0, shape[1], 1.0, "static", v)]
    return None


def _static_groups(terms):
    """The static terms of a mixed value (:func:`_mixed_terms`) as the inputs of
    its static conv: ``(full, wide)``, ``full`` the terms whose value has all
    their channels (summed into one input, zeros between), ``wide`` {(lo, hi):
    terms} the 1-channel ones broadcast over channels lo:hi (a number's 1s, a
    1-channel image), those over the same channels summed into one input
    channel read by the weights of lo:hi summed over their input channels:
    conv_w(x broadcast over C) = conv_{sum_c w_c}(x), one channel's MACs, as
    the network with the conv split by hand (a conv of the 1-channel image)."""
    full, wide = [], {}
    for t in terms:
        if t[3] != "static":
            continue
        if t[4] is not None and t[4].shape[1] == t[1] - t[0]:
            full.append(t)
        else:
            wide.setdefault(t[:2], []).append(t)
    return full, wide


def _mixed_terms(kind, vals, static):
    """The terms of the value ``<kind>(vals)`` (a cat of ``vals[0]``, or ``a <kind>
    b``; ``static``: per value, whether its node is static) where it mixes the
    input (static values) with spikes or with analog per-step values, else None.

    A conv is linear in its input channels and in the terms of a sum:
    conv(cat(x, h)) = conv_x(x) + conv_h(h) (its weights split by input-channel
    group, the bias once) and conv(x + h) = conv(x) + conv(h). A conv of such a
    value is counted (:meth:`SpikingGraph._count_terms`) and computed
    (:meth:`SpikingGraph._split_conv`) as the network with the conv split by
    hand: the static part once (the input current; MACs once, the first
    layer's rule), spikes as spikes (SOPs), the other analog channels per step
    (MACs every step); read as a whole it was analog, MACs at every step over
    all its channels (found: 97 % of the recorded energy of the test's OddOps
    net at 64x64, T=4, where the image is concatenated with spikes).

    A number added to spikes and a 1-channel static image added to spikes of C
    channels are static terms too (:func:`_operand_terms`): conv(h + c) =
    conv(h) + conv(c * 1), the constant's part a static map (found: spikes
    plus a number, or plus a broadcast image, were analog MACs at every step).

    Terms: a list of ``(lo, hi, coef, kind, value)``, ``coef`` times ``value``
    (a node's :class:`_Value`; None: 1s) in input channels ``lo:hi`` (a static
    1-channel value broadcast over them: :func:`_static_groups`), ``kind`` "static",
    "spikes" or "analog"; terms over the same channels add up. Only static and
    spike terms are summed: a sum with an analog per-step value is analog (a
    conv of it costs its MACs at every step whatever is added to it, the input
    and spikes at no further MAC), so analog terms, from concatenations only,
    have their channels to themselves."""
    if kind == "cat":
        terms, lo = [], 0
        for v, s in zip(vals[0], static):
            terms += _terms_of(v, s, lo)
            lo += v.shape[1]
    elif kind in ("add", "sub"):
        try:  # the sum's shape (the ANN's broadcast); an error is _apply's to raise
            shape = torch.broadcast_shapes(*(v.shape for v in vals if isinstance(v, _Value)))
        except RuntimeError:
            return None
        parts = [_operand_terms(v, s, shape) for v, s in zip(vals, static)]
        if None in parts:
            return None  # a broadcast other than a static image's one channel
        sign = -1.0 if kind == "sub" else 1.0
        terms = parts[0] + [(lo, hi, sign * c, k, u) for lo, hi, c, k, u in parts[1]]
        if any(t[3] == "analog" for t in terms):
            return None
    else:  # * or / by a number (the builder refuses two tensors): the coefficients
        (v, c), div = ((vals[0], vals[1]) if isinstance(vals[0], _Value) else
                       (vals[1], vals[0])), kind == "div"
        if v.terms is None or not _is_number(c) or (div and c == 0):
            return None
        return [(lo, hi, k / c if div else k * c, kd, u) for lo, hi, k, kd, u in v.terms]
    kinds = {t[3] for t in terms}
    if kinds in ({"analog"}, {"static"}, {"spikes"}):
        return None  # all analog, all static (a static node) or all spikes (spike-valued)
    return terms
