"""Converting your own CNN with skips, concatenations and functional ReLUs
(spikingir.models.graph, through torch.fx) with to_snn: the canonical form,
the spiking network's outputs, gradients, energy and the refusals."""
import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from spikingir.convert import to_snn
from spikingir.energy import conv_call_macs, snn_energy_mj
from spikingir.models import Residual
from spikingir.models.graph import GraphNet, SpikingGraph, graph_net
from spikingir.models.spiking import SpikingChain

from helpers import chunked_backward, dyadic_network_, randomise_bn, ran_ops

torch.set_num_threads(1)


class PlainChain(nn.Module):
    """A conv chain written as a module with functional ReLUs: x - c3(...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 1, 3, padding=1)
        randomise_bn(self)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = torch.relu(self.bn(self.c2(h)))
        return x - self.c3(h)

    def as_chain(self):
        return Residual(nn.Sequential(self.c1, nn.ReLU(), self.c2, self.bn, nn.ReLU(), self.c3))


class ResBlocks(nn.Module):
    """Residual blocks (EDSR style, a BN folded into one conv) and a global skip."""

    def __init__(self, w=8):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(1, w, 3, padding=1)
        self.a1, self.b1 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.Conv2d(w, w, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.a2, self.b2 = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w, 1)
        self.tail = nn.Conv2d(w, 1, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        randomise_bn(self)

    def forward(self, x):
        h = self.head(x).relu()
        h = F.relu(h + self.b1(F.relu(self.bn1(self.a1(h)))))
        h = F.relu(h + 0.5 * self.b2(self.drop(torch.relu(self.a2(h)))))
        return x - self.tail(h)


class TinyUNet(nn.Module):
    """Average pooling (module and function), nearest upsampling (a module, and
    F.interpolate to a size read from a shape), a transposed conv,
    concatenations, in-place ReLUs, and an analog branch in the read-out."""

    def __init__(self, w=6):
        super().__init__()
        torch.manual_seed(0)
        self.e1 = nn.Conv2d(1, w, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.e2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.t = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.d1 = nn.Conv2d(4 * w, w, 3, padding=1)
        self.out, self.smooth = nn.Conv2d(w, 1, 1), nn.Conv2d(w, 1, 3, padding=1)
        self.r = nn.ReLU(inplace=True)

    def forward(self, x):
        e1 = self.r(self.e1(x))
        e2 = self.r(self.e2(self.pool(e1)))
        u = torch.cat([self.up(e2), F.relu(self.t(e2))], dim=1)
        d = self.r(self.d1(torch.cat([e1, u], 1)))
        coarse = F.interpolate(F.avg_pool2d(d, 2), size=d.shape[-2:])
        return x - self.out(d) / 2 - self.smooth(coarse)


class OddOps(nn.Module):
    """A grouped conv, a BatchNorm after a sum (its own affine layer), the input
    concatenated with spikes, arithmetic with numbers and a trailing ReLU."""

    def __init__(self, w=8):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, w, 3, padding=1)
        self.g = nn.Conv2d(w, w, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(w)
        self.c2 = nn.Conv2d(w + 1, w, 3, padding="same")
        self.c3 = nn.Conv2d(w, 1, 3, padding=1)
        randomise_bn(self)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.bn(h + self.g(h)), inplace=True)
        h = torch.relu(self.c2(torch.cat((x, h), dim=1)) * 0.5 - 0.01)
        return F.relu(1.0 - x + self.c3(h) / 4)


def images(n=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 1, size, size, generator=g) for _ in range(n)]


@pytest.mark.parametrize("make", [PlainChain, ResBlocks, TinyUNet, OddOps])
def test_graph_form_computes_the_network(make):
    ann = make().eval()
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    net = graph_net(ann)
    assert isinstance(net, GraphNet) and net.in_channels == 1
    x = torch.rand(2, 1, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ann(x), rtol=1e-5, atol=1e-5)
    after = ann.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in net.modules())


class Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.a, self.b = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)

    def forward(self, h):
        return F.relu(h + self.b(F.relu(self.a(h))))


def test_a_sequential_of_your_own_blocks_is_a_graph():
    """An nn.Sequential holding blocks of the user's own converts through the graph
    path (the chain form refuses them); one of torch.nn layers stays a chain."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Block(8), Block(8),
                        nn.Conv2d(8, 1, 3, padding=1)).eval()
    calib, x = images(), images(n=1, seed=5)[0]
    snn = to_snn(ann, calib, 64, neuron="if", percentile=100)
    assert type(snn) is SpikingGraph and len(snn.neurons()) == 5
    with torch.no_grad():
        torch.testing.assert_close(graph_net(ann)(x), ann(x))
        assert float((snn(x) - ann(x)).abs().mean()) < 0.1 * float(ann(x).abs().mean())
    assert type(to_snn(PlainChain().as_chain().body, calib, 2)) is SpikingChain


def test_a_sequential_with_pooling_or_a_transposed_conv_is_a_graph():
    """An nn.Sequential (or a Residual around one) of torch.nn layers that holds
    average pooling, upsampling or a transposed conv, which the chain form refuses
    ("expected a Conv2d here"), converts through the graph path (found in review:
    every Sequential of torch.nn layers took the chain path)."""
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                           nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
                           nn.Conv2d(4, 1, 3, padding=1))
    transposed = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                               nn.ConvTranspose2d(4, 4, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(4, 1, 3, padding=1))
    x = images(n=1, seed=5)[0]
    for ann in (pooled, transposed, Residual(pooled)):
        ann = ann.eval()
        snn = to_snn(ann, images(), 64, neuron="if", percentile=100)
        assert type(snn) is SpikingGraph
        with torch.no_grad():
            assert float((snn(x) - ann(x)).abs().mean()) < 0.05 * float(ann(x).abs().mean())


def test_a_residual_inside_your_network():
    """spikingir.models.Residual (DnCNN's skip) inside a network of the user's is
    one subtraction of the graph; a body that changes the shape is refused as
    Residual refuses it (not broadcast)."""
    class Net(nn.Module):
        def __init__(self, out=1):
            super().__init__()
            torch.manual_seed(0)
            self.res = Residual(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                              nn.Conv2d(8, out, 3, padding=1)))
            self.c = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.c(self.res(x))

    ann, x = Net().eval(), images(n=1, seed=4)[0]
    with torch.no_grad():
        torch.testing.assert_close(graph_net(ann)(x), ann(x))
        snn = to_snn(ann, images(), 64, neuron="if", percentile=100)
        assert float((snn(x) - ann(x)).abs().mean()) < 0.02 * float(ann(x).abs().mean())
    with pytest.raises(ValueError, match="Residual: the body maps"):
        to_snn(Net(out=3).eval(), images(), 2)


