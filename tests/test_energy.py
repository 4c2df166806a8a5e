"""The paper's energy model: ANN MACs, SOP helpers, fan-out."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikingir.energy import (E_MAC_PJ, E_SOP_PJ, ann_energy_mj, ann_macs, conv_call_macs, conv_fanout, conv_macs, conv_sops,
                              mac_energy_mj, snn_energy_mj, sop_energy_mj)
from spikingir.models import AODNet, DnCNN


def test_constants():
    assert E_MAC_PJ == 4.6 and E_SOP_PJ == 0.9


def test_dncnn_energy_matches_paper():
    m = DnCNN()
    pixels = 321 * 481
    assert ann_macs(m, (1, 1, 321, 481)) == pixels * (2 * 64 * 9 + 15 * 64 * 64 * 9) == 85_555_446_912
    assert round(ann_energy_mj(m, (1, 1, 321, 481)), 3) == 393.555
    assert round(ann_energy_mj(DnCNN(batchnorm=False), (1, 1, 321, 481)), 3) == 393.555


def test_aodnet_energy_matches_paper_with_1x1_conv():
    m = AODNet()
    records = conv_macs(m, (1, 3, 480, 640))
    assert [n for n, _, _ in records] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert records[0][1] is m.conv1  # the caller's modules, not the meta copy's
    per_pixel = [3 * 3 * 1, 3 * 3 * 9, 3 * 6 * 25, 3 * 6 * 49, 3 * 12 * 9]
    assert [mac for _, _, mac in records] == [640 * 480 * p for p in per_pixel]
    assert round(ann_energy_mj(m, (1, 3, 480, 640)), 3) == 2.467
    # the paper's figure needs conv1 counted: without it the total is 2.455 mJ
    assert round(mac_energy_mj(sum(mac for _, _, mac in records[1:])), 3) == 2.455


def test_meta_and_real_count_agree():
    m = DnCNN(depth=4, channels=8)
    expected = 2 * 11 * 13 * 9 * (8 + 64 + 64 + 8)
    assert ann_macs(m, (2, 1, 11, 13)) == ann_macs(m, (2, 1, 11, 13), device="cpu") == expected
    assert next(m.parameters()).device.type == "cpu"


def test_grouped_strided_conv_macs():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2))
    # output 8 x 5 x 6, each MAC count (Cin/groups) * 9 = 18
    assert ann_macs(m, (1, 4, 10, 12)) == 8 * 5 * 6 * 18


def test_transposed_conv_macs():
    """A U-Net's ConvTranspose2d counts too (it was skipped: a converted U-Net's
    SNN/ANN energy ratio came out too high): each of its input elements is
    multiplied into a (Cout / groups) x kh x kw window."""
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2))
    assert ann_macs(m, (1, 1, 5, 7)) == 4 * 35 * 9 + 4 * 35 * 3 * 4


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 6, 5, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 8, 3, dilation=2, groups=2), nn.Conv2d(2, 5, (3, 4), padding="same"),
    nn.Conv2d(2, 5, 7, padding="valid", stride=(1, 2)), nn.Conv2d(1, 1, 1)])
def test_conv_call_macs_is_the_recorded_count(conv):
    """The arithmetic count (what each training step's energy term uses) equals the
    count recorded from a forward, and the output size is the conv's."""
    macs, ho, wo = conv_call_macs(conv, 2, 23, 18)
    ((_, _, recorded),) = conv_macs(conv, (2, conv.in_channels, 23, 18))
    assert macs == recorded
    assert (ho, wo) == tuple(conv(torch.zeros(1, conv.in_channels, 23, 18)).shape[2:])


def test_energy_input_checks():
    with pytest.raises(ValueError, match="input_shape"):
        ann_macs(DnCNN(depth=3, channels=4), (1, 32, 32))
    with pytest.raises(TypeError):
        ann_macs("model", (1, 1, 8, 8))
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        ann_macs(nn.ReLU(), (1, 1, 8, 8))
    with pytest.raises(ValueError):
        sop_energy_mj(-1)
    with pytest.raises(TypeError):
        sop_energy_mj("10")


def test_sop_and_snn_energy():
    assert sop_energy_mj(1e9) == pytest.approx(0.9)
    assert sop_energy_mj(torch.tensor(2e9)) == pytest.approx(1.8)
    assert sop_energy_mj(1e9, pj_per_sop=0.1) == pytest.approx(0.1)
    assert mac_energy_mj(1e9) == pytest.approx(4.6)
    assert snn_energy_mj(1e6, 1e9) == pytest.approx(4.6e-3 + 0.9)


def test_conv_fanout():
    assert conv_fanout(nn.Conv2d(64, 64, 3, padding=1)) == 576
    assert conv_fanout(nn.Conv2d(64, 1, 3, padding=1)) == 9
    assert conv_fanout(nn.Conv2d(3, 3, 7, padding=3)) == 147
    assert conv_fanout(nn.Conv2d(8, 16, 3, groups=4)) == 4 * 9
    assert conv_fanout(nn.Conv2d(8, 16, 4, stride=2)) == 16 * 4
    assert conv_fanout(nn.Conv2d(8, 16, 3, dilation=2, padding=2)) == 16 * 9
    with pytest.raises(ValueError, match="stride"):
        conv_fanout(nn.Conv2d(8, 16, 3, stride=2))
    with pytest.raises(TypeError):
        conv_fanout(nn.Linear(3, 3))


def _brute_sops(conv, s):
    """Synapses reached, by definition: each output element counts the spikes in its receptive field."""
    w = torch.ones(conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size, dtype=torch.float64)
    return int(F.conv2d(s.double(), w, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        groups=conv.groups).sum().item())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 5, padding=2, groups=2),
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, 3, padding=2, dilation=2),
])
def test_conv_sops_exact(conv):
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(3, 2, 4, 11, 13, generator=g) < 0.2).float()  # [T, B, C, H, W]
    assert conv_sops(conv, s) == _brute_sops(conv, s.flatten(0, 1))


