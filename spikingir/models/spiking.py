"""Spiking versions of the restoration networks, built by spikingir.convert.

Both take and return images like their ANN. The first convolution sees the
image, an analog constant current, so it is computed once and fed to the first
neurons at every step. Hidden convolutions run on the spikes of all steps at
once (``[T*B, ...]`` batches; N steps at a time with ``step_chunk``). With MPRN
neurons the network runs T + 1 steps (T IF steps and the reuse step) and rates
are averaged over T.

The read-out is ``Mapper(rate)`` where ``rate`` is the last spiking layer's
spike rate plus the recycled residual potential, kept >= 0 as ``readout_clamp``
says (spikingir.nn.mapper.spike_rate; "rate" for new conversions, "residual" for
files saved before 2026-11-29, which keep their published figures). Since the
mapper is linear, ``Mapper(mean_t y[t]) = mean_t Mapper(y[t])`` up to its bias,
which is added once.

Several threads can run one network at once, each on its own input: a forward
reads the final potentials of its own neurons' runs (their ``v_final_out``), not
the ``v_final`` attributes another thread's call may have set in between. Not
with stateful neurons, ``record_stats`` or ``track_energy``, whose state is the
module's (one network per thread there).

After a forward the neurons' ``v_final`` hold values without the autograd
graph (a stateful neuron's is left as it is): the graph lives as long as the output.

``step_chunk = N`` runs each layer's T steps in chunks of N: the layers still
run one after another, each over all steps, but a layer computes its conv's
currents for steps [k, k + N) only, runs its neurons on them from the potential
the chunk before left (the neurons' ``v0``), and hands their spikes to the next
layer, which reads every step's (the MPRN reuse step ends the last chunk). Alive
are then N (+1) steps' currents, one potential, the spikes of the layer before
and of this one (SpikeMasks in inference: 1/32 of a float step each; float
spikes otherwise) instead of T (+1) steps' currents: less memory at every T
(see the README for figures). The same spikes, potentials and statistics
(integers) as all at once; the output bit for bit when the last layer emits
masks (the shipped denoising SNNs with ``for_inference``: spike counts are
summed, exact), up to float rounding otherwise (the read-out's sum of spike
values over the steps is summed per chunk: ~1e-7). Hooks run once per chunk, on
its steps. ``energy_ratio`` is the sum of the chunks' (up to rounding); with
autograd the gradients are the unchunked ones up to that rounding, but the graph
keeps every chunk's tensors.

``record_stats()`` turns on counting of spikes and synaptic operations (for
firing rates and energy); ``stats`` then holds them for the last forward.
``track_energy()`` makes each forward also leave ``energy_ratio``: a
differentiable estimate of the SOP part of the SNN/ANN energy ratio (spikes
times their fan-out, x 0.9 pJ, over the ANN's MACs x 4.6 pJ), for fine-tuning
with an energy term (surrogate gradients flow through the spike counts).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from spikingir import ops
from spikingir.ops.masks import _BYTE_LOW_BITS
from spikingir.ops.spike_conv import conv_out_hw, supports as spike_conv_supports
from spikingir.energy import (E_MAC_PJ, E_SOP_PJ, _window_sops, conv_call_macs, conv_mean_fanout,
                              conv_sops, snn_energy_mj)
from spikingir.nn import IFNeuron, MPRNeuron, SeqToBatch
from spikingir.nn.mapper import PixelMapper, spike_rate
from spikingir.models.chain import skip


def make_neuron(kind, theta, *, num_channels=None, v_init="zero", backend="auto",
                surrogate="sigmoid", alpha=4.0, reuse_alpha=0.75):
    """An IF or MPR neuron with threshold ``theta`` (float or [C] tensor), a
    scale-free surrogate (alpha / theta) and trainable threshold (and beta)."""
    kw = dict(num_channels=num_channels, v_init=v_init, backend=backend, surrogate=surrogate,
              alpha=alpha, scale_free_surrogate=True)
    if kind == "if":
        return IFNeuron(theta, **kw)
    if kind == "mprn":
        return MPRNeuron(theta, reuse_alpha=reuse_alpha, **kw)
    raise ValueError(f"neuron: expected 'if' or 'mprn', got {kind!r}")


def _per_channel(size):
    """A scalar, or a [C] per-channel value shaped [C, 1, 1] to broadcast over [.., C, H, W]."""
    return size.reshape(-1, 1, 1) if size.dim() == 1 else size


def _inside(n_in, n_out, k, pad, stride):
    """Outputs along one axis whose window (size ``k``) lies inside the unpadded input."""
    lo = -(-pad // stride)  # first i with i * stride - pad >= 0
    hi = min(n_out - 1, (n_in - k + pad) // stride)  # last with i * stride - pad + k <= n_in
    return max(0, hi - lo + 1)


def _has_hooks(module, backward=False):
    """Whether calling ``module`` would run forward hooks (its own or global ones);
    with ``backward``, or backward hooks."""
    from torch.nn.modules import module as m
    hooks = [module._forward_hooks, module._forward_pre_hooks, m._global_forward_hooks,
             m._global_forward_pre_hooks]
    if backward:
        hooks += [module._backward_hooks, module._backward_pre_hooks, m._global_backward_hooks,
                  m._global_backward_pre_hooks]
    return any(hooks)


class _MaskCounts:
    """Spikes per neuron of SpikeMasks summed over their steps, chunk by chunk, in
    little memory: the read-out's spike counts (:meth:`_SpikingNet._spike_sum`).

    Held as 8 int64 "lanes" [B, H, W, words], as ``SpikeMasks.counts`` makes them
    (``ops.masks._bit_planes``): byte q of lane j's word k counts channel
    64 k + 8 q + j, at most 255 steps (then they are added into float32
    ``floats``). A chunk adds each lane's sum over its steps in place: a byte per
    neuron (1/4 of a float step) alive across the chunks, and 1/32 of a chunk's
    float steps (C = 64) per lane while it is made. ``counts()`` turns the lanes
    into float32 counts, contiguous [B, C, H, W] (as the sum over the steps
    was): one new step, no other temporaries. Before, every chunk made float32
    counts (the 8 lanes as floats, then stacked: ~2 steps) and added them into a
    float32 sum: with N=1 the peak of the s25 SNN's forward (benchmarks/RESULTS.md).
    ``reuse``: the MPRN reuse step's masks, the last chunk's (counted at the
    read-out). The same integers. With the in-place rate (``spike_rate``'s
    ``in_place``), the s25 SNN at 1000 x 1000, T=10 (peak RSS above the model,
    fresh process, 1 thread): N=1 1922 -> 1211 MiB, N=4 2500 -> 1783, all steps
    3263 -> 3264 (its peak is elsewhere); outputs bit for bit."""

    __slots__ = ("lanes", "steps", "floats", "channels", "reuse")

    def __init__(self, channels):
        self.lanes, self.steps, self.floats, self.reuse = None, 0, None, None
        self.channels = channels

    def add(self, masks):
        """Adds the counts of ``masks`` [steps, B, C, H, W] (IF steps)."""
        for bits in masks.bits.split(255, 0):  # a byte lane holds up to 255
            if self.steps + bits.shape[0] > 255:
                self.floats = self.counts()
                self.lanes, self.steps = None, 0
            bits = bits.contiguous()
            lanes = self.lanes or []
            for j in range(8):  # one lane's temporary at a time
                lane = ((bits >> j) & _BYTE_LOW_BITS).sum(0)
                if len(lanes) > j:
                    lanes[j] += lane
                else:
                    lanes.append(lane)
            self.lanes = lanes
            self.steps += bits.shape[0]

    def counts(self):
        """Float32 counts [B, C, H, W] (contiguous) of everything added."""
        if self.lanes is None:
            return self.floats
        out = _lane_counts(self.lanes, self.channels)
        return out if self.floats is None else out.add_(self.floats)


def _lane_counts(lanes, C):
    """Float32 counts [B, C, H, W], contiguous, of ``C`` channels from 8 byte lanes
    (see :class:`_MaskCounts`): lane j's bytes are channels j, j + 8, ..., each
    copied into its channels (uint8 to float32, straight into the output)."""
    B, H, W, _ = lanes[0].shape
    out = torch.empty(B, C, H, W, device=lanes[0].device)
    for j, lane in enumerate(lanes):
        k = len(range(j, C, 8))
        if k:
            out[:, j::8].copy_(lane.view(torch.uint8).movedim(-1, 1)[:, :k])
    return out


class _SpikingNet(nn.Module):
    """Shared machinery: steps, neuron state, recycling, statistics."""

    def __init__(self, timesteps, neuron_kind, recycling):
        super().__init__()
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps: expected an int >= 1, got {timesteps!r}")
        self.timesteps = timesteps
        self.neuron_kind = neuron_kind
        self.recycling = recycling
        #: spikingir.nn.mapper.spike_rate's clamp (snn_config saves it)
        self.readout_clamp = "rate"
        self._record = False
        self.stats = None
        self._track_energy = False
        self.energy_ratio = None
        self.step_chunk = None
        #: what :func:`spikingir.pipeline.save_snn` records besides the state
        #: (``to_snn`` sets ``ann_fingerprint``; ``load_snn`` the file's record)
        self.meta = {}

    @property
    def step_chunk(self):
        """Steps per chunk (see the module docstring), or None: all T at once."""
        return self.__dict__.get("_step_chunk")  # networks pickled before it: None

    @step_chunk.setter
    def step_chunk(self, n):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"step_chunk: expected None or an int >= 1, got {n!r}")
        self._step_chunk = n

    def _chunks(self):
        """The chunks of a forward as (IF steps, steps) pairs: the T IF steps in
        chunks of ``step_chunk`` (the last one shorter when N does not divide T),
        and the MPRN reuse step, which follows the T IF steps, at the end of the
        last chunk. One chunk, (T, steps), without ``step_chunk`` or when it is >= T."""
        T, n = self.timesteps, self.step_chunk or self.timesteps
        sizes = [min(n, T - k) for k in range(0, T, n)]
        return [(t, t) for t in sizes[:-1]] + [(sizes[-1], sizes[-1] + self.steps - T)]

    def _neuron(self, neuron, x, T, v0, **kwargs):
        """``neuron`` on one chunk: ``x`` holds T IF steps (and the reuse step after
        them when it has more), started from ``v0``, the potential the chunk before
        left (None: the neuron's own start)."""
        if isinstance(neuron, MPRNeuron):
            kwargs["reuse_step"] = x.shape[0] > T
        return neuron(x, v0=v0, **kwargs)

    @property
    def steps(self):
        """Simulated steps: T, plus the reuse step with MPRN neurons."""
        return self.timesteps + (1 if self.neuron_kind == "mprn" else 0)

    def record_stats(self, on=True):
        self._record = on
        return self

    def track_energy(self, on=True):
        """Each forward leaves ``energy_ratio`` (differentiable; see the module
        docstring), or None when off. Returns ``self``."""
        self._track_energy = bool(on)
        self.energy_ratio = None
        return self

    def extra_repr(self):
        chunk = "" if self.step_chunk is None else f", step_chunk={self.step_chunk}"
        return (f"timesteps={self.timesteps}, neuron_kind={self.neuron_kind!r}, "
                f"recycling={self.recycling}, readout_clamp={self.readout_clamp!r}{chunk}")

    def _spike_total(self, neuron, y, T=None):
        """Spikes of one layer over all its neurons and steps, a differentiable
        scalar: ``y`` holds T IF steps (default: the network's; and the reuse step
        when it has more), ``theta * s`` (IF steps) and ``beta * s`` (reuse
        step) when the neuron scales its output, else ``s``. Each channel's
        values are summed first and then divided by that channel's spike size:
        the same value and gradients as dividing every element, without
        [T, B, C, H, W] temporaries (measured: a CPU fine-tuning step with the
        energy term 1.6x faster in bf16, 1.3x in fp32; benchmarks/RESULTS.md)."""
        if not neuron.scale_output:
            return y.sum().float()

        T = self.timesteps if T is None else T
        theta = neuron.effective_theta()
        # Sums per step (and channel, for per-channel sizes): slicing this small
        # tensor keeps slice gradients off the [steps, B, C, H, W] one. Summed in
        # y's dtype (bf16 under autocast accumulates in float32; casting y first
        # copied it).
        sums = y.sum((1, 3, 4) if theta.dim() == 1 else (1, 2, 3, 4)).float()
        total = (sums[:T].sum(0) / theta).sum()
        if y.shape[0] > T:  # MPRN reuse step: spikes of size beta (none where beta = 0)
            beta = neuron.beta
            safe = torch.where(beta != 0, beta, torch.ones_like(beta))
            total = total + torch.where(beta != 0, sums[T] / safe, 0.0).sum()
        return total

    def __getstate__(self):
        # energy_ratio is still in the last forward's autograd graph: copy.deepcopy
        # (and pickle, AveragedModel) of a non-leaf tensor fails.
        state = super().__getstate__()
        if isinstance(state.get("energy_ratio"), torch.Tensor):
            state = dict(state, energy_ratio=state["energy_ratio"].detach())
        return state

    def _ann_macs(self, x):
        """MACs of the ANN on ``x``: every conv once, at full density (each conv
        of DnCNN and AOD-Net sees the image's height and width)."""
        B, _, H, W = x.shape
        return sum(conv_call_macs(c, B, H, W)[0] for c in self.modules()
                   if isinstance(c, nn.Conv2d))

    def _v0(self, neuron, like):
        if neuron.v_init != "half":
            return None
        return (_per_channel(neuron.effective_theta()) / 2).expand(like.shape)

    @staticmethod
    def _spike_sum(y, T, acc=None):
        """``acc`` plus the spikes ``y`` of one chunk (T IF steps, and the reuse
        step when it has more) summed over its steps, what the read-out needs of
        them: SpikeMasks as their counts (a :class:`_MaskCounts`, added to in
        place: masks are inference only; integers, exact in float32: the chunks
        add up to the whole run's bit for bit), values as their sum [1, B, C, H, W]
        (one chunk: the sum of all steps at once)."""
        if isinstance(y, ops.SpikeMasks):
            acc = _MaskCounts(y.shape[2]) if acc is None else acc
            acc.add(y[:T])
            acc.reuse = y[T:] if y.shape[0] > T else None  # the reuse step is the last chunk's
            return acc
        part = y.sum(0, keepdim=True)
        return part if acc is None else acc + part

    def _rate(self, neuron, total, v_final):
        """The read-out rate of ``neuron``'s spikes ``total`` (those of all steps, a
        tensor or SpikeMasks, or their sum from :meth:`_spike_sum`) and final
        potential ``v_final`` (that call's, see the module docstring on threads)."""
        if isinstance(total, ops.SpikeMasks):
            total = self._spike_sum(total, self.timesteps)
        in_place = isinstance(total, _MaskCounts)
        if in_place:
            # the values the neuron would have emitted, summed over the steps:
            # theta per IF-step spike, beta per reuse-step spike. In place (the
            # counts are this call's, inference only), the lanes dropped once
            # counted: with step chunks the read-out is the forward's memory peak
            counts, reuse = total.counts(), total.reuse
            total.lanes = total.floats = total.reuse = None
            total = counts.mul_(_per_channel(neuron.effective_theta()))
            if reuse is not None:
                once = _MaskCounts(reuse.shape[2])
                once.add(reuse)
                total += once.counts().mul_(_per_channel(neuron.beta))
            del reuse
            # counts are float32; the emitted values would have the layer's dtype
            total = total.unsqueeze(0).to(neuron.theta.dtype)  # one "step" holding the sum
        return spike_rate(total, v_final, self._v0(neuron, v_final), self.timesteps,
                          self.recycling, self.readout_clamp, in_place=in_place)

    def _release_graph(self):
        """Called once the read-out has used the neurons' ``v_final``: each keeps
        its value without the forward's autograd graph (``out`` holds what the
        read-out needs). Kept in the graph by a module attribute, the last
        layer's ``v_final`` held every tensor the forward saved for backward
        beyond ``out``'s life: a forward with autograd on and no backward (an
        evaluation without ``torch.no_grad()``) kept them until the next forward
        replaced it (the s25 SNN, 128x128 at T=4: 340 MiB). A stateful neuron
        keeps its state as it is (its next call starts from it; see
        ``detach_state``)."""
        for n in self.neurons():
            v = n.v_final  # read once: another thread's call may set it to None meanwhile
            if not n.stateful and v is not None:
                n.v_final = v.detach()

    def _input_current(self, x, conv=None):
        """``conv1(x)`` (or ``conv(x)``), the constant analog input current of every step. In CPU
        float32 inference it is summed in float64 and rounded once: oneDNN's float32
        sums differ by an ulp with the input's size (its blocking), and a potential
        that lands on a threshold then flips a spike, so a tile of an image would not
        give what the whole image gives (README, tiled restore). Rounded once, the
        current is the same whatever the size. Cost: 12 ms instead of 2.8 ms for a
        256 x 256 DnCNN input, whose SNN forward (T=10) takes ~2.9 s (AVX2 EPYC, 2 threads)."""
        c = self.conv1 if conv is None else conv
        if (x.device.type == "cpu" and x.dtype == torch.float32 and c.padding_mode == "zeros"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not _has_hooks(c)):  # a hooked conv1 (conv_macs, profilers) is called
            bias = None if c.bias is None else c.bias.double()
            return F.conv2d(x.double(), c.weight.double(), bias, c.stride, c.padding, c.dilation,
                            c.groups).float()
        return c(x)

    def _start_stats(self, x, first_conv):
        if self._track_energy:
            self.energy_ratio = x.new_zeros(())
            self._energy_norm = E_SOP_PJ / (E_MAC_PJ * self._ann_macs(x))
        if self._record:
            macs = conv_call_macs(first_conv, x.shape[0], *x.shape[2:])[0]
            self.stats = {"first_layer_macs": macs, "sops": 0, "readout_macs": 0,
                          "layers": []}

    def _count(self, name, neuron, y, targets, T=None):
        """Spikes of one layer (all steps of a chunk: T IF steps, default the
        network's, and the reuse step when ``y`` has more) and the SOPs they cause
        in ``targets`` (list of (conv, channel slice) they feed); a layer's later
        chunks add to its first's entry."""
        if self._track_energy:
            spikes = self._spike_total(neuron, y, T)
            fan = sum(conv_mean_fanout(conv) for conv, _ in targets)  # SOPs per interior spike
            self.energy_ratio = self.energy_ratio + spikes * fan * self._energy_norm
        if not self._record:
            return
        with torch.no_grad():
            if all(conv.groups == 1 for conv, _ in targets):
                # a conv of one group counts the spikes summed over its input
                # channels (conv_sops): per pixel over all steps and this layer's
                # channels, int64, is all it takes. The same integers as from the
                # per-neuron counts, which took 19 % of `spikingir demo`'s recorded
                # DnCNN forwards (unpacked, copied into each target's channels, cast
                # to float64; 3.5 s there, now 0.7 s, 1 thread).
                per_pixel = (y.pixel_counts(0) if isinstance(y, ops.SpikeMasks)
                             else (y != 0).sum((0, 2))).unsqueeze(1)  # [B, 1, H, W]
                n_spikes = int(per_pixel.sum())
                sops = sum(_window_sops(conv, per_pixel) for conv, _ in targets)
            else:
                if isinstance(y, ops.SpikeMasks):  # spikes per neuron over all steps
                    counts = y.counts(0)
                else:
                    counts = (y != 0).sum(0, dtype=torch.float32)
                # counts per neuron are exact in float32, their total is not: float32
                # holds every integer only up to 2^24 (16.8M), which one DnCNN layer of a
                # 512 x 512 image passes at T=10 (off by a few spikes); sum in float64
                n_spikes = int(counts.sum(dtype=torch.float64).item())
                sops = 0
                for conv, sl in targets:
                    full = counts.new_zeros(counts.shape[0], conv.in_channels, *counts.shape[2:])
                    full[:, sl] = counts
                    sops += conv_sops(conv, full)
            neurons = y.shape[1:].numel()  # [B, C, H, W]
            self.stats["sops"] += sops
            layer = next((e for e in self.stats["layers"] if e["name"] == name), None)
            if layer is None:
                layer = {"name": name, "spikes": 0, "neurons": neurons, "firing_rate": 0.0,
                         "sops": 0}
                self.stats["layers"].append(layer)
            layer["spikes"] += n_spikes
            layer["sops"] += sops  # integers: the same totals whatever the chunks
            layer["firing_rate"] = layer["spikes"] / (neurons * self.timesteps)

    def _finish_stats(self, readout_conv, rate_shape):
        if self._record and self.recycling:
            # the recycled residual is an analog input to the mapper: count its MACs
            self.stats["readout_macs"] = conv_call_macs(readout_conv, rate_shape[0],
                                                        *rate_shape[2:])[0]

    def energy_mj(self):
        """Energy of the last recorded forward (the paper's model): first-layer
        and read-out MACs x 4.6 pJ + SOPs x 0.9 pJ."""
        if self.stats is None:
            raise RuntimeError("energy_mj: run a forward after record_stats() first")
        st = self.stats
        return snn_energy_mj(st["first_layer_macs"] + st["readout_macs"] + st.get("offset_macs", 0)
                             + st.get("analog_macs", 0), st["sops"])

    def firing_rate(self):
        """Mean firing rate (spikes per neuron per step, over T) of the last recorded forward."""
        if self.stats is None:
            raise RuntimeError("firing_rate: run a forward after record_stats() first")
        st = self.stats
        spikes = sum(layer["spikes"] for layer in st["layers"])
        neurons = sum(layer["neurons"] for layer in st["layers"])
        return spikes / (neurons * self.timesteps)

    def neurons(self):
        return [m for m in self.modules() if isinstance(m, (IFNeuron, MPRNeuron))]

    def param_groups(self, lr_weights, lr_neurons, train_mapper=True):
        """Optimiser groups for fine-tuning: conv weights (incl. the mapper) at
        ``lr_weights``, thresholds and beta at ``lr_neurons``. With
        ``train_mapper=False`` the pixel mapper stays as it is (its parameters stop
        requiring grad): after ``to_snn`` the ANN's output conv, the "without
        mapper" ablation, unless layer calibration ``"weights"`` refitted it."""
        for p in self.mapper.parameters():
            p.requires_grad_(train_mapper)
        neuron_params = [p for n in self.neurons() for p in n.parameters()]
        ids = {id(p) for p in neuron_params}
        if not train_mapper:
            ids |= {id(p) for p in self.mapper.parameters()}
        weights = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": weights, "lr": lr_weights}, {"params": neuron_params, "lr": lr_neurons}]


class SpikingChain(_SpikingNet):
    """Converted conv chain (:class:`~spikingir.models.ConvChain`): convs[0]
    (analog, once) -> [neuron -> conv] x (len(convs) - 2) -> neuron -> pixel
    mapper (a copy of convs[-1]); output ``mapper(rate)``, or with ``residual``
    ``input - mapper(rate)``. Any stride, padding or kernel the ANN's convs
    have; hidden convs that :func:`spikingir.ops.spike_conv2d` supports (square
    kernels 1/3/5/7, stride 1 or 2, no dilation) can run on it."""

    def __init__(self, convs, neurons, timesteps, neuron_kind="mprn", recycling=True,
                 residual=False):
        super().__init__(timesteps, neuron_kind, recycling)
        if len(convs) < 2 or len(neurons) != len(convs) - 1:
            raise ValueError(f"{type(self).__name__}: expected one neuron layer between "
                             f"consecutive convs, got {len(convs)} convs and {len(neurons)} neurons")
        self.residual = bool(residual)
        self.conv1 = convs[0]
        self.hidden = nn.ModuleList(SeqToBatch(c) for c in convs[1:-1])
        self.neurons_ = nn.ModuleList(neurons)
        self.mapper = PixelMapper(convs[-1])
        self.spike_conv = False
        self.spike_conv_backend = "auto"
        self.spike_masks = True

    def extra_repr(self):
        on = (f", spike_conv=True, spike_conv_backend={self.spike_conv_backend!r}, "
              f"spike_masks={self.spike_masks}") if self.spike_conv else ""
        return super().extra_repr() + f", residual={self.residual}" + on

    def convs(self):
        """The convolutions in the ANN's order: conv1, the hidden ones, the mapper's."""
        return [self.conv1] + [h.module for h in self.hidden] + [self.mapper.conv]

    def _ann_macs(self, x):
        """MACs of the ANN on ``x``, each conv at the size its input has."""
        B, _, H, W = x.shape
        total = 0
        for c in self.convs():
            macs, H, W = conv_call_macs(c, B, H, W)
            total += macs
        return total

    def use_spike_conv(self, on=True, backend="auto", masks=True):
        """Run the hidden convolutions with :func:`spikingir.ops.spike_conv2d` on
        the binary spikes (neurons then emit ``s`` instead of ``theta * s`` and
        each threshold is folded into the weights of the conv it feeds:
        ``conv(theta s) = (w theta) * s + b``). Same outputs up to float32
        rounding, same parameters and state dict. With ``masks``, without
        autograd (inference) and a fused spike_conv2d backend for masks (on a
        GPU ``auto`` picks Triton, or cuDNN without Triton), the neurons hand the spikes
        over as channel bit masks (:class:`~spikingir.ops.SpikeMasks`; the same
        result), else as float tensors; the hidden neurons then keep no ``v_final``
        after a forward (only the read-out layer's is needed; memory). A hidden conv
        that spike_conv2d does not support (see the class docstring) stays dense, and
        so does one with forward hooks (on it or its ``SeqToBatch``; global ones too),
        or backward hooks when autograd is on: it is called as a module, on the
        ``theta * s`` values, so its hooks run and see what they see without
        spike_conv2d. Returns ``self``."""
        self.spike_conv = bool(on)
        self.spike_masks = bool(masks)
        self.spike_conv_backend = backend
        for neuron, h in zip(self.neurons_, self.hidden):
            neuron.scale_output = not self._on_spike_conv(h.module)
        return self

    @contextlib.contextmanager
    def kept_spike_conv(self):
        """Restores the :meth:`use_spike_conv` setting on exit (for code that
        switches it for a while: calibration, bf16 evaluation)."""
        state = (self.spike_conv, self.spike_conv_backend, self.spike_masks)
        try:
            yield self
        finally:
            self.use_spike_conv(*state)

    def _on_spike_conv(self, conv):
        """Whether ``conv`` (a hidden one) runs on spike_conv2d."""
        return self.spike_conv and spike_conv_supports(conv)

    def _spike_values(self, neuron, s, T):
        """The values ``neuron`` would emit with ``scale_output`` for its 0/1 spikes
        ``s`` [steps, B, C, H, W] (T IF steps, then the reuse step when it has more):
        theta per IF-step spike, beta per reuse-step one, in ``s``'s dtype (bf16 under
        autocast, as the neuron's would be)."""
        theta = _per_channel(neuron.effective_theta())
        if s.shape[0] > T:  # MPRN reuse step
            return torch.cat([s[:T] * theta, s[T:] * _per_channel(neuron.beta)]).to(s.dtype)
        return (s * theta).to(s.dtype)

    @staticmethod
    def _conv_buffer(conv, s, steps, buf=None):
        """A float32 buffer [steps, B, C_out, H', W'] for ``conv``'s output on the
        spikes ``s`` (SpikeMasks [., B, C, H, W]) on ``conv``'s device: ``buf`` when it
        is one (reused), else a new one."""
        B = s.shape[1]
        shape = (steps, B, conv.out_channels,
                 *conv_out_hw(*s.shape[3:], *conv.kernel_size, conv.stride[0], conv.padding[0]))
        if buf is not None and buf.shape == shape and buf.dtype == torch.float32 and \
                buf.is_contiguous() and buf.device == conv.weight.device:
            return buf
        return torch.empty(shape, device=conv.weight.device)

    def _conv_spikes(self, conv, s, neuron, T, buf=None, scale=1.0):
        """``conv`` of the binary spikes ``s`` [steps, B, C, H, W] (a tensor or
        SpikeMasks) of ``neuron``: its T IF steps carry ``theta`` per spike, the MPRN
        reuse step (a step after them) ``beta``. SpikeMasks input (inference) writes
        into the first steps of ``buf`` (a :meth:`_conv_buffer` with at least as
        many steps; see ``forward``), or a new tensor without one. ``scale``: the
        spikes multiplied by that number (a graph's ``0.5 * h``), spikes of size
        ``scale * theta`` (``scale * beta``), folded into the weights like theta."""
        def folded(size):  # w[:, c] * size[c]
            return conv.weight * _per_channel(size)

        def run(spikes, size, bias):
            return ops.spike_conv2d(spikes.flatten(0, 1), folded(size), bias, conv.stride[0],
                                    conv.padding[0], validate=False,
                                    backend=self.spike_conv_backend).unflatten(0, spikes.shape[:2])

        theta, beta = neuron.effective_theta(), getattr(neuron, "beta", None)
        if scale != 1.0:
            theta = theta * scale
            beta = None if beta is None else beta * scale
        if isinstance(s, ops.SpikeMasks):
            steps, B = s.shape[:2]
            st, pad = conv.stride[0], conv.padding[0]
            if buf is None:  # (by name: SpikingGraph borrows this method)
                buf = SpikingChain._conv_buffer(conv, s, steps)
            y = buf[:steps].flatten(0, 1)  # contiguous: the first steps of a contiguous buffer
            # MPRN: two weight sets written into one output, the IF steps (theta)
            # and the reuse step (beta); no correction pass, no concatenation
            parts = ((s[:T], theta, y[:T * B]),) + \
                (((s[T:], beta, y[T * B:]),) if steps > T else ())
            for spikes, size, out in parts:
                ops.spike_conv2d(spikes.flatten(0, 1), folded(size), conv.bias, st, pad,
                                 validate=False, backend=self.spike_conv_backend, out=out)
            return y.unflatten(0, (steps, B))
        y = run(s, theta, conv.bias)  # every step as if its spikes had size theta
        if s.shape[0] > T:
            # reuse step: spikes of size beta = theta + (beta - theta); adding the
            # difference in place avoids concatenating two outputs (measured on
            # the CPU: the torch.cat cost 9 % of the SNN's time)
            y[T:] += run(s[T:], beta - theta, None)
        return y

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"{type(self).__name__}: input must be [B, {self.conv1.in_channels}, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        self._start_stats(x, self.conv1)
        current = self._input_current(x)
        # Inference with spike_conv2d: the hidden neurons emit channel masks
        # (1 bit per spike) that spike_conv2d reads directly (no float spikes);
        # only when a fused kernel would take them: the reference (cuDNN /
        # oneDNN) would unpack them again.
        # The fused kernels compute in float32: a float64 network (.double()) runs
        # on float spikes, through the reference in float64.
        masks = (self.spike_conv and self.spike_masks and not torch.is_grad_enabled()
                 and not self._track_energy and current.dtype in ops.backends.FUSED_DTYPES
                 and ops.backends.choose("spike_conv2d_masks", x.device, torch.float32,
                                         self.spike_conv_backend) != "torch")
        grad = torch.is_grad_enabled()  # backward hooks run only with a backward
        # How each hidden conv runs: on spike_conv2d, and fused (the neurons'
        # spikes straight in) unless hooked: a hooked one is called as a module,
        # so its hooks run. Decided once per forward, so that every chunk of a
        # layer hands its spikes over in one form.
        on_spikes = [self._on_spike_conv(h.module) for h in self.hidden]
        fused = [on and not (_has_hooks(h, grad) or _has_hooks(h.module, grad))
                 for on, h in zip(on_spikes, self.hidden)]
        chunks = self._chunks()  # the same in every layer: chunk k's spikes feed chunk k
        room = max(steps for _, steps in chunks)
        # With masks, a hidden conv's output is read only by the next neurons,
        # which are done with it before the conv writes again: one buffer of the
        # largest chunk's steps serves every chunk and every layer of its shape. A
        # fresh [steps, B, C, H, W] tensor per conv call is paid again in page
        # faults on the CPU, where glibc maps tensors this large anew each time
        # (measured: benchmarks/RESULTS.md). Not once a hook was handed it (it may
        # keep it: collected activations would all be overwritten by the last
        # layer's); conv1's current is never in it.
        # The last neurons emit masks too: the read-out needs only their spike
        # counts, not a float [steps, B, C, H, W] of spikes beside that buffer.
        buf = None
        spikes = None  # the layer before's spikes, one entry per chunk (SpikeMasks or tensors)
        for i, neuron in enumerate(self.neurons_):
            last = i == len(self.hidden)
            emit = "masks" if masks and (last or fused[i]) else "values"
            nxt = self.mapper.conv if last else self.hidden[i].module
            v = None  # the potential the chunk before left: this layer's only
            out, total = [], None  # this layer's spikes per chunk; the last layer's sum
            for k, (T, steps) in enumerate(chunks):
                if i == 0:  # the same current every step (a view of conv1's)
                    cur = current.unsqueeze(0).expand(steps, *current.shape)
                else:
                    s, spikes[k] = spikes[k], None  # freed once read (unless a hook kept it)
                    if fused[i - 1] and isinstance(s, ops.SpikeMasks):
                        buf = self._conv_buffer(self.hidden[i - 1].module, s, room, buf)
                        cur = self._conv_spikes(self.hidden[i - 1].module, s, self.neurons_[i - 1],
                                                T, buf)
                    elif fused[i - 1]:
                        cur = self._conv_spikes(self.hidden[i - 1].module, s, self.neurons_[i - 1],
                                                T)
                    else:  # 0/1 spikes (scale_output off for spike_conv2d) back to theta * s
                        cur = self.hidden[i - 1](self._spike_values(self.neurons_[i - 1], s, T)
                                                 if on_spikes[i - 1] else s)
                    del s
                vf = []
                y = self._neuron(neuron, cur, T, v, v_final_out=vf, emit=emit)
                v = vf.pop()  # (not kept by vf into the next layer's conv)
                if buf is not None and (_has_hooks(neuron) or (last and k + 1 == len(chunks))):
                    # its hooks were handed the buffer (they may keep it), or it is spent:
                    # freed before the read-out's spike counts are made, not beside them
                    buf = None
                del cur
                self._count(f"neuron{i + 1}", neuron, y, [(nxt, slice(None))], T)
                if last:
                    total = self._spike_sum(y, T, total)
                else:
                    out.append(y)
                del y
            if i == 0:
                del current  # conv1's current is spent
            if masks and not last and not neuron.stateful:
                # one [B, C, H, W] per hidden layer kept as state was the largest
                # memory left after the forward (16 of them: 1.2 GB per 512x512 tile)
                neuron.v_final = None
            spikes = out
        # (The last neurons' input, the conv buffer, was freed once spent, not at
        # return: it is not beside the read-out's temporaries; the s25 SNN, 256x256,
        # T=10: peak RSS ~350 -> ~235 MiB above the model's.)
        del spikes, out
        rate = self._rate(self.neurons_[-1], total, v)
        self._release_graph()
        self._finish_stats(self.mapper.conv, tuple(rate.shape))
        out = self.mapper(rate)
        return skip(x, out) if self.residual else out


class SpikingDnCNN(SpikingChain):
    """Converted DnCNN: conv1 (analog, once) -> [neuron -> conv] x (depth - 2)
    -> neuron -> pixel mapper; output = input - mapper(rate)."""

    def __init__(self, convs, neurons, timesteps, neuron_kind="mprn", recycling=True):
        super().__init__(convs, neurons, timesteps, neuron_kind, recycling, residual=True)


class SpikingAODNet(_SpikingNet):
    """Converted AOD-Net: spiking x1..x4 (x1 from the analog conv1), K = ReLU(
    mapper(rates of x1..x4)) with conv5 as the mapper, J = ReLU(K I - K + 1).

    ``offset`` ([12]: x1..x4's channels in mapper-input order, default zeros):
    per-channel DC offsets ``m`` taken out of the spike code. AOD-Net's live
    channels never reach zero (x3 lies in ~[0.26, 0.58]), so most of their
    spikes would encode a constant. With offsets, the neurons of channel c
    code ``x_c - m_c`` (the producing conv's bias was lowered by ``m_c`` at
    conversion), and every conv that reads the spikes adds back
    ``conv(m)``, the constant image ``m`` convolved with its weights and zero
    padding: a bias inside the image, exact at the border too. That map does not
    depend on the input (computed here per forward, it is a per-resolution
    constant); the energy counts its MACs in the border band, where it differs
    from a bias, for every image."""

    def __init__(self, convs, neurons, timesteps, neuron_kind="mprn", recycling=True, offset=None):
        super().__init__(timesteps, neuron_kind, recycling)
        if len(convs) != 5 or len(neurons) != 4:
            raise ValueError("SpikingAODNet: expected 5 convs and 4 neuron layers")
        self.conv1 = convs[0]
        self.conv2, self.conv3, self.conv4 = (SeqToBatch(c) for c in convs[1:4])
        self.neurons_ = nn.ModuleList(neurons)
        self.mapper = PixelMapper(convs[4])
        n_in = self.mapper.conv.in_channels
        offset = torch.zeros(n_in) if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        if offset.shape != (n_in,) or not bool((offset >= 0).all()):
            raise ValueError(f"SpikingAODNet: offset must be [{n_in}] values >= 0, got {offset}")
        self.register_buffer("offset", offset.clone())

    def _offset_map(self, conv, sl, shape):
        """``conv`` (no bias) of the constant image of offsets ``offset[sl]``
        (zero padded) for inputs of ``shape`` [B, C, H, W]: [1, C_out, H', W'],
        or None without offsets. Counts the MACs of its border band (for each
        of the B images) when recording."""
        hw = shape[-2:]
        m = self.offset[sl]
        nonzero = int(torch.count_nonzero(m))
        if nonzero == 0:
            return None
        const = m.to(conv.weight.dtype).view(1, -1, 1, 1).expand(1, m.numel(), *hw)
        out = F.conv2d(const, conv.weight, None, conv.stride, conv.padding)
        if self._record:
            ky, kx = conv.kernel_size
            inner = (_inside(hw[0], out.shape[-2], ky, conv.padding[0], conv.stride[0])
                     * _inside(hw[1], out.shape[-1], kx, conv.padding[1], conv.stride[1]))
            border = out.shape[-2] * out.shape[-1] - inner
            self.stats["offset_macs"] += shape[0] * border * conv.out_channels * nonzero * ky * kx
        return out

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SpikingAODNet: input must be [B, 3, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        self._start_stats(x, self.conv1)
        if self._record:
            self.stats["offset_macs"] = 0
        n1, n2, n3, n4 = self.neurons_
        c2, c3, c4, c5 = (self.conv2.module, self.conv3.module, self.conv4.module,
                          self.mapper.conv)
        def add_offsets(cur, shift):  # cur + conv(m) (same map for every step and image)
            return cur if shift is None else cur + shift

        c1 = self._input_current(x)
        # conv(m) of the convs that read the spikes: once, whatever the chunks
        s2, s3, s4 = (self._offset_map(conv, sl, x.shape) for conv, sl in
                      ((c2, slice(0, 3)), (c3, slice(0, 6)), (c4, slice(3, 9))))
        chunks = self._chunks()  # the same in every layer: chunk k's spikes feed chunk k

        def layer(name, neuron, current, targets, keep=True):
            """``neuron`` over the chunks, each from the potential the one before
            left, on ``current(k, steps)``: (its spikes per chunk (None unless
            ``keep``), their sum over the steps (_spike_sum), its final potential)."""
            v, ys, total = None, [], None
            for k, (T, steps) in enumerate(chunks):
                vf = []  # this call's potential (the module docstring on threads)
                y = self._neuron(neuron, current(k, steps), T, v, v_final_out=vf)
                v = vf[0]
                self._count(name, neuron, y, targets, T)
                total = self._spike_sum(y, T, total)
                if keep:
                    ys.append(y)
            return (ys if keep else None), total, v

        # x1..x3 are read by several later convs: their spikes of every chunk are
        # kept until the last of these has run; only each conv's currents come a
        # chunk at a time
        y1, t1, v1 = layer("x1", n1, lambda k, steps: c1.unsqueeze(0).expand(steps, *c1.shape),
                           [(c2, slice(0, 3)), (c3, slice(0, 3)), (c5, slice(0, 3))])
        c1 = None  # spent (each name is freed once its last reader has run)
        y2, t2, v2 = layer("x2", n2, lambda k, _: add_offsets(self.conv2(y1[k]), s2),
                           [(c3, slice(3, 6)), (c4, slice(0, 3)), (c5, slice(3, 6))])
        y3, t3, v3 = layer("x3", n3, lambda k, _: add_offsets(
            self.conv3(torch.cat([y1[k], y2[k]], 2)), s3), [(c4, slice(3, 6)), (c5, slice(6, 9))])
        y1 = None
        _, t4, v4 = layer("x4", n4, lambda k, _: add_offsets(
            self.conv4(torch.cat([y2[k], y3[k]], 2)), s4), [(c5, slice(9, 12))], keep=False)
        y2 = y3 = None
        totals, v = (t1, t2, t3, t4), (v1, v2, v3, v4)
        rates = torch.cat([self._rate(n, t, vf) for n, t, vf in zip(self.neurons_, totals, v)], 1)
        self._release_graph()
        self._finish_stats(self.mapper.conv, tuple(rates.shape))
        k = torch.relu(add_offsets(self.mapper(rates), self._offset_map(c5, slice(0, 12), x.shape)))
        return torch.relu(k * x - k + 1.0)