def test_layers_named_like_module_dict_attributes(tmp_path):
    """Convs whose names are attributes of nn.ModuleDict (``values``, ``update``,
    ``keys``), which holds the graph's layers by node name, convert, save and load
    (found in review: a KeyError "attribute 'values' already exists")."""
    from spikingir.pipeline import load_snn, save_snn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.values, self.update = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.keys, self.update_ = nn.Conv2d(4, 1, 3, padding=1), nn.Conv2d(1, 1, 1)

        def forward(self, x):
            h = F.relu(self.values(x))
            return self.update_(self.keys(F.relu(self.update(h)) + h))

    ann, x = M().eval(), images(n=1, seed=4)[0]
    with torch.no_grad():
        torch.testing.assert_close(graph_net(ann)(x), ann(x))
    snn = to_snn(ann, images(), 3)
    save_snn(snn, tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(load_snn(tmp_path / "m.pt")(x), snn(x))


def test_in_place_relus_change_what_later_readers_see():
    """``relu_`` and ``ReLU(inplace=True)`` change their input tensor: a reader
    after them (here a skip and a BN's conv) sees the rectified value, one
    before them the original."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.c3, self.r = nn.Conv2d(8, 1, 3, padding=1), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.c1(x)
            before = y * 1.0  # reads y before the in-place ReLU
            self.r(y)
            z = self.c2(y).relu_()
            return self.c3(torch.cat([z + y, F.relu(before)], 1))

    ann = M().eval()
    x = torch.randn(1, 1, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(graph_net(ann)(x), ann(x))


def test_an_augmented_assignment_on_an_aliased_tensor_is_refused():
    """torch.fx traces ``h2 *= 3`` as ``h2 = h2 * 3``: eager PyTorch changes the
    tensor in place, so ``h`` (the same tensor) changes too, and the trace does not.
    to_snn checks the graph form against the network on a calibration image and
    refuses the difference (found in review: it converted another network
    silently, its graph form 0.2 off on outputs of ~0.25); ``h.mul_(3)`` is traced
    in place and converts."""
    class M(nn.Module):
        def __init__(self, method):
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)
            self.method = method

        def forward(self, x):
            h = F.relu(self.c1(x))
            h2 = h
            if self.method:
                h2.mul_(3)
            else:
                h2 *= 3
            return self.c2(F.relu(h))

    with pytest.raises(ValueError, match=r"M: its traced graph .* h \+= y"):
        to_snn(M(False).eval(), images(n=1), 2)
    assert type(to_snn(M(True).eval(), images(n=1), 2)) is SpikingGraph


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_a_chain_as_a_module_converts_as_the_chain(neuron):
    """The graph path on a chain written as a module gives the chain path's SNN:
    the same thresholds, outputs, counted energy and energy estimate."""
    plain = PlainChain().eval()
    calib, x = images(), images(n=1, seed=7)[0]
    kw = dict(neuron=neuron, per_channel=True, v0="half")
    a, b = to_snn(plain.as_chain(), calib, 4, **kw), to_snn(plain, calib, 4, **kw)
    assert type(a) is SpikingChain and type(b) is SpikingGraph
    for na, nb in zip(a.neurons(), b.neurons(), strict=True):
        assert torch.equal(na.theta, nb.theta)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert snn_energy_mj(a, x) == snn_energy_mj(b, x)
    assert a.stats["sops"] == b.stats["sops"] and a.firing_rate() == b.firing_rate()
    a.track_energy(), b.track_energy()
    a(x), b(x)
    torch.testing.assert_close(a.energy_ratio, b.energy_ratio)
    a.track_energy(False), b.track_energy(False)
    with torch.no_grad():  # on spike_conv2d from channel masks, both
        a.use_spike_conv(True, backend="cpp"), b.use_spike_conv(True, backend="cpp")
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("make", [ResBlocks, TinyUNet, OddOps])
def test_graph_snn_approaches_its_ann(make):
    ann, calib = make().eval(), images(n=4)
    x = images(n=1, seed=9)[0]
    with torch.no_grad():
        want = ann(x)
        for neuron in ("if", "mprn"):
            errs = []
            for T in (4, 64):
                out = to_snn(ann, calib, T, neuron=neuron, percentile=100)(x)
                assert out.shape == want.shape
                errs.append(float((out - want).abs().mean()))
            assert errs[1] < 0.25 * errs[0], (neuron, errs)
            assert errs[1] < 0.02 * float(want.abs().mean()), (neuron, errs)


def test_gradients_reach_thresholds_and_weights():
    ann = TinyUNet().eval()
    snn = to_snn(ann, images(), 3).train()
    snn.track_energy()
    x = images(n=2, seed=3)
    loss = F.mse_loss(snn(torch.cat(x)), ann(torch.cat(x)).detach()) + 0.1 * snn.energy_ratio
    loss.backward()
    grads = {n: p.grad for n, p in snn.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if n.endswith("theta"))
    # the read-out convs play the pixel mapper's part (fine-tuning's train_mapper)
    assert list(snn.mapper) == [snn.layers["out"], snn.layers["smooth"]]
    groups = snn.param_groups(1e-4, 1e-3, train_mapper=False)
    assert not snn.layers["smooth"].weight.requires_grad and len(groups[1]["params"]) == 4 * 2


def test_static_part_runs_once():
    """Nodes that depend on the image through linear ops only (the head conv, the
    global skip) run once per forward on [B, ...], not on every step; convs
    fed by spikes run on all steps at once ([steps * B, ...])."""
    ann = ResBlocks().eval()
    snn = to_snn(ann, images(), 5, neuron="mprn")
    seen = {}
    for name in ("head", "bn1", "tail"):  # a1's conv with bn1 folded in is named bn1
        snn.layers[name].register_forward_hook(
            lambda m, i, o, name=name: seen.setdefault(name, []).append(i[0].shape[0]))
    with torch.no_grad():
        snn(torch.rand(2, 1, 10, 10))
    assert seen == {"head": [2], "bn1": [6 * 2], "tail": [2]}


def test_graph_energy_counts():
    """Average pooling of spikes over windows that do not overlap, the transposed
    conv and the nearest-upsampled spikes count SOPs (no analog MACs per step)."""
    ann = TinyUNet().eval()
    snn = to_snn(ann, images(), 4, neuron="if").record_stats()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        snn(x)
    st = snn.stats
    assert st["analog_macs"] == 0
    assert st["first_layer_macs"] == conv_call_macs(snn.layers["e1"], 1, 16, 16)[0]
    # with recycling, the read-out conv of spikes counts its MACs once, as a chain's
    # mapper does; the one of the analog branch counts them (only) once
    assert st["readout_macs"] == sum(conv_call_macs(snn.layers[n], 1, 16, 16)[0]
                                     for n in ("out", "smooth"))
    assert st["sops"] > 0 and [layer["name"] for layer in st["layers"]] == \
        ["r", "r_1", "relu", "r_2"]
    assert snn.energy_mj() == snn_energy_mj(snn, x) > 0


def _dyadic(snn):
    """Weights, biases and thresholds on a dyadic grid (with dyadic inputs every
    potential is exact: a sum in another order, or spike_conv2d, is bit for bit
    the same)."""
    dyadic_network_(snn.layers.values(), snn.neurons())
    return snn


class _Scaled(nn.Module):
    """Spikes times and divided by numbers before the convs that read them (per
    step and in the read-out); ``fold``: the numbers in those convs' weights."""

    def __init__(self, fold=False):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.c3, self.fold = nn.Conv2d(6, 1, 3, padding=1), fold
        if fold:
            with torch.no_grad():
                self.c2.weight *= 0.5
                self.c3.weight /= -4

    def forward(self, x):
        h = F.relu(self.c1(x))
        g = F.relu(self.c2(h if self.fold else 0.5 * h))
        return x - self.c3(g if self.fold else -g / 4)


@pytest.mark.parametrize("neuron", ["if", "mprn"])
@pytest.mark.parametrize("recycling", [True, False])
def test_scaled_spikes_count_as_the_folded_weights(neuron, recycling):
    """A spike times a number is still one event (the number folds into the
    weights of the conv that reads it): ``0.5 * h`` and ``-g / 4`` count the
    SOPs, energy estimate and outputs of the same network with the numbers in
    the next convs' weights, and the per-step conv runs on spike_conv2d with the
    number folded in (found: they were analog MACs at every step and no SOPs, the
    energy estimate 0 instead of 0.077 for the IF net at T=4)."""
    calib, x = images(), images(n=1, seed=7)[0]
    a, b = (to_snn(_Scaled(fold).eval(), calib, 4, neuron=neuron, recycling=recycling)
            for fold in (False, True))
    with torch.no_grad():
        a.record_stats(), b.record_stats()
        assert torch.equal(a(x), b(x))
        assert a.stats == b.stats and a.stats["sops"] > 0 and a.stats["analog_macs"] == 0
        a.record_stats(False), b.record_stats(False)
    a.track_energy(), b.track_energy()
    a(x), b(x)
    assert float(a.energy_ratio.detach()) == float(b.energy_ratio.detach()) > 0
    a.track_energy(False), b.track_energy(False)
    with torch.no_grad():  # float spikes in both (b's h could go over as masks, a's not)
        a.use_spike_conv(True, backend="cpp", masks=False)
        b.use_spike_conv(True, backend="cpp", masks=False)
        assert "spikingir::spike_conv2d_fwd" in ran_ops(lambda: a(x))
        assert torch.equal(a(x), b(x))


class _Summed(nn.Module):
    """A sum of two layers' spike trains read per step, and a difference read
    by the read-out; ``split``: each train through its own conv (the sums'
    convs, one without its bias)."""

    def __init__(self, split=False):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 1, 3, padding=1)
        self.split = split
        if split:
            self.c3b = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.c4b = nn.Conv2d(6, 1, 3, padding=1, bias=False)

    def forward(self, x):
        h1 = F.relu(self.c1(x))
        h2 = F.relu(self.c2(h1))
        if self.split:
            h3 = F.relu(self.c3(h1) + self.c3b(h2))
            return x - (self.c4(h2) + self.c4b(h3))
        h3 = F.relu(self.c3(h1 + h2))
        return x - self.c4(h2 - h3)