def test_conv_sops_interior_spike_is_fanout():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    s = torch.zeros(1, 4, 9, 9)
    s[0, 2, 4, 4] = 1
    assert conv_sops(conv, s) == conv_fanout(conv) == 54
    s[0, 1, 0, 0] = 1  # a corner spike reaches only 2 x 2 outputs
    assert conv_sops(conv, s) == 54 + 6 * 4
    with pytest.raises(ValueError):
        conv_sops(conv, torch.zeros(1, 3, 9, 9))


def test_snn_energy_of_a_converted_network():
    """snn_energy_mj(snn, image) (the issue's form) runs the SNN, counts the
    spikes it emits and equals the energy the evaluation reports; it leaves the
    network's statistics switch as it was."""
    from spikingir.convert import to_snn
    from spikingir.models import DnCNN
    torch.manual_seed(0)
    ann = DnCNN(depth=4, channels=8, batchnorm=False).eval()
    x = torch.rand(1, 1, 12, 10)
    snn = to_snn(ann, [x], 4, neuron="mprn")
    e = snn_energy_mj(snn, x)
    assert not snn._record
    with torch.no_grad():
        snn.record_stats()(x)
    st = snn.stats
    assert st["sops"] > 0
    assert e == pytest.approx(snn.energy_mj())
    assert e == pytest.approx(snn_energy_mj(st["first_layer_macs"] + st["readout_macs"], st["sops"]))
    # first-layer MACs: 1 -> 8 channels, 3x3, 12x10 pixels, counted once (not per step)
    assert st["first_layer_macs"] == 8 * 9 * 12 * 10
    with pytest.raises(TypeError, match="converted SNN"):
        snn_energy_mj(ann, x)


def test_snn_energy_counts_aodnet_offsets():
    """snn_energy_mj(snn, image) is the count evaluate reports (energy_mj()),
    AOD-Net's DC-offset corrections included."""
    from spikingir.pipeline import load_shipped_snn
    snn = load_shipped_snn("dehaze", timesteps=3)  # converted with offsets
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    e = snn_energy_mj(snn, x)
    with torch.no_grad():
        snn.record_stats()(x)
    assert snn.stats["offset_macs"] > 0
    assert e == pytest.approx(snn.energy_mj())