class _Pooled(nn.Module):
    """A conv on the 2x2 averages of spikes (``stride=1``: windows that overlap);
    ``fold``: a conv on the spikes that computes the same (set its weights)."""

    def __init__(self, stride=2, fold=False):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        if fold:
            self.c2 = nn.Conv2d(6, 6, 6, stride=2, padding=2)
        self.c3, self.stride, self.fold = nn.Conv2d(6, 1, 1), stride, fold

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.c3(F.relu(self.c2(h if self.fold else F.avg_pool2d(h, 2, self.stride))))


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_summed_and_pooled_spikes_count_sops(neuron):
    """conv(h1 + h2) = conv(h1) + conv(h2) without a second bias: the SOPs of both
    layers' spikes, as the network with a conv per train counts them; a conv on
    averages of spikes over windows that do not overlap is a conv on the spikes
    (weights / 4, kernel 6, stride 2): its SOPs. Dyadic values make both forms
    exact, so they give the same spikes. The sum is not one layer's spikes, so
    it is not run on spike_conv2d (found: both counted analog MACs at every step,
    the sum's read-out its MACs without recycling)."""
    calib = images()
    x = (images(n=1, seed=7)[0] * 16).round() / 16
    a, b = (_dyadic(to_snn(_Summed(split).eval(), calib, 4, neuron=neuron, recycling=False))
            for split in (False, True))
    p, q = (_dyadic(to_snn(_Pooled(fold=fold).eval(), calib, 4, neuron=neuron, recycling=False))
            for fold in (False, True))
    with torch.no_grad():
        for one, two in ((a, b), (p, q)):
            for n, m in zip(one.neurons(), two.neurons(), strict=True):
                m.load_state_dict(n.state_dict())
        b.layers["c3b"].weight.copy_(a.layers["c3"].weight)
        b.layers["c4b"].weight.copy_(-a.layers["c4"].weight)
        q.layers["c2"].weight.copy_(
            p.layers["c2"].weight.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4)
        for name in ("c1", "c3"):
            q.layers[name].load_state_dict(p.layers[name].state_dict())
        q.layers["c2"].bias.copy_(p.layers["c2"].bias)
    with torch.no_grad():
        for one, two in ((a, b), (p, q)):
            one.record_stats(), two.record_stats()
            assert torch.equal(one(x), two(x))
            assert one.stats == two.stats and one.stats["analog_macs"] == 0, (one.stats, two.stats)
            one.use_spike_conv(True, backend="cpp").record_stats(False)
            assert torch.equal(one(x), two(x))  # the sum stays dense: still exact
        # overlapping windows: analog, the conv's MACs at every step
        r = to_snn(_Pooled(stride=1).eval(), calib, 4, neuron=neuron).record_stats()
        r(x)
        assert r.stats["analog_macs"] == r.steps * conv_call_macs(r.layers["c2"], 1, 15, 15)[0]


class _InputSkip(nn.Module):
    """A conv that reads the image concatenated with spikes (``how="cat"``, a U-Net's
    input skip), the image plus spikes (``"image"``, an image of ``w`` channels;
    ``"broadcast"``, one channel added to all ``w``), the input current minus
    scaled spikes (``"sum"``) or a number minus spikes (``"number"``); ``split``:
    the same network with that conv split by hand, a static conv of the input
    part (with the bias; the 1-channel image's, or a constant map's, read by the
    weights summed over the input channels) plus a conv of the spikes (without)."""

    def __init__(self, how="cat", split=False, w=6):
        super().__init__()
        torch.manual_seed(0)
        c = w if how == "image" else 1  # the image's channels
        self.c0, self.c1 = nn.Conv2d(c, w, 3, padding=1), nn.Conv2d(c, w, 3, padding=1)
        self.c2 = nn.Conv2d(w + 1 if how == "cat" else w, w, 3, padding=1)
        self.c3, self.how, self.split = nn.Conv2d(w, c, 3, padding=1), how, split
        if split:
            self.sx = nn.Conv2d(w if how in ("image", "sum") else 1, w, 3, padding=1)
            self.sh = nn.Conv2d(w, w, 3, padding=1, bias=False)

    def forward(self, x):
        h = F.relu(self.c1(x))
        a = self.c0(x) if self.how == "sum" else x * 0 + 0.5 if self.how == "number" else x
        if self.split:
            z = self.sx(a) + self.sh(h)
        else:
            z = self.c2(torch.cat((x, h), 1) if self.how == "cat" else
                        a - h / 2 if self.how == "sum" else 0.5 - h if self.how == "number" else
                        x + h)
        return x - self.c3(F.relu(z))


def _split_by_hand(mixed, split, how):
    """``split`` (an _InputSkip(how, split=True) SNN) computing what ``mixed`` does:
    its neurons, c0, c1, c3, and c2's weights split between sx and sh."""
    with torch.no_grad():
        for n, m in zip(mixed.neurons(), split.neurons(), strict=True):
            m.load_state_dict(n.state_dict())
        for name in set(mixed.layers) & {"c0", "c1", "c3"}:  # c0: "sum" only
            split.layers[name].load_state_dict(mixed.layers[name].state_dict())
        w = mixed.layers["c2"].weight
        split.layers["sx"].weight.copy_(w[:, :1] if how == "cat" else w if how in ("image", "sum")
                                        else w.sum(1, keepdim=True))
        split.layers["sx"].bias.copy_(mixed.layers["c2"].bias)
        split.layers["sh"].weight.copy_(w[:, 1:] if how == "cat" else -w / 2 if how == "sum" else
                                        -w if how == "number" else w)


@pytest.mark.parametrize("how", ["cat", "image", "sum", "number", "broadcast"])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_the_input_mixed_with_spikes_counts_and_runs_split(how, neuron):
    """conv(cat(x, h)) = conv_x(x) + conv_h(h), conv(x + h) = conv(x) + conv(h),
    conv(a - h / 2) = conv(a) + conv(-h / 2): the image's (the input current's)
    part once, with the bias, its
    MACs once; the spikes' part per step, their SOPs (on spike_conv2d when that
    is on). Counts, energy estimate and outputs are those of the network with
    the conv split by hand; on dyadic values (exact potentials) the outputs are
    those of the conv of the whole input (a hooked conv runs so, as before),
    otherwise up to float32 rounding (found: such a conv was analog MACs at every
    step over all its channels, 97 % of the OddOps net's energy at 64x64, T=4).
    A number (conv(0.5 - h) = conv(0.5 * 1) + conv(-h)) and a 1-channel image
    broadcast over the spikes' channels are static too: a 1-channel map read by
    the weights summed over the input channels, one channel's MACs once (found:
    both were analog MACs at every step over all the conv's channels)."""
    from spikingir.energy import ann_macs
    c = 6 if how == "image" else 1
    calib = [torch.cat(images(n=c, seed=s)[:c], 1) for s in (1, 2, 3)]
    x = (torch.cat(images(n=c, seed=7)[:c], 1) * 16).round() / 16
    anns = [_InputSkip(how, split).eval() for split in (False, True)]
    a, b = (_dyadic(to_snn(ann, calib, 4, neuron=neuron)) for ann in anns)
    _split_by_hand(a, b, how)
    with torch.no_grad():
        a.record_stats(), b.record_stats()
        out = a(x)
        assert torch.equal(out, b(x)) and a.stats == b.stats, (a.stats, b.stats)
        st = a.stats
        assert st["analog_macs"] == 0 and st["sops"] > 0
        # c2's MACs of the static channels (the image's one of 7, all 6, or one of 6)
        c2 = conv_call_macs(a.layers["c2"], 1, 16, 16)[0] // {"cat": 7, "image": 1,
                                                                "sum": 1}.get(how, 6)
        assert st["first_layer_macs"] == c2 + sum(conv_call_macs(a.layers[n], 1, 16, 16)[0]
                                                  for n in (("c0", "c1") if how == "sum" else
                                                            ("c1",)))
        a.record_stats(False), b.record_stats(False)
        handle = a.layers["c2"].register_forward_hook(lambda *_: None)  # the whole input
        assert torch.equal(a(x), out)
        handle.remove()
    a.track_energy(), b.track_energy()
    a(x), b(x)
    # the same SOP estimate; each ratio over its own ANN's MACs (the hand-split
    # "sum" net has one conv more)
    sops_a, sops_b = (float(s.energy_ratio.detach()) * ann_macs(n, x.shape)
                      for s, n in ((a, anns[0]), (b, anns[1])))
    assert sops_a == pytest.approx(sops_b, rel=1e-6) and sops_a > 0
    a.track_energy(False), b.track_energy(False)
    with torch.no_grad():
        for masks in (False, True):
            a.use_spike_conv(True, backend="cpp", masks=masks)
            b.use_spike_conv(True, backend="cpp", masks=masks)
            ran = ran_ops(lambda: a(x))  # c2's spike part on spike_conv2d; with masks, a
            # concatenation with the image is not made, so h goes over as masks (a sum
            # reads its values)
            on_masks = masks and how == "cat"
            assert any(k.startswith("spikingir::spike_conv2d_fwd_masks") for k in ran) == \
                on_masks and ("spikingir::spike_conv2d_fwd" in ran) != on_masks, ran
            assert torch.equal(a(x), out) and torch.equal(b(x), out)
        # not dyadic: the split sums in another order than the conv of the whole
        # input (the static part in float64, then the spikes' part), a few float32
        # ulps of each potential; no spike flips here, so the outputs agree to
        # float32 rounding of the read-out
        a = to_snn(anns[0], calib, 4, neuron=neuron)
        y = torch.cat(images(n=c, seed=8)[:c], 1)
        split = a(y)
        a.layers["c2"].register_forward_hook(lambda *_: None)
        torch.testing.assert_close(split, a(y), rtol=1e-5, atol=1e-6)


class _Depthwise(nn.Module):
    """A depthwise conv of spikes plus a number, and of spikes plus the 1-channel
    image broadcast over their channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.d1, self.d2 = (nn.Conv2d(6, 6, 3, padding=1, groups=6) for _ in range(2))
        self.c3 = nn.Conv2d(12, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return x - self.c3(torch.cat((F.relu(self.d1(h + 0.5)), F.relu(self.d2(h - x))), 1))


def test_a_grouped_conv_counts_a_broadcast_channel_per_group():
    """A grouped conv (run whole) of spikes plus a number or a 1-channel image counts
    the static part's MACs as the network split by hand computes it: one input
    channel per group, as a grouped conv cannot sum its weights across groups
    (found in review: one channel, 1/6 of it for these depthwise convs)."""
    snn = to_snn(_Depthwise().eval(), images(), 4).record_stats()
    with torch.no_grad():
        snn(images(n=1, seed=7)[0])
    d = conv_call_macs(snn.layers["d1"], 1, 16, 16)[0]  # one channel per group: all of them
    assert snn.stats["first_layer_macs"] == conv_call_macs(snn.layers["c1"], 1, 16, 16)[0] + 2 * d
    assert snn.stats["analog_macs"] == 0


class _Affine(nn.Module):
    """A BatchNorm after a sum (no conv before it: its own affine map), or
    (``where="relu"``) after a ReLU, on spikes (conv-ReLU-BN); ``bn=False``: the
    same network without it; ``w`` channels wide."""

    def __init__(self, bn=True, where="sum", w=6):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.g = nn.Conv2d(1, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)
        self.bn = nn.BatchNorm2d(w) if bn else nn.Identity()
        self.c3, self.where = nn.Conv2d(w, 1, 3, padding=1), where

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.bn(h + self.g(h)) if self.where == "sum" else self.g(self.bn(h)))
        return x - self.c3(h)


@pytest.mark.parametrize("where", ["sum", "relu"])
def test_a_batchnorm_of_its_own_counts_no_macs(tmp_path, where):
    """The ANN's energy counts conv MACs only (a BatchNorm none): the SNN counts no
    MACs for a BatchNorm's affine map either, nor puts it in the energy estimate's
    ANN figure. With a BatchNorm that is the identity on dyadic values the SNN
    counts what it counts without one (found: its 1x1 depthwise conv counted its
    MACs at every step and in energy_ratio's ANN figure, not in ann_energy_mj). A
    BatchNorm of spikes (after a ReLU) hands them on as spikes, a * s + b, whose
    reader counts their SOPs (found in review: it counted its MACs at every step,
    9.9x the ANN's energy for a conv-ReLU-BN net). A saved SNN keeps the mark."""
    from spikingir.energy import ann_energy_mj
    from spikingir.pipeline import load_snn, save_snn
    calib = images()
    x = (images(n=1, seed=7)[0] * 16).round() / 16
    anns = [_Affine(bn, where).eval() for bn in (True, False)]
    assert ann_energy_mj(anns[0], x.shape) == ann_energy_mj(anns[1], x.shape)
    a, b = (_dyadic(to_snn(ann, calib, 4, neuron="mprn")) for ann in anns)
    with torch.no_grad():
        for n, m in zip(a.neurons(), b.neurons(), strict=True):
            m.load_state_dict(n.state_dict())
        for name in ("c1", "g", "c3"):
            b.layers[name].load_state_dict(a.layers[name].state_dict())
        assert torch.equal(a.layers["bn"].weight, torch.ones(6, 1, 1, 1))
        assert torch.equal(a.layers["bn"].bias, torch.zeros(6))
        a.record_stats(), b.record_stats()
        assert torch.equal(a(x), b(x)) and a.stats == b.stats and a.stats["analog_macs"] == 0
        save_snn(a, tmp_path / "a.pt")
        back = load_snn(tmp_path / "a.pt").record_stats()
        assert torch.equal(back(x), b(x)) and back.stats == b.stats
        a.record_stats(False), b.record_stats(False)
    a.track_energy(), b.track_energy()
    a(x), b(x)
    assert float(a.energy_ratio.detach()) == float(b.energy_ratio.detach()) > 0


def test_a_one_channel_batchnorm_of_spikes_counts_sops_on_spike_conv():
    """A 1-channel BatchNorm's affine map is a conv of one group, so with
    use_spike_conv it ran on spike_conv2d, which handed on analog values: its
    reader counted MACs at every step (11520 analog MACs, no SOPs, for this net
    at 16x16, T=4) where without spike_conv it counted SOPs (found in review).
    It hands on spikes either way: the same outputs and statistics."""
    x = (images(n=1, seed=7)[0] * 16).round() / 16
    snn = _dyadic(to_snn(randomise_bn(_Affine(where="relu", w=1)).eval(), images(), 4,
                         neuron="mprn"))
    with torch.no_grad():
        snn.record_stats()
        dense, stats = snn(x), snn.stats
        snn.use_spike_conv(True, backend="cpp")
        assert "spikingir::spike_conv2d_fwd" in ran_ops(lambda: snn(x))
        assert torch.equal(snn(x), dense) and snn.stats == stats and stats["analog_macs"] == 0
        snn.record_stats(False)
        assert torch.equal(snn(x), dense)  # masks


def test_graph_snn_on_spike_conv(monkeypatch):
    """use_spike_conv: the per-step convs that read one layer's spikes (here all
    four in the blocks) run on spike_conv2d in inference; on dyadic values
    (exact potentials) the output is the dense one."""
    from spikingir import ops
    ann = ResBlocks().eval()
    snn = _dyadic(to_snn(ann, images(), 4, neuron="mprn"))
    with torch.no_grad():
        x = (torch.rand(1, 1, 12, 12) * 16).round() / 16
        dense = snn(x)
        calls, spike_conv2d = [], ops.spike_conv2d
        monkeypatch.setattr(ops, "spike_conv2d", lambda s, w, *a, **k: calls.append(w.shape)
                            or spike_conv2d(s, w, *a, **k))
        with snn.kept_spike_conv():
            snn.use_spike_conv(True, backend="cpp")
            ran = ran_ops(lambda: snn(x))
            assert torch.equal(snn(x), dense)
        assert not snn.spike_conv
    assert "spikingir::spike_conv2d_fwd" in ran
    # bn1 (a1 folded), b1, a2, b2; each twice: the IF steps and the reuse step's beta
    assert sorted(calls[:8]) == sorted([(8, 8, 3, 3)] * 6 + [(8, 8, 1, 1)] * 2), calls


@pytest.mark.parametrize("make", [ResBlocks, TinyUNet, OddOps])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_graph_snn_hands_over_masks(make, neuron):
    """In inference on spike_conv2d, a neuron layer whose spikes only convs on
    spike_conv2d read per step (or only the read-out) emits channel masks, as the
    chain's hidden layers do: the output of float spikes up to float32 rounding.
    With masks=False, or recording statistics, the spikes are float tensors (the
    same statistics)."""
    snn = to_snn(make().eval(), images(), 4, neuron=neuron)
    x = images(n=1, seed=11)[0]

    def run(masks, record=False):
        snn.use_spike_conv(True, backend="cpp", masks=masks).record_stats(record)
        with torch.no_grad():
            return snn(x), ran_ops(lambda: snn(x)), snn.stats

    floats, ran_floats, stats = run(False, record=True)
    masks, ran_masks, _ = run(True)
    torch.testing.assert_close(masks, floats, rtol=1e-5, atol=1e-6)
    assert "spikingir::neuron_fwd_masks" in ran_masks
    assert "spikingir::neuron_fwd_masks" not in ran_floats
    # the U-Net's neurons are read through pooling, upsampling, a transposed conv or
    # the read-out only: no spike_conv2d; in the others some conv reads masks
    assert any(k.startswith("spikingir::spike_conv2d_fwd_masks") for k in ran_masks) == \
        (make is not TinyUNet)
    recorded, ran_recorded, recorded_stats = run(True, record=True)
    assert "spikingir::neuron_fwd_masks" not in ran_recorded
    assert torch.equal(recorded, floats) and recorded_stats == stats


def test_graph_snn_finetunes_and_evaluates(tmp_path):
    """finetune_snn and evaluate take the graph SNN as they take a chain's."""
    from spikingir.evaluate import evaluate
    from spikingir.finetune import finetune_snn
    from spikingir.pipeline import denoise_samples
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
    ann = ResBlocks().eval()
    snn = to_snn(ann, images(n=2), 3, backend="cpp")
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    finetune_snn(snn, "denoise", sigma=25, data=tmp_path, val_data=tmp_path, steps=2, batch_size=2,
                 val_crop=32, progress=False, log=lambda _: None, energy_weight=0.1)
    assert any(not torch.equal(before[k], v) for k, v in snn.state_dict().items())
    report = evaluate("denoise", ann, snn, denoise_samples(25, tmp_path, crop=32), [2, 3], sigma=25)
    assert [r["timesteps"] for r in report["snn"]] == [2, 3]
    assert all(0 < r["energy_mj"] < report["ann"]["energy_mj"] for r in report["snn"])


def test_finetune_validation_energy_counts_pooled_convs_at_their_size():
    """Fine-tuning's validation reported a U-Net's SNN/ANN energy at about half
    evaluate's (0.37 against 0.67 on a 2-level U-Net, found running `spikingir
    finetune` of an --ann-module SNN): its ANN figure took every conv at the
    image's size, also those after pooling. It is now the ANN's own count."""
    from spikingir.energy import ann_macs, ann_energy_mj
    from spikingir.finetune import _with_energy
    ann, x = TinyUNet().eval(), images(n=1, size=16)[0]
    snn = to_snn(ann, images(n=2), 3)
    with torch.no_grad():
        snn.record_stats()(x)
    assert snn._ann_macs(x) == ann_macs(ann, tuple(x.shape))
    with pytest.raises(RuntimeError, match="run a forward"):
        snn._ann_macs(torch.zeros(1, 1, 8, 8))
    res = _with_energy(snn, lambda model: (model(x), {})[1])(snn)
    assert res["energy"] == pytest.approx(snn.energy_mj() / ann_energy_mj(ann, tuple(x.shape)))


class Mixed(nn.Module):
    """What the layer calibration tells apart: two convs concatenated into one
    neuron layer, a conv pooled and upsampled before a skip is added, a sum of
    two convs (one scaled), and a read-out from a sum."""

    def __init__(self, w=6):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, w, 3, padding=1)
        self.ca, self.cb = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w, 1)
        self.cp = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.s1, self.s2 = nn.Conv2d(2 * w, w, 3, padding=1), nn.Conv2d(2 * w, w, 1)
        self.tail = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        u = F.relu(torch.cat([self.ca(h), self.cb(h)], 1))
        p = F.relu(F.interpolate(F.avg_pool2d(self.cp(u), 2), scale_factor=2) + u)
        s = F.relu(self.s1(p) + 0.5 * self.s2(u))
        return x - self.tail(s)