def test_conv_macs_keeps_every_module_mode():
    """A real-device count restores each submodule's own train/eval flag (e.g. a
    BatchNorm frozen in eval inside a model in training)."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 1, 3, padding=1)).train()
    net[1].eval()
    conv_macs(net, (1, 1, 8, 8), device="cpu")
    assert net.training and net[0].training and not net[1].training
    assert ann_macs(net, tuple(np.array([1, 1, 8, 8]))) == ann_macs(net, (1, 1, 8, 8))


def test_report_json_is_strict(tmp_path):
    """An infinite PSNR (output equal to the reference) is written as null: strict JSON."""
    import json
    from spikingir.evaluate import write_json
    write_json(tmp_path / "r.json", {"ann": {"psnr": float("inf")}, "snn": [{"psnr": 30.5}]})
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text
    assert json.loads(text) == {"ann": {"psnr": None}, "snn": [{"psnr": 30.5}]}



def test_conv_macs_of_a_converted_snn_names_the_cure():
    """A converted SNN's forward calls .item() (not possible on meta tensors): the
    error says to count on real tensors, and that works. firing_rate() before a
    recorded forward is a clear error too."""
    from spikingir.convert import to_snn
    torch.manual_seed(0)
    snn = to_snn(DnCNN(depth=3, channels=4).eval(), torch.rand(1, 1, 12, 12), 2)
    with pytest.raises(RuntimeError, match="pass device='cpu'"):
        conv_macs(snn, (1, 1, 10, 10))
    counted = {name: macs for name, _, macs in conv_macs(snn, (1, 1, 10, 10), device="cpu")}
    assert counted["conv1"] == 4 * 9 * 100  # once: the input current is computed once
    assert counted["hidden.0.module"] == snn.steps * 4 * 4 * 9 * 100  # every step, dense
    with pytest.raises(RuntimeError, match="record_stats"):
        snn.firing_rate()


def test_spike_count_is_exact_past_float32_integers():
    """A layer's spike total is an integer count: one that float32 cannot hold
    (odd and above 2^24, as one DnCNN layer of a 512 x 512 image at T=10 is) is
    still counted exactly, and the firing rate of an all-firing layer is 1."""
    from spikingir.models.spiking import SpikingChain, make_neuron
    H = W = 4097  # 16,785,409 neurons: odd, > 2^24 = 16,777,216
    convs = [nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)]
    snn = SpikingChain(convs, [make_neuron("if", 1.0)], timesteps=1, neuron_kind="if",
                       recycling=False).record_stats()
    snn._start_stats(torch.zeros(1, 1, 1, 1).expand(1, 1, H, W), snn.conv1)
    y = torch.ones(1, 1, 1, H, W)  # [T, B, C, H, W]: every neuron fires once
    snn._count("l1", snn.neurons_[0], y, [(snn.mapper.conv, slice(None))])
    layer = snn.stats["layers"][0]
    assert layer["spikes"] == H * W == 16_785_409
    assert layer["sops"] == H * W  # 1x1 conv, one output channel: one synapse each
    assert snn.firing_rate() == 1.0


def _reach(n, k, pad):
    """Per input position along one axis: outputs of a stride-1 conv whose window holds it."""
    out = torch.zeros(n, dtype=torch.float64)
    for o in range(n + 2 * pad - k + 1):
        for t in range(k):
            if 0 <= o - pad + t < n:
                out[o - pad + t] += 1
    return out


def _recount(snn, x, targets):
    """Runs ``snn`` on ``x`` with forward hooks on its neurons and recounts, from
    the spikes they emit, the spikes, SOPs (each spike's fan-out at its own pixel:
    fewer outputs at the border) and the firing rate."""
    caught = []
    hooks = [n.register_forward_hook(lambda m, i, o: caught.append((o != 0).double().sum(0)))
             for n in snn.neurons_]
    try:
        with torch.no_grad():
            snn.record_stats()(x)
    finally:
        for h in hooks:
            h.remove()
    spikes, sops = [], 0
    for counts, convs in zip(caught, targets):  # counts: [B, C, H, W] over all T (+1) steps
        spikes.append(int(counts.sum()))
        for conv in convs:
            k, p = conv.kernel_size[0], conv.padding[0]
            fan = torch.outer(_reach(counts.shape[-2], k, p), _reach(counts.shape[-1], k, p))
            sops += int((counts.sum((0, 1)) * fan).sum()) * conv.out_channels
    rate = sum(spikes) / (sum(c.numel() for c in caught) * snn.timesteps)
    return spikes, sops, rate


def test_dncnn_snn_stats_match_an_independent_recount():
    """The spikes, SOPs, energy and firing rate evaluate reports for a DnCNN SNN
    (MPRN: the reuse step counts, its rate over T; recycling: the read-out's
    MACs) equal a recount from the spikes its neurons emit."""
    from spikingir.convert import to_snn
    torch.manual_seed(0)
    ann = DnCNN(depth=5, channels=6, batchnorm=False).eval()
    x = torch.rand(2, 1, 13, 11)
    snn = to_snn(ann, [x], 4, neuron="mprn", per_channel=True, v0="half").eval()
    snn.use_spike_conv(False)  # the neurons emit float spikes to the hooks
    targets = [[h.module] for h in snn.hidden] + [[snn.mapper.conv]]
    spikes, sops, rate = _recount(snn, x, targets)
    st = snn.stats
    assert sum(spikes) > 0
    assert [layer["spikes"] for layer in st["layers"]] == spikes
    assert st["sops"] == sops
    B, H, W = 2, 13, 11
    assert st["first_layer_macs"] == B * 6 * 9 * H * W
    assert st["readout_macs"] == B * 1 * 6 * 9 * H * W  # mapper on the recycled (analog) residual
    assert snn.energy_mj() == pytest.approx(((st["first_layer_macs"] + st["readout_macs"]) * 4.6
                                             + sops * 0.9) * 1e-9, rel=1e-12)
    assert snn.firing_rate() == pytest.approx(rate, rel=1e-12)


def test_aodnet_snn_stats_match_an_independent_recount():
    """The same for the shipped AOD-Net SNN (spikes of x1..x3 feed several convs;
    the DC offsets' corrections cost their border band's MACs)."""
    from spikingir.pipeline import load_shipped_snn
    snn = load_shipped_snn("dehaze", timesteps=4)
    x = torch.rand(1, 3, 17, 19, generator=torch.Generator().manual_seed(1))
    c2, c3, c4, c5 = (snn.conv2.module, snn.conv3.module, snn.conv4.module, snn.mapper.conv)
    spikes, sops, rate = _recount(snn, x, [[c2, c3, c5], [c3, c4, c5], [c4, c5], [c5]])
    st = snn.stats
    assert sum(spikes) > 0
    assert [layer["spikes"] for layer in st["layers"]] == spikes
    assert st["sops"] == sops
    H, W = 17, 19
    m = snn.offset
    offset_macs = 0
    for conv, sl in ((c2, slice(0, 3)), (c3, slice(0, 6)), (c4, slice(3, 9)), (c5, slice(0, 12))):
        k, p = conv.kernel_size[0], conv.padding[0]
        border = H * W - (H - 2 * p) * (W - 2 * p)
        offset_macs += border * conv.out_channels * int((m[sl] != 0).sum()) * k * k
    assert st["offset_macs"] == offset_macs > 0
    assert st["first_layer_macs"] == 3 * 3 * H * W and st["readout_macs"] == 0
    assert snn.energy_mj() == pytest.approx(((3 * 3 * H * W + offset_macs) * 4.6 + sops * 0.9) * 1e-9,
                                            rel=1e-12)
    assert snn.firing_rate() == pytest.approx(rate, rel=1e-12)


def test_counted_conv_macs_is_conv_macs_of_the_forward_run():
    """Counting the forward a caller runs (evaluate's ANN energy) gives conv_macs'
    records for that input's shape; the hooks are gone afterwards."""
    from spikingir.energy import counted_conv_macs
    m = AODNet().eval()
    with counted_conv_macs(m) as calls:
        with torch.no_grad():
            m(torch.rand(1, 3, 20, 24))
    assert [(n, c, macs) for n, c, macs in calls] == conv_macs(m, (1, 3, 20, 24))
    assert not any(c._forward_hooks for c in m.modules())
    with pytest.raises(ValueError, match="evaluate: ReLU has no nn.Conv2d"):
        with counted_conv_macs(nn.ReLU(), "evaluate"):
            pass


def test_evaluate_ann_energy_is_ann_energy_mj():
    """evaluate's ANN energy (counted on its forward) is ann_energy_mj's (a meta forward)."""
    from spikingir.convert import to_snn
    from spikingir.evaluate import Sample, evaluate
    torch.manual_seed(0)
    ann = DnCNN(depth=4, channels=6, batchnorm=False).eval()
    samples = [Sample(f"s{i}", torch.rand(1, 1, 16 + i, 13), np.random.default_rng(i).random((16 + i, 13)))
               for i in range(2)]
    snn = to_snn(ann, [samples[0].inputs], 2)
    report = evaluate("denoise", ann, snn, samples, [2], sigma=25)
    expected = np.mean([ann_energy_mj(ann, tuple(s.inputs.shape)) for s in samples])
    assert report["ann"]["energy_mj"] == float(expected)


@pytest.mark.parametrize("groups", [1, 2])
def test_stats_of_masks_and_float_spikes_agree(groups):
    """A layer's recorded spikes and SOPs are the same integers whether its spikes
    come as SpikeMasks or float values, and equal conv_sops of the spikes (groups 1:
    from the per-pixel counts; groups 2: from the per-neuron counts)."""
    from spikingir.models.spiking import SpikingChain, make_neuron
    from spikingir.ops import SpikeMasks
    s = (torch.rand(5, 2, 6, 9, 7, generator=torch.Generator().manual_seed(4)) < 0.4).float()
    convs = [nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1, groups=groups)]
    targets = [(convs[1], slice(None)), (nn.Conv2d(8, 3, 5, padding=2), slice(2, 8))]
    stats = []
    for y in (SpikeMasks.from_dense(s), s * 0.7):
        snn = SpikingChain(convs, [make_neuron("if", 1.0)], timesteps=5, neuron_kind="if",
                           recycling=False).record_stats()
        snn._start_stats(torch.zeros(2, 1, 9, 7), snn.conv1)
        snn._count("l1", snn.neurons_[0], y, targets)
        stats.append(snn.stats["layers"][0])
    full = torch.zeros(5, 2, 8, 9, 7)
    full[:, :, 2:] = s
    assert stats[0] == stats[1] == {
        "name": "l1", "spikes": int(s.sum()), "neurons": 2 * 6 * 9 * 7,
        "firing_rate": int(s.sum()) / (2 * 6 * 9 * 7 * 5),
        "sops": conv_sops(convs[1], s) + conv_sops(targets[1][0], full)}