def _mean_error(snn, ann, xs):
    with torch.no_grad():
        return sum(float((snn(x) - ann(x)).abs().mean()) for x in xs) / len(xs)


@pytest.mark.parametrize("make, how", [
    (ResBlocks, {"head": "bias (reads the input)", "bn1": "weights, bias", "b1": "weights, bias",
                 "b2": "weights, bias", "tail": "weights (read-out)"}),
    (TinyUNet, {"e2": "weights, bias", "t": "bias (transposed conv)", "d1": "weights, bias",
                "out": "weights (read-out)", "smooth": "weights (read-out)"}),
    (OddOps, {"g": "kept (no neuron or output reads it through linear ops only)",
              "bn": "bias (grouped conv)", "c2": "weights, bias", "c3": "weights, bias"}),
    (Mixed, {"ca": "weights, bias", "cb": "weights, bias",
             "cp": "bias (pooled or upsampled on the way)", "s1": "weights, bias",
             "s2": "weights", "tail": "weights (read-out)"})])
@pytest.mark.parametrize("method", ["bias", "weights"])
def test_layer_calibration_of_a_graph(make, how, method):
    """calibrate_layers on a graph SNN: on held-out images the SNN is clearly
    closer to its ANN than converted alone (measured: 0.16-0.58 of the mean
    |error| at T=4 and 8), thresholds untouched, and each conv calibrated as the structure
    allows (snn.meta["calibrated_layers"]); bias only: no weight changes."""
    ann, calib, held_out = make().eval(), images(n=4), images(n=3, seed=7)
    for T in (4, 8):
        plain = to_snn(ann, calib, T, per_channel=True, v0="half")
        cal = to_snn(ann, calib, T, per_channel=True, v0="half", layer_calibration=method)
        before, after = _mean_error(plain, ann, held_out), _mean_error(cal, ann, held_out)
        assert after < 0.7 * before, (T, before, after)
    for a, b in zip(plain.neurons(), cal.neurons(), strict=True):
        assert torch.equal(a.theta, b.theta)
    report = cal.meta["calibrated_layers"]
    assert sorted(report) == sorted(cal.layers)
    if method == "weights":
        assert {k: report[k] for k in how} == how
    else:
        assert all(v.startswith(("bias", "kept")) for v in report.values()), report
        for (k, a), b in zip(plain.state_dict().items(), cal.state_dict().values()):
            assert k.endswith("bias") or torch.equal(a, b), k


@pytest.mark.parametrize("method", ["bias", "weights"])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_a_chain_as_a_module_calibrates_as_the_chain(neuron, method):
    """The layer calibration of a chain written as a module is the chain path's:
    the hidden layers bit for bit (the same rates, targets and Newton steps), the
    read-out fit to a float rounding (its target is (ANN output - x) / -1, the
    chain's the ANN's output conv), so the outputs agree to ~1e-7."""
    plain = PlainChain().eval()
    calib, x = images(), images(n=1, seed=7)[0]
    kw = dict(neuron=neuron, per_channel=True, v0="half", layer_calibration=method)
    a, b = to_snn(plain.as_chain(), calib, 4, **kw), to_snn(plain, calib, 4, **kw)
    pairs = [(a.conv1, b.layers["c1"]), (a.hidden[0].module, b.layers["bn"]),
             (a.mapper.conv, b.layers["c3"])]
    for k, (ca, cb) in enumerate(pairs):
        for pa, pb in ((ca.weight, cb.weight), (ca.bias, cb.bias)):
            if k < 2 or method == "bias":
                assert torch.equal(pa, pb), k
            else:
                torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


def test_layer_calibration_of_a_graph_refuses_another_network():
    """calibrate_layers takes the network the graph SNN was converted from (or its
    GraphNet): another architecture, the same one with other weights, or no
    network are clear errors (and a graph ANN for a chain SNN)."""
    from spikingir.convert import calibrate_layers
    ann, calib = ResBlocks().eval(), images(n=1)
    snn = to_snn(ann, calib, 2)
    a, b = (calibrate_layers(to_snn(ann, calib, 2), net, calib) for net in (ann, graph_net(ann)))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    other = ResBlocks().eval()
    with torch.no_grad():
        other.tail.weight.mul_(2)
    for wrong, error, match in ((TinyUNet().eval(), ValueError, "traced graph .* does not match"),
                                (PlainChain().as_chain(), ValueError, "does not match"),
                                (other, ValueError, "other weights than the ANN it was converted"),
                                (None, TypeError, "expected the nn.Module")):
        with pytest.raises(error, match=match):
            calibrate_layers(snn, wrong, calib)
    with pytest.raises(TypeError, match="expected the DnCNN or conv chain"):
        calibrate_layers(to_snn(PlainChain().as_chain(), calib, 2), PlainChain(), calib)
    with pytest.raises(ValueError, match=r"calib_images: expected \[B, 1, H, W\]"):
        calibrate_layers(snn, ann, [torch.rand(1, 3, 8, 8)])


class _Net(nn.Module):
    """A conv, then ``fn`` (the part under test), then a conv."""

    def __init__(self, fn, extra=None, channels=4):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, channels, 3, padding=1), nn.Conv2d(channels, 1, 3, padding=1)
        self.fn, self.extra = fn, extra

    def forward(self, x):
        return self.c2(self.fn(self, self.c1(x)))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow
            return F.relu(self.c(x))
        return self.c(x)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 3)

    def forward(self, x, y):
        return self.c(F.relu(x + y))


@pytest.mark.parametrize("fn, error, match", [
    (lambda s, h: F.max_pool2d(F.relu(h), 1), ValueError, "max_pool2d.*ReLU activations only"),
    ((lambda s, h: s.extra(F.relu(h)), nn.MaxPool2d(1)), ValueError,
     "MaxPool2d extra.*ReLU activations only"),
    ((lambda s, h: s.extra(h), nn.LeakyReLU()), ValueError, "LeakyReLU extra.*ReLU activations only"),
    ((lambda s, h: s.extra(F.relu(h)), nn.Upsample(scale_factor=2, mode="bilinear")), ValueError,
     "mode 'bilinear'"),
    (lambda s, h: torch.sigmoid(h), ValueError, "sigmoid.*ReLU activations only"),
    (lambda s, h: F.relu6(h), ValueError, "relu6.*ReLU activations only"),
    (lambda s, h: F.leaky_relu(h), ValueError, "leaky_relu.*ReLU activations only"),
    (lambda s, h: torch.cat([F.relu(h), h], 0), ValueError, "along dim 0: along the channels"),
    (lambda s, h: F.relu(h) * h, ValueError, "product or quotient of two tensors"),
    (lambda s, h: F.relu(h) / F.relu(-h), ValueError, "product or quotient of two tensors"),
    (lambda s, h: F.interpolate(F.relu(h), scale_factor=1, mode="bilinear"), ValueError,
     "mode 'bilinear': 'nearest' only"),
    (lambda s, h: F.dropout(F.relu(h), 0.5), ValueError, "functional dropout that is on"),
    (lambda s, h: F.relu(h) + s.c1.bias.view(1, -1, 1, 1), ValueError, "parameter or buffer"),
    (lambda s, h: h, ValueError, "no ReLU reaches the output"),
])
def test_unsupported_nodes_are_refused_by_name(fn, error, match):
    ann = (_Net(*fn) if isinstance(fn, tuple) else _Net(fn)).eval()
    with pytest.raises(error, match=match) as info:
        to_snn(ann, images(n=1), 2)
    assert "_Net" in str(info.value)
    if "no ReLU" not in match:
        assert "node '" in str(info.value) and "supports nn.Conv2d" in str(info.value)


def test_untraceable_and_odd_models_are_refused():
    with pytest.raises(TypeError, match="torch.fx cannot trace _Branchy.*control flow"):
        to_snn(_Branchy().eval(), images(n=1), 2)
    with pytest.raises(ValueError, match="forward takes 2 inputs"):
        to_snn(_TwoInputs().eval(), images(n=1), 2)
    bn = _Net(lambda s, h: F.relu(s.bn(h)))
    bn.bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="without running statistics"):
        to_snn(bn.eval(), images(n=1), 2)
    with pytest.raises(ValueError, match="offset_percentile: for AOD-Net only"):
        to_snn(ResBlocks(), images(n=1), 2, offset_percentile=1.0)
    snn = to_snn(ResBlocks(), images(n=1), 2)
    with pytest.raises(ValueError, match=r"input must be \[B, 1, H, W\]"):
        snn(torch.rand(1, 3, 8, 8))
    for bad in (0, 2.0, True):  # step_chunk: the chain's check
        with pytest.raises(ValueError, match="step_chunk: expected None or an int >= 1"):
            snn.step_chunk = bad


@pytest.mark.parametrize("make, neuron, per_channel, recycling", [
    (ResBlocks, "if", True, False), (ResBlocks, "mprn", False, True),
    (TinyUNet, "mprn", True, True), (TinyUNet, "if", False, False)])
def test_a_graph_snn_saves_and_loads(tmp_path, make, neuron, per_channel, recycling):
    """save_snn writes the program (plain data: the file loads with
    weights_only=True, its config is JSON) and load_snn rebuilds the same
    network without the ANN's code: outputs bit for bit."""
    import json

    from spikingir.pipeline import load_snn, save_snn
    snn = to_snn(make().eval(), images(), 3, neuron=neuron, per_channel=per_channel,
                 recycling=recycling, v0="zero")
    save_snn(snn, tmp_path / "g.pt")
    cfg = torch.load(tmp_path / "g.pt", weights_only=True)["config"]
    assert cfg["arch"] == "graph" and json.loads(json.dumps(cfg)) == cfg
    back = load_snn(tmp_path / "g.pt")
    assert type(back) is SpikingGraph and back.meta == snn.meta
    assert back.recycling == recycling and back.neuron_kind == neuron
    x = torch.rand(2, 1, 16, 12)
    with torch.no_grad():
        assert torch.equal(back(x), snn(x))


def test_a_corrupt_graph_snn_file_is_a_clear_error(tmp_path):
    """A program cut short, reading a node no earlier one computes, of an unknown op,
    or without a conv's layer: load_snn's ValueError naming the file."""
    from spikingir.pipeline import load_snn, save_snn
    save_snn(to_snn(ResBlocks().eval(), images(n=1), 2), tmp_path / "g.pt")
    good = torch.load(tmp_path / "g.pt", weights_only=True)
    prog = good["config"]["program"]
    bad_ref = [list(p) for p in prog]
    bad_ref[2][2] = {"tuple": [{"ref": "nowhere"}]}
    layers = dict(good["config"]["layers"])
    layers.pop(next(iter(layers)))
    for change, match in [({"program": prog[:-3]}, "one input and one output"),
                          ({"program": bad_ref}, "reads 'nowhere'"),
                          ({"program": [*prog[:2], ["z", "maxpool", [], None], *prog[2:]]},
                           "is not \\[name, kind"),
                          ({"program": [*prog[:2], ["z", "conv", {"set": 1}, None], *prog[2:]]},
                           "unknown program value"),
                          ({"layers": layers}, "conv nodes and its layers differ"),
                          ({"program": "x"}, "expected a list")]:
        torch.save({**good, "config": {**good["config"], **change}}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=f"bad.pt: .*{match}"):
            load_snn(tmp_path / "bad.pt")
    cfg = dict(good["config"])
    del cfg["program"]
    torch.save({**good, "config": cfg}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: not a complete SpikingIR SNN checkpoint"):
        load_snn(tmp_path / "bad.pt")


def test_restore_with_a_graph_snn():
    """restore tiles a graph of stride-1 convs (its receptive radius bounds every
    path) to the whole image's result; a U-Net's reach is no such radius, so it
    restores an image of one tile and refuses to tile a larger one."""
    from spikingir.pipeline import restore
    img = np.random.default_rng(0).random((40, 36)).astype(np.float32)
    snn = to_snn(ResBlocks().eval(), images(), 3)
    np.testing.assert_array_equal(restore(img, snn, tile=16), restore(img, snn, tile=0))
    unet = to_snn(TinyUNet().eval(), images(), 3)
    assert restore(img, unet, tile=0).shape == img.shape == restore(img, unet).shape
    with pytest.raises(ValueError, match="pooling, upsampling and transposed convolutions"):
        restore(img, unet, tile=16)


def test_restore_takes_the_graph_input_channels():
    """restore checks the image against the channels the graph reads, not those of
    its first Conv2d, which need not read the image (found in review: a network
    starting with a transposed conv, or concatenating the image with itself, was
    refused as taking 4 or 2 channels)."""
    from spikingir.pipeline import restore

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.t, self.c = nn.ConvTranspose2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x):
            return self.c(F.relu(self.t(x)))

    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

        def forward(self, x):
            return self.c(F.relu(self.a(torch.cat([x, 2 * x], 1))))

    img = np.random.default_rng(0).random((12, 10)).astype(np.float32)
    for make in (Doubled, Transposed):
        torch.manual_seed(0)
        snn = to_snn(make().eval(), images(), 3)
        with torch.no_grad():
            want = snn(torch.from_numpy(img)[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(restore(img, snn, tile=0), want)
    with pytest.raises(ValueError, match=r"takes 1 channel\(s\)"):  # Transposed's in_channels
        restore(np.zeros((8, 8, 3), np.float32), snn)


class _Tied(nn.Module):
    """One conv called twice (tied weights); ``tied=False``: a second conv that
    starts as its copy."""

    def __init__(self, tied=True):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.out, self.tied = nn.Conv2d(6, 1, 3, padding=1), tied
        if not tied:
            self.again = copy.deepcopy(self.c)

    def forward(self, x):
        h = F.relu(self.c(F.relu(self.c1(x))))
        return x - self.out(F.relu(self.c(h) if self.tied else self.again(h)))


def test_a_conv_called_twice_stays_one_layer(tmp_path):
    """A conv called twice is one layer at both call sites: one parameter, whose
    gradient sums both uses, kept tied through save_snn / load_snn; outputs and
    energy those of the untied network (found: the SNN held two copies, which
    fine-tuning trained apart and the file stored twice)."""
    from spikingir.pipeline import load_snn, save_snn
    calib, x = images(), torch.rand(2, 1, 12, 12)
    a, b = (to_snn(_Tied(tied).eval(), calib, 3) for tied in (True, False))
    assert a.layers["c"] is a.layers["c_1"]
    assert len(a.param_groups(1e-4, 1e-3)[0]["params"]) == 3 * 2  # c1, c, out
    with torch.no_grad():
        a.record_stats(), b.record_stats()
        assert torch.equal(a(x), b(x)) and a.stats == b.stats
        a.record_stats(False), b.record_stats(False)
    for snn in (a, b):
        F.mse_loss(snn.train()(x), x).backward()
    torch.testing.assert_close(a.layers["c"].weight.grad,
                               b.layers["c"].weight.grad + b.layers["again"].weight.grad)
    save_snn(a.eval(), tmp_path / "t.pt")
    back = load_snn(tmp_path / "t.pt")
    assert back.layers["c"] is back.layers["c_1"]
    with torch.no_grad():
        assert torch.equal(back(x), a(x))
    # a file whose tie names no layer of the same geometry: a clear error
    good = torch.load(tmp_path / "t.pt", weights_only=True)
    layers = {**good["config"]["layers"]}
    layers["out"] = {**layers["out"], "tied": "c"}
    torch.save({**good, "config": {**good["config"], "layers": layers}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: .*layer 'out' is tied to 'c'"):
        load_snn(tmp_path / "bad.pt")


@pytest.mark.parametrize("method", ["bias", "weights"])
def test_layer_calibration_keeps_a_tied_conv(method):
    """calibrate_layers on a graph SNN with a conv called twice: the tied layer
    keeps its converted weights and bias (a fit or bias move for one call site
    would change the other's values behind the calibration; found when tied
    weights and graph calibration met), stays one layer, and the others are
    calibrated as usual."""
    calib = images()
    plain = to_snn(_Tied().eval(), calib, 4, per_channel=True, v0="half")
    cal = to_snn(_Tied().eval(), calib, 4, per_channel=True, v0="half",
                 layer_calibration=method)
    report = cal.meta["calibrated_layers"]
    assert cal.layers["c"] is cal.layers["c_1"]
    assert report["c"] == "kept (tied weights, also called at c_1)"
    assert report["c_1"] == "kept (tied weights, also called at c)"
    for p, q in zip(plain.layers["c"].parameters(), cal.layers["c"].parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(plain.layers["c1"].bias, cal.layers["c1"].bias)
    # a call site no neuron layer calibrates (its value also feeds a BatchNorm) is
    # reported as tied too (found by the review: the generic "no neuron ... reads
    # it" reason)
    ann = _TiedUnderBN().eval()
    report = to_snn(ann, calib, 4, layer_calibration=method).meta["calibrated_layers"]
    assert report["t_1"] == "kept (tied weights, also called at t)", report


class _TiedUnderBN(nn.Module):
    """A conv of cat(x, spikes) called twice, the second time under a BatchNorm."""

    def __init__(self, w=6):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.t = nn.Conv2d(1, w, 3, padding=1), nn.Conv2d(w + 1, w, 3, padding=1)
        self.bn, self.out = nn.BatchNorm2d(w), nn.Conv2d(w, 1, 3, padding=1)
        randomise_bn(self)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h2 = F.relu(self.t(torch.cat([x, h], 1)))
        return x - self.out(F.relu(self.bn(h2 + self.t(torch.cat([x, h2 * 0.5], 1)))))


def test_a_conv_and_batchnorm_called_twice():
    """The same conv and BatchNorm called twice fold into one tied layer; the same
    conv followed by two different BatchNorms cannot share one folded layer:
    copies (the docstring of graph_net says so); both compute the network."""
    class M(nn.Module):
        def __init__(self, same):
            super().__init__()
            torch.manual_seed(0)
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.out, self.same = nn.Conv2d(4, 1, 3, padding=1), same
            randomise_bn(self)

        def forward(self, x):
            h = F.relu(self.bn1(self.c(F.relu(self.c1(x)))))
            return self.out(F.relu((self.bn1 if self.same else self.bn2)(self.c(h))))

    x = torch.rand(1, 1, 10, 10)
    for same in (True, False):
        ann = M(same).eval()
        net = graph_net(ann)
        convs = [net.layers[n] for n, k, _, _ in net.program if k == "conv"]
        assert len(convs) == 4 and (convs[1] is convs[2]) == same
        assert len({id(p) for p in net.parameters()}) == (6 if same else 8)
        with torch.no_grad():
            torch.testing.assert_close(net(x), ann(x), rtol=1e-5, atol=1e-5)


class _NoDirectRead(nn.Module):
    """No conv reads the image directly: it is pooled, concatenated with itself, or
    shifted by a number first."""

    def __init__(self, how, c=1):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(2 * c if how == "cat" else c, 4, 3, padding=1)
        self.out, self.how = nn.Conv2d(4, 1, 3, padding=1), how

    def forward(self, x):
        h = (F.avg_pool2d(x, 2) if self.how == "pool" else
             torch.cat([x, x], 1) if self.how == "cat" else x - 0.5)
        return self.out(F.relu(self.a(h)))


@pytest.mark.parametrize("how", ["pool", "cat", "shift"])
def test_input_channels_through_pooling_cat_and_numbers(tmp_path, how):
    """The input channels come from the first conv that depends on the image through
    ops that keep (or, concatenated, add) channels: an image of other channels is
    the SNN's clear ValueError and restore's refusal, also for a file saved without
    them (found: in_channels was None, so the SNN took any channel count and failed
    inside its first conv, or restore replicated a grey image nowhere)."""
    from spikingir.pipeline import load_snn, restore, save_snn
    for c in (1, 3):
        ann = _NoDirectRead(how, c).eval()
        assert graph_net(ann).in_channels == c
        snn = to_snn(ann, [torch.rand(1, c, 8, 8)], 2)
        assert snn.in_channels == c
        with pytest.raises(ValueError, match=rf"input must be \[B, {c}, H, W\], got \(1, 2, 8"):
            snn(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"takes 3 channel\(s\)"):
        restore(np.zeros((8, 8, 2), np.float32), snn)
    save_snn(snn, tmp_path / "s.pt")
    obj = torch.load(tmp_path / "s.pt", weights_only=True)
    obj["config"]["in_channels"] = None  # as saved before: found from the program
    torch.save(obj, tmp_path / "old.pt")
    assert load_snn(tmp_path / "old.pt").in_channels == 3


class SharedAndStacked(nn.Module):
    """A per-step value read by the currents of two neuron layers (``y``: made once
    per chunk, kept until the second has run), and a ReLU of a ReLU."""

    def __init__(self, w=4):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(2 * w, 1, 3, padding=1)

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x))) * 0.9
        a = F.relu(y)
        b = F.relu(y + self.c3(a))
        return x - self.c4(torch.cat([a, F.relu(F.relu(b))], 1))


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_a_relu_of_a_relu_runs_on_masks(neuron):
    """A neuron layer read directly by another one (``relu(relu(h))``, e.g. a
    pre-activation block after a ReLU'd output) hands it float values, not masks
    (found in review: in inference on spike_conv2d, for_inference's default, the
    first emitted masks for the second: AttributeError 'SpikeMasks' object has no
    attribute 'dtype')."""
    snn = to_snn(SharedAndStacked().eval(), images(), 4, neuron=neuron, backend="cpp")
    x = images(n=1, seed=11)[0]
    with torch.no_grad():
        floats = snn.use_spike_conv(True, backend="cpp", masks=False)(x)
        masks = snn.use_spike_conv(True, backend="cpp", masks=True)(x)
    torch.testing.assert_close(masks, floats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [ResBlocks, TinyUNet, OddOps, SharedAndStacked,
                                  _Scaled, _Summed, _Pooled, _Tied, _InputSkip,
                                  functools.partial(_InputSkip, "sum"),
                                  functools.partial(_InputSkip, "number"),
                                  functools.partial(_InputSkip, "broadcast"),
                                  functools.partial(_Affine, where="relu")])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_graph_step_chunks_compute_the_unchunked_forward(make, neuron):
    """step_chunk = N on a graph SNN (layer-major, as the chain's): each neuron
    layer's current (a conv of spikes, a sum with a skip, a concatenation, pooled
    or upsampled spikes, a transposed conv) is made N steps at a time and the
    neurons continue from the chunk before's potential. The same statistics
    (recorded: float spikes) and read-out potentials as all steps at once; the
    output bit for bit in inference on masks (spikes read as values by a skip are
    kept as masks and turned back into the same values) and up to float rounding
    elsewhere (spike values summed per chunk); N >= T is one chunk. Hooks run once
    per chunk, on its currents."""
    snn = to_snn(make().eval(), images(), 5, neuron=neuron, backend="cpp")
    x = torch.cat(images(n=2, seed=11))
    readout = [snn.neurons_[snn._structure.ops[r][3]] for r in snn._structure.readout]

    def run(n, mode):
        snn.step_chunk = n
        snn.use_spike_conv(mode != "dense", backend="cpp", masks=mode == "masks")
        snn.record_stats(mode == "dense")
        with torch.no_grad():
            return snn(x), snn.stats, [m.v_final for m in readout]

    for mode in ("dense", "values", "masks"):
        ref, ref_stats, ref_v = run(None, mode)
        for n in (1, 2, 3, 5, 8):  # 2 and 3 do not divide T = 5
            out, stats, v = run(n, mode)
            assert stats == ref_stats and all(map(torch.equal, v, ref_v)), (mode, n)
            if mode == "masks" or n >= 5:
                assert torch.equal(out, ref), (mode, n)
            else:
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert 0 < snn.firing_rate() < 1
    snn.record_stats(False).use_spike_conv(False)
    whole, parts = [], []
    for n, held in ((None, whole), (2, parts)):
        hooks = [m.register_forward_hook(lambda m, i, o, held=held: held.append(i[0]))
                 for m in snn.neurons_]
        run(n, "dense")
        for h in hooks:
            h.remove()
    assert [p.shape[0] for p in parts] == [2, 2, 1 + (neuron == "mprn")] * len(snn.neurons_)
    for k, a in enumerate(whole):
        assert torch.equal(torch.cat(parts[3 * k:3 * k + 3]), a), k


def test_graph_step_chunks_keep_skipped_spikes_as_masks():
    """In inference on masks with step_chunk, a neuron layer whose spikes a skip
    reads as values (here every block's output: read by the next block's conv and
    its sum) emits masks too, kept for all steps at 1 bit a spike, and its readers
    get the values back: every neuron layer runs the masks kernel, none the
    float one. Its hidden layers keep no potential after the forward (as the
    chain's); the read-out layer its own."""
    snn = to_snn(ResBlocks().eval(), images(), 5, backend="cpp")
    snn.use_spike_conv(True, backend="cpp")
    x = images(n=1, seed=3)[0]
    with torch.no_grad():
        ref, ran_ref = snn(x), ran_ops(lambda: snn(x))
        snn.step_chunk = 2
        out, ran = snn(x), ran_ops(lambda: snn(x))
    assert torch.equal(out, ref)
    assert "spikingir::neuron_fwd" in ran_ref and "spikingir::neuron_fwd" not in ran
    assert "spikingir::neuron_fwd_masks" in ran
    assert [n.v_final is None for n in snn.neurons_] == [True] * 4 + [False]


@pytest.mark.parametrize("make", [ResBlocks, TinyUNet, _Scaled, _Summed, _Tied, _InputSkip,
                                  functools.partial(_InputSkip, "sum"),
                                  functools.partial(_InputSkip, "number"),
                                  functools.partial(_InputSkip, "broadcast")])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_graph_step_chunks_with_autograd_give_the_unchunked_gradients(make, neuron):
    """With autograd the chunks chain through each neuron's start potential: the
    same output and gradients (float64: no rounding in the network; the energy
    estimate's spike sums are float32) and energy estimate (summed per chunk)."""
    snn = to_snn(make().eval(), images(), 4, neuron=neuron, backend="torch").double()
    snn.track_energy()
    x = torch.cat(images(n=2, seed=8)).double()
    (ref, ref_energy, ref_grads), *chunked = chunked_backward(snn, x)
    assert ref_energy > 0 and any(g.abs().sum() > 0 for k, g in ref_grads.items() if "theta" in k)
    for out, energy, grads in chunked:
        assert torch.equal(out, ref)
        assert energy == pytest.approx(ref_energy, rel=1e-6)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7)
