"""Conversion, spiking models, read-out, energy accounting, evaluation report."""
import copy
import gc
import math
import weakref

import pytest
import torch

from spikingir import ops
from spikingir.convert import calibrate, calibrate_layers, to_snn
from spikingir.energy import E_MAC_PJ, E_SOP_PJ, conv_fanout, conv_macs
from spikingir.evaluate import Sample, evaluate
from spikingir.models import AODNet, DnCNN
from spikingir.nn.mapper import spike_rate
from spikingir.pipeline import load_snn, save_snn
from helpers import chunked_backward

torch.set_num_threads(1)


def tiny_dncnn(batchnorm=False, seed=0):
    torch.manual_seed(seed)
    m = DnCNN(depth=5, channels=8, batchnorm=batchnorm)
    for c in m.convs():
        c.weight.data *= 0.5
        if c.bias is not None:
            c.bias.data.uniform_(0, 0.1)
    return m.eval()


def tiny_aodnet(seed=0):
    torch.manual_seed(seed)
    m = AODNet()
    for c in m.convs():
        c.weight.data.normal_(0, 0.2)
        c.bias.data.uniform_(0, 0.1)
    return m.eval()


def images(c, n=3, size=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, c, size, size, generator=g) for _ in range(n)]


def test_calibration_is_the_activation_percentile():
    ann = tiny_dncnn()
    x = images(1)
    th = calibrate(ann, x, percentile=90.0)
    acts = []
    hook = ann.dncnn[1].register_forward_hook(lambda m, i, o: acts.append(o.flatten()))
    with torch.no_grad():
        for im in x:
            ann(im)
    hook.remove()
    a = torch.cat(acts)
    assert th[0].item() == pytest.approx(torch.quantile(a[a > 0], 0.9).item(), rel=1e-6)
    per_ch = calibrate(ann, x, percentile=99.0, per_channel=True)
    assert per_ch[0].shape == (8,) and len(per_ch) == 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_a_silent_channel_gets_threshold_one_on_the_networks_device(device):
    """A channel (or layer) that never fires on the calibration images gets threshold
    1, on the device of the other thresholds: it was a CPU tensor, which torch.stack
    refused beside CUDA ones (per channel) or left in a CUDA SNN (per layer)."""
    ann = tiny_dncnn()
    with torch.no_grad():
        ann.dncnn[0].bias[3] = -100.0  # channel 3 of layer 1 never fires
        ann.dncnn[2].bias.fill_(-100.0)  # nor does any channel of layer 2
    ann = ann.to(device)
    per_channel = calibrate(ann, images(1), per_channel=True)
    per_layer = calibrate(ann, images(1))
    assert {t.device.type for t in per_channel + per_layer} == {device}
    assert per_channel[0][3].item() == 1.0 and (per_channel[0] != 1.0).sum() == 7
    assert (per_channel[1] == 1.0).all() and per_layer[1].item() == 1.0
    snn = to_snn(ann, images(1), 4, per_channel=True)
    assert {p.device.type for p in snn.parameters()} == {device}
    with torch.no_grad():
        assert torch.isfinite(snn(images(1)[0].to(device))).all()


@pytest.mark.parametrize("make", [tiny_dncnn, tiny_aodnet])
def test_snn_of_a_frozen_ann_is_trainable(make):
    """Every SNN parameter requires grad, as fine-tuning expects, whatever the
    ANN's: a converted AOD-Net kept a frozen ANN's flags on conv1..conv4 (only the
    neurons and the mapper were then fine-tuned), a DnCNN did not; the ANN keeps its own."""
    ann = make().requires_grad_(False)
    snn = to_snn(ann, images(ann.convs()[0].in_channels), 4)
    frozen = [n for n, p in snn.named_parameters() if not p.requires_grad]
    assert frozen == []
    assert not any(p.requires_grad for p in ann.parameters())


def test_calibrating_a_bn_dncnn_in_train_mode_leaves_it_unchanged():
    """calibrate() on a BN DnCNN in train mode used its batch statistics (other
    thresholds than to_snn's: 3.1 against 1.2 on a layer) and updated its running
    statistics; it now calibrates the folded eval-mode network, on a copy."""
    from spikingir.models import fold_batchnorm
    ann = tiny_dncnn(batchnorm=True).train()
    for m in ann.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    before = copy.deepcopy(ann.state_dict())
    th = calibrate(ann, images(1), percentile=99.0)
    assert ann.training
    for k, v in ann.state_dict().items():
        assert torch.equal(v, before[k]), k
    folded = calibrate(fold_batchnorm(ann), images(1), percentile=99.0)
    torch.testing.assert_close(torch.stack(th), torch.stack(folded), rtol=1e-5, atol=0)
    snn = to_snn(ann, images(1), 4, percentile=99.0)
    thetas = torch.stack([n.theta.detach() for n in snn.neurons_])
    torch.testing.assert_close(torch.stack(th), thetas, rtol=1e-5, atol=0)


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_snn_approaches_ann_as_T_grows(neuron):
    ann = tiny_dncnn()
    x = images(1)
    snn = to_snn(ann, x, 4, neuron=neuron, percentile=100.0, v0="half")
    with torch.no_grad():
        ref = ann(x[0])
        errs = []
        for T in (2, 8, 64):
            snn.timesteps = T
            errs.append((snn(x[0]) - ref).abs().mean().item())
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[2] < 0.25 * errs[0]


def test_bn_form_and_aodnet_convert():
    bn = tiny_dncnn(batchnorm=True)
    for m in bn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    snn = to_snn(bn, images(1), 3, neuron="if")
    assert snn.steps == 3 and len(snn.neurons_) == 4
    out = snn(images(1)[0])
    assert out.shape == (1, 1, 24, 24)
    aod = tiny_aodnet()
    snn = to_snn(aod, images(3), 6, neuron="mprn")
    assert snn.steps == 7
    y = snn(images(3)[0])
    assert y.shape == (1, 3, 24, 24) and (y >= 0).all()
    snn.timesteps = 256
    with torch.no_grad():
        err_long = (snn(images(3)[0]) - aod(images(3)[0])).abs().mean()
    assert err_long < 0.05


def test_bad_conversion_arguments():
    ann = tiny_dncnn()
    with pytest.raises(ValueError, match="neuron"):
        to_snn(ann, images(1), 4, neuron="lif")
    with pytest.raises(ValueError, match="timesteps"):
        to_snn(ann, images(1), 0)
    with pytest.raises(ValueError, match="v0"):
        to_snn(ann, images(1), 4, v0="random")
    for bad in (0, 100.5, float("nan"), "99", True):  # a str failed on '<', True meant 1 %
        with pytest.raises(ValueError, match=r"percentile: expected a number in \(0, 100\]"):
            to_snn(ann, images(1), 4, percentile=bad)
    with pytest.raises(TypeError, match="expected a DnCNN, an AODNet, an nn.Sequential"):
        to_snn(torch.nn.Conv2d(1, 1, 3), images(1), 4)
    with pytest.raises(ValueError, match="calib_images"):
        to_snn(ann, [], 4)
    with pytest.raises(ValueError, match=r"calib_images: expected \[B, 1, H, W\] tensors, got \(1, 3, 24, 24\)"):
        to_snn(ann, images(3), 4)
    with pytest.raises(ValueError, match="got str"):
        to_snn(ann, ["image.png"], 4)
    # float64 (or other float) inputs, numpy arrays too, are the same images to the
    # float32 network
    a = to_snn(ann, images(1), 3)
    for other in ([x.double() for x in images(1)], [x.numpy() for x in images(1)]):
        b = to_snn(ann, other, 3)
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                      b.state_dict().values()))


def test_recycled_rate_is_clamped_at_zero():
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([0.4, -0.3])
    v0 = torch.tensor([0.5, 0.5])
    for clamp in ("rate", "residual"):
        assert torch.allclose(spike_rate(y, v, None, 2, clamp=clamp), torch.tensor([1.2, 0.0]))
        assert torch.allclose(spike_rate(y, v, None, 2, recycling=False, clamp=clamp),
                              torch.tensor([1.0, 0.0]))
    # a firing neuron whose last spike overshot (v < v0): "rate" subtracts the
    # overshoot, "residual" (the files saved before 2026-11-29) ignores it
    assert torch.allclose(spike_rate(y, v, v0, 2), torch.tensor([0.95, 0.0]))
    assert torch.allclose(spike_rate(y, v, v0, 2, clamp="residual"), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="clamp: expected one of"):
        spike_rate(y, v, v0, 2, clamp="total")


@pytest.mark.parametrize("clamp", ["rate", "residual"])
def test_recycled_rate_in_place_is_the_same_bits(clamp):
    """spike_rate(in_place=True), the masks read-out's (inference): the same
    arithmetic on the caller's [1, ...] sum, so the same bits, with v0 or without,
    recycling or not; the sum is overwritten. Under autograd it is not in place."""
    g = torch.Generator().manual_seed(0)
    for T, recycling, half in ((10, True, True), (7, True, False), (3, False, True)):
        y = torch.randint(0, T + 2, (1, 2, 5, 7, 9), generator=g) * (torch.rand(5, 1, 1) + 0.3)
        v = torch.randn(2, 5, 7, 9, generator=g)
        v0 = (torch.rand(5, 1, 1, generator=g) / 2).expand(2, 5, 7, 9) if half else None
        want = spike_rate(y, v, v0, T, recycling, clamp)
        mine = y.clone()
        with torch.no_grad():
            got = spike_rate(mine, v, v0, T, recycling, clamp, in_place=True)
        assert torch.equal(got, want) and got.data_ptr() == mine.data_ptr()
    kept = y.clone()
    assert torch.equal(spike_rate(y, v, v0, T, recycling, clamp, in_place=True), want)
    assert torch.equal(y, kept)


def test_mask_counts_of_chunks_are_the_counts_of_all_steps():
    """The read-out's spike counts of SpikeMasks, added chunk by chunk into byte
    lanes (_MaskCounts, a byte per neuron): the counts of all steps at once
    (SpikeMasks.counts), for channel counts that fill no byte or word, and past
    255 steps (a byte lane's limit: then added into floats)."""
    from spikingir.models.spiking import _MaskCounts
    g = torch.Generator().manual_seed(1)
    for steps, C, sizes in ((5, 64, (2, 2, 1)), (9, 5, (4, 5)), (7, 70, (1,) * 7),
                            (300, 3, (100, 200)), (600, 9, (600,))):
        s = torch.rand(steps, 2, C, 3, 4, generator=g) < 0.4
        masks = ops.SpikeMasks.from_dense(s)
        acc, k = _MaskCounts(C), 0
        for n in sizes:
            acc.add(masks[k:k + n])
            k += n
        got = acc.counts()
        assert got.is_contiguous() and got.dtype == torch.float32
        assert torch.equal(got, masks.counts(0)) and torch.equal(got, s.sum(0).float())


def test_recycled_rate_of_a_constant_input_is_its_relu():
    """IF with v0 = theta / 2 and a constant input x: spikes plus the recycled
    residual, clamped as a whole, give ReLU(x) exactly (count theta + v_T - v0 =
    T x); clamping the residual alone rounds up the neurons whose last spike
    overshot."""
    T, theta = 10, 0.8
    x = torch.linspace(-1.0, 2.0, 301, dtype=torch.float64)
    v0 = torch.full_like(x, theta / 2)
    y, v = ops.if_multistep(x.expand(T, -1).contiguous(), theta, v0=v0, backend="torch")
    exact = spike_rate(y, v, v0, T)
    torch.testing.assert_close(exact, x.clamp_min(0), rtol=0, atol=1e-12)
    rounded = spike_rate(y, v, v0, T, clamp="residual")
    assert (rounded - x.clamp_min(0)).max() > theta / (2 * T) * 0.9


def test_energy_counts_real_spikes():
    ann = tiny_dncnn()
    x = images(1, n=1, size=16)[0]
    snn = to_snn(ann, [x], 5, neuron="mprn").record_stats()
    with torch.no_grad():
        snn(x)
    st = snn.stats
    assert st["first_layer_macs"] == 16 * 16 * 8 * 9
    total_spikes = sum(layer["spikes"] for layer in st["layers"])
    assert total_spikes > 0
    # SOPs per layer: spikes x fan-out of the conv they feed, up to the image border
    # (border pixels reach fewer outputs)
    targets = [h.module for h in snn.hidden] + [snn.mapper.conv]
    for layer, conv in zip(st["layers"], targets):
        bound = layer["spikes"] * conv_fanout(conv)
        assert 0.7 * bound <= layer["sops"] <= bound, layer
    assert st["sops"] == sum(layer["sops"] for layer in st["layers"])
    expect = (st["first_layer_macs"] + st["readout_macs"]) * E_MAC_PJ * 1e-9 + st["sops"] * E_SOP_PJ * 1e-9
    assert snn.energy_mj() == pytest.approx(expect)
    assert 0 < snn.firing_rate() < 1


def test_save_and_load_snn(tmp_path):
    ann = tiny_dncnn()
    snn = to_snn(ann, images(1), 3, per_channel=True, v0="half")
    with torch.no_grad():
        snn.neurons_[0].theta.mul_(1.1)
    save_snn(snn, tmp_path / "snn.pt", {"note": "test", "torch": torch.__version__})
    back = load_snn(tmp_path / "snn.pt")
    x = images(1)[0]
    with torch.no_grad():
        assert torch.equal(snn(x), back(x))
    aod = to_snn(tiny_aodnet(), images(3), 2)
    save_snn(aod, tmp_path / "aod.pt")
    assert isinstance(load_snn(tmp_path / "aod.pt"), type(aod))
    torch.save(ann.state_dict(), tmp_path / "ann.pt")
    with pytest.raises(ValueError, match="not a SpikingIR SNN"):
        load_snn(tmp_path / "ann.pt")
    # the read-out's clamp is saved; a file from before it was (the shipped SNNs)
    # keeps clamping the residual, as when its figures were measured
    assert snn.readout_clamp == back.readout_clamp == "rate"
    obj = torch.load(tmp_path / "snn.pt", weights_only=True)
    del obj["config"]["readout_clamp"]
    torch.save(obj, tmp_path / "old.pt")
    old = load_snn(tmp_path / "old.pt")
    assert old.readout_clamp == "residual"
    save_snn(old, tmp_path / "old2.pt")
    assert load_snn(tmp_path / "old2.pt").readout_clamp == "residual"
    with torch.no_grad():
        assert not torch.equal(old(x), back(x))  # the clamp matters on this net
    obj["config"]["readout_clamp"] = "both"
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown readout_clamp 'both'"):
        load_snn(tmp_path / "bad.pt")


def test_evaluate_report_format():
    ann = tiny_dncnn()
    x = images(1, n=2, size=16)
    samples = [Sample(f"im{i}", im + 0.05 * torch.randn_like(im), im[0, 0].numpy()) for i, im in enumerate(x)]
    snn = to_snn(ann, x, 2)
    r = evaluate("denoise", ann, snn, samples, [2, 3], sigma=25)
    assert set(r) == {"task", "sigma", "images", "ann", "snn"}
    assert set(r["ann"]) == {"psnr", "ssim", "energy_mj"}
    assert [e["timesteps"] for e in r["snn"]] == [2, 3]
    for e in r["snn"]:
        assert set(e) == {"timesteps", "psnr", "ssim", "psnr_loss", "conversion_rate", "energy_mj",
                          "firing_rate"}
        assert e["psnr_loss"] == pytest.approx(r["ann"]["psnr"] - e["psnr"])
        assert e["conversion_rate"] == pytest.approx(100 * e["psnr"] / r["ann"]["psnr"])
        assert all(math.isfinite(v) for v in e.values())
    assert snn.timesteps == 2  # restored


def test_finetuning_gradients_reach_every_parameter():
    """BPTT through the fused neuron op reaches thresholds, beta, mapper and weights,
    and a few Adam steps lower the loss on a fixed batch."""
    ann = tiny_dncnn()
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 16, 16, generator=g)
    noisy = clean + 0.1 * torch.randn(4, 1, 16, 16, generator=g)
    snn = to_snn(ann, [noisy], 3, neuron="mprn", backend="cpp").train()
    opt = torch.optim.Adam(snn.param_groups(1e-3, 1e-2))
    losses = []
    for step in range(15):
        loss = torch.nn.functional.mse_loss(snn(noisy), clean)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in snn.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert snn.neurons_[1].theta.grad.abs() > 0 and snn.neurons_[1].beta.grad.abs() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_frozen_mapper_stays_the_output_conv():
    """train_mapper=False (finetune --freeze-mapper): the mapper is left out of the
    optimiser and keeps the ANN's output conv; everything else still trains."""
    ann = tiny_dncnn()
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 1, 12, 12, generator=g)
    noisy = clean + 0.1 * torch.randn(2, 1, 12, 12, generator=g)
    snn = to_snn(ann, [noisy], 3, neuron="mprn", backend="cpp").train()
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    groups = snn.param_groups(1e-2, 1e-2, train_mapper=False)
    in_groups = {id(p) for grp in groups for p in grp["params"]}
    assert not any(id(p) in in_groups for p in snn.mapper.parameters())
    opt = torch.optim.Adam(groups)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(snn(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = snn.state_dict()
    for k in before:
        if k.startswith("mapper."):
            assert torch.equal(before[k], after[k]), k
    assert torch.equal(after["mapper.conv.weight"], ann.convs()[-1].weight)
    assert not torch.equal(before["hidden.0.module.weight"], after["hidden.0.module.weight"])
    assert not torch.equal(before["neurons_.0.theta"], after["neurons_.0.theta"])


def dyadic_snn(neuron, timesteps, seed):
    """A tiny DnCNN SNN and input on dyadic grids (weights, biases and inputs on a
    1/16 grid, thresholds powers of two, beta = theta / 2): every membrane
    potential is exact, so any summation order gives the same spikes and values."""
    ann = tiny_dncnn()
    with torch.no_grad():
        for conv in ann.convs():
            conv.weight.copy_((conv.weight * 16).round() / 16)
            if conv.bias is not None:
                conv.bias.copy_((conv.bias * 16).round() / 16)
    x = (torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(seed)) * 16).round() / 16
    snn = to_snn(ann, [x], timesteps, neuron=neuron, backend="cpp")
    with torch.no_grad():
        for n in snn.neurons():
            n.theta.copy_(2.0 ** torch.round(torch.log2(n.theta)))
            if hasattr(n, "beta"):
                n.beta.copy_(n.theta * 0.5)
    return snn, x


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_spike_conv_mode_matches_dense(neuron):
    """use_spike_conv(): hidden convs on binary spikes with theta (IF steps) and
    beta (reuse step) folded into the weights compute the same network; inputs
    on dyadic grids keep every membrane potential exact, so no spike can flip
    and outputs and gradients agree to float32 rounding."""
    snn, x = dyadic_snn(neuron, 3, seed=2)
    outs, grads = [], []
    for on in (False, True):
        snn.use_spike_conv(on, backend="cpp")
        snn.zero_grad()
        y = snn(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append({k: p.grad.clone() for k, p in snn.named_parameters()})
    assert not any(n.scale_output for n in snn.neurons_[:-1])  # hidden ones emit s
    snn.use_spike_conv(False)
    assert all(n.scale_output for n in snn.neurons())  # switched back
    snn.record_stats()(x)
    assert 0 < snn.firing_rate() < 1  # the comparison saw spikes, not silence
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_snn_runs_under_bf16_autocast(neuron):
    """Mixed precision (the fast GPU setting, here on the CPU): convs in bf16, the
    fused neurons take bf16 currents (potentials stay float32), channels-last
    weights; the image comes back float32 and close to the fp32 SNN's."""
    snn, x = dyadic_snn(neuron, 4, seed=6)
    with torch.no_grad():
        ref = snn(x)
        snn_cl = snn.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = snn_cl(x.to(memory_format=torch.channels_last))
    assert y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    assert float((y - ref).abs().mean()) < 0.05 * float(ref.abs().mean())


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_spike_conv_inference_hands_over_masks(neuron):
    """Without autograd the hidden neurons emit SpikeMasks into spike_conv2d:
    the same output as float spikes, the same spike counts (record_stats); on
    dyadic grids bit for bit (MPRN: the masks path folds beta into the reuse
    step's weights, the float path adds a (beta - theta) correction; the same sum
    when it is exact). Training and the reference conv run on float spikes."""
    snn, x = dyadic_snn(neuron, 4, seed=3)

    def run(masks, record, backend="cpp"):
        snn.use_spike_conv(True, backend=backend, masks=masks)
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = snn.record_stats(record)(x)
        names = {e.key for e in prof.key_averages()}
        handed_over = masks and backend != "torch"
        convs = {n for n in names if n.startswith("spikingir::spike_conv2d_fwd_masks")}
        assert bool(convs) == handed_over  # MPRN: the _out variant, two weight sets
        assert ("spikingir::neuron_fwd_masks" in names) == handed_over
        return out, snn.stats

    ref, ref_stats = run(False, True)
    assert torch.equal(run(True, False)[0], ref)
    out, stats = run(True, True)
    assert torch.equal(out, ref) and stats == ref_stats and 0 < snn.firing_rate() < 1
    run(True, False, backend="torch")  # the reference conv: float spikes
    snn.record_stats(False)
    y = snn(x)  # with autograd: float spikes, differentiable
    y.sum().backward()
    assert snn.hidden[0].module.weight.grad is not None


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_masks_inference_reuses_one_conv_buffer(neuron, monkeypatch):
    """With masks, every hidden spike_conv2d of a DnCNN SNN writes into one
    buffer (a fresh [steps, B, C, H, W] tensor per layer costs page faults on
    the CPU), and the output is still that of the dense float-spike path."""
    snn, x = dyadic_snn(neuron, 4, seed=5)
    with torch.no_grad():
        ref = snn(x)
    snn.use_spike_conv(True, backend="cpp", masks=True)
    storages, real = [], ops.spike_conv2d

    def spy(*args, out=None, **kw):
        storages.append(None if out is None else out.untyped_storage().data_ptr())
        return real(*args, out=out, **kw)

    monkeypatch.setattr(ops, "spike_conv2d", spy)
    with torch.no_grad():
        out = snn(x)
    assert torch.equal(out, ref)
    per_layer = 2 if neuron == "mprn" else 1  # MPRN: IF steps and the reuse step
    assert len(storages) == per_layer * len(snn.hidden) and None not in storages
    assert len(set(storages)) == 1
    # hidden neurons keep no leftover potential (memory); the read-out layer's is its rate's
    assert all(n.v_final is None for n in snn.neurons_[:-1])
    last = snn.neurons_[-1].v_final
    assert last is not None and last.shape[0] == x.shape[0] and last.shape[2:] == x.shape[2:]


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_user_hooks_on_a_spike_conv_snn_see_the_dense_networks_tensors(neuron):
    """Hooks a user registers on a spike-conv SNN in inference: the neurons' input
    currents a pre-hook keeps are not overwritten by later layers (the masks path
    reuses one buffer for every hidden conv: kept currents all read as the last
    layer's), and a hooked hidden conv is called, its hooks seeing the dense
    network's values; the output stays the dense one. Found by a lifecycle audit."""
    snn, x = dyadic_snn(neuron, 4, seed=7)

    def run(spike_conv):
        snn.use_spike_conv(spike_conv, backend="cpp")
        currents, convs = [], {}
        handles = [n.register_forward_pre_hook(lambda m, a: currents.append(a[0]))
                   for n in snn.neurons_]
        handles.append(snn.hidden[1].register_forward_hook(
            lambda m, a, out: convs.update(inp=a[0], out=out)))
        try:
            with torch.no_grad():
                out = snn(x)
        finally:
            for h in handles:
                h.remove()
        return out, currents, convs

    ref, ref_currents, ref_conv = run(False)
    out, currents, conv = run(True)
    assert torch.equal(out, ref)
    assert len(currents) == len(ref_currents) == len(snn.neurons_)
    for got, want in zip(currents, ref_currents):
        assert torch.equal(got, want)
    assert conv.keys() == {"inp", "out"}  # the hooked conv ran as a module
    assert torch.equal(conv["inp"], ref_conv["inp"]) and torch.equal(conv["out"], ref_conv["out"])


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_backward_hooks_on_a_spike_conv_snns_hidden_conv_run(neuron):
    """A full backward hook on a hidden conv (or its SeqToBatch) of a spike-conv SNN
    in training runs and sees the dense network's gradients: spike_conv2d bypassed
    the module, so such hooks never ran (found by the review of the merged hook
    fix, which covered forward hooks only)."""
    snn, x = dyadic_snn(neuron, 3, seed=5)

    def run(spike_conv):
        snn.use_spike_conv(spike_conv, backend="cpp")
        seen = {}
        handles = [snn.hidden[1].module.register_full_backward_hook(
                       lambda m, gi, go: seen.update(conv=go[0].clone())),
                   snn.hidden[2].register_full_backward_pre_hook(
                       lambda m, go: seen.update(seq=go[0].clone()))]
        try:
            out = snn(x)
            out.square().sum().backward()
        finally:
            for h in handles:
                h.remove()
        return out.detach(), seen

    ref, ref_seen = run(False)
    out, seen = run(True)
    assert torch.equal(out, ref)
    assert seen.keys() == {"conv", "seq"}  # both hooks ran
    for k in seen:
        assert torch.allclose(seen[k], ref_seen[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_hooks_on_a_spike_conv_snn_under_autocast_see_the_dense_networks_tensors(neuron):
    """Under bf16 autocast hooked hidden convs of a spike-conv SNN get the bf16
    spike values the dense network's neurons emit: they got float32 theta * s
    (theta unrounded), which the dense network never has (found by the review)."""
    snn = to_snn(tiny_dncnn(), images(1), 3, neuron=neuron, per_channel=True, backend="cpp")
    x = images(1, n=1, seed=4)[0]

    def run(spike_conv):
        snn.use_spike_conv(spike_conv, backend="cpp")
        seen = []
        handles = [h.register_forward_hook(lambda m, a, out: seen.append(a[0]))
                   for h in snn.hidden]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            snn(x)
        for h in handles:
            h.remove()
        return seen

    ref, got = run(False), run(True)
    assert len(got) == len(ref) == len(snn.hidden)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)


def test_repr_names_the_snns_settings():
    """print(snn) shows T, the neuron kind, the read-out and the spike-conv mode,
    and the neurons' non-default options (it showed layers only)."""
    snn = to_snn(tiny_dncnn(), images(1), 6, neuron="if")
    text = repr(snn)
    assert "timesteps=6, neuron_kind='if', recycling=True, readout_clamp='rate'" in text
    assert "spike_conv" not in text and "scale_output" not in text
    text = repr(snn.use_spike_conv(True, backend="torch"))
    assert "spike_conv=True, spike_conv_backend='torch'" in text
    assert all("scale_output=False" in repr(n) for n in snn.neurons_[:-1])  # they emit 0/1
    assert "scale_output" not in repr(snn.neurons_[-1])


def test_float64_spike_conv_snn_computes_in_float64():
    """A .double() SNN in spike-conv mode runs its hidden convs in float64 (the
    reference) in inference too: the masks path's fused kernels compute in float32,
    and it gave every hidden layer float32 currents (3e-8 from the float64 dense SNN)."""
    snn = to_snn(tiny_dncnn(), images(1), 4, per_channel=True, v0="half").double()
    x = images(1, n=1, seed=3)[0].double()
    with torch.no_grad():
        ref = snn(x)
        seen = []
        hook = snn.neurons_[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
        out = snn.use_spike_conv(True)(x)
        hook.remove()
    assert seen == [torch.float64] and out.dtype == torch.float64
    assert float((out - ref).abs().max()) < 1e-12


@pytest.mark.parametrize("arch", ["dncnn", "aodnet"])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_step_chunks_compute_the_unchunked_forward(arch, neuron):
    """step_chunk = N runs each layer's steps N at a time (the layers one after
    another), each chunk starting from the potential the chunk before left (the
    MPRN reuse step ends the last chunk): the same spikes, statistics and final
    potential as all steps at once. The output is bit for bit the same when the last layer
    emits masks (its spikes are counted, exact) and when N >= T (one chunk:
    today's path); with spike values it is up to float rounding (their sum over
    the steps is summed chunk by chunk). spike_conv2d on float spikes ("values")
    picks its dense or event path by the firing rate of what it is given, a
    chunk's here: the potentials are equal up to float rounding there."""
    ann, c = (tiny_dncnn(), 1) if arch == "dncnn" else (tiny_aodnet(), 3)
    x = images(c, n=2, size=13, seed=5)
    snn = to_snn(ann, x, 5, neuron=neuron, backend="cpp").record_stats()
    x = torch.cat(x)
    modes = ("dense", "values", "masks") if arch == "dncnn" else ("dense",)
    for mode in modes:
        if arch == "dncnn":
            snn.use_spike_conv(mode != "dense", backend="cpp", masks=mode == "masks")
        snn.step_chunk = None
        with torch.no_grad():
            ref = snn(x)
        ref_stats, ref_v = snn.stats, snn.neurons_[-1].v_final
        assert 0 < snn.firing_rate() < 1
        for n in (1, 2, 3, 5, 8):  # 2 and 3 do not divide T = 5
            snn.step_chunk = n
            with torch.no_grad():
                out = snn(x)
            assert snn.stats == ref_stats, (mode, n)
            v = snn.neurons_[-1].v_final
            assert torch.equal(v, ref_v) if mode != "values" or n >= 5 else \
                torch.allclose(v, ref_v, rtol=0, atol=1e-6), (mode, n)
            if mode == "masks" or n >= 5:
                assert torch.equal(out, ref), (mode, n)
            else:
                assert torch.allclose(out, ref, rtol=0, atol=1e-6), (mode, n)
    assert "step_chunk=8" in repr(snn)
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="step_chunk: expected None or an int >= 1"):
            snn.step_chunk = bad


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_hooks_run_once_per_step_chunk_on_its_steps(neuron):
    """With step_chunk, a neuron's forward hook runs once per chunk and sees that
    chunk's input currents: kept (not copied) by the hook, they are not
    overwritten by later layers or chunks (the masks path reuses conv buffers),
    and put together they are the currents of all steps at once. Layer after
    layer: every chunk of a layer runs before the next layer's first."""
    snn, x = dyadic_snn(neuron, 5, seed=9)
    snn.use_spike_conv(True, backend="cpp", masks=True)

    def run(n):
        snn.step_chunk = n
        held, order = [[] for _ in snn.neurons_], []
        hooks = [m.register_forward_hook(
                     lambda m, i, o, k=k: (held[k].append(i[0]), order.append(k)) and None)
                 for k, m in enumerate(snn.neurons_)]
        with torch.no_grad():
            out = snn(x)
        for h in hooks:
            h.remove()
        return held, out, order

    (whole, ref, _), (parts, out, order) = run(None), run(2)
    assert torch.equal(out, ref)
    steps = [2, 2, 1 + (neuron == "mprn")]  # T = 5 in chunks of 2; the reuse step last
    assert order == [k for k in range(len(snn.neurons_)) for _ in steps]
    for k, (a, b) in enumerate(zip(whole, parts)):
        assert [t.shape[0] for t in b] == steps, k
        assert torch.equal(torch.cat(b), a[0]), f"neuron {k}: a chunk's kept input changed"


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_step_chunks_hold_one_potential_and_one_chunk_of_currents(neuron, monkeypatch):
    """What makes step chunks save memory at any T (masks inference): every hidden
    spike_conv2d writes into one buffer of the largest chunk's steps (not T + 1),
    and when a neuron runs, the only potential of the forward still alive is the
    one it starts from (the chunk before's, of its own layer): earlier layers'
    and chunks' potentials are freed."""
    snn, x = dyadic_snn(neuron, 5, seed=4)
    snn.use_spike_conv(True, backend="cpp", masks=True)
    with torch.no_grad():
        ref = snn(x)
    snn.step_chunk = 2  # chunks of 2, 2 and 1 IF steps; MPRN: the last with the reuse step
    storages, real = [], ops.spike_conv2d

    def spy(*args, out=None, **kw):
        storages.append(out.untyped_storage())
        return real(*args, out=out, **kw)

    monkeypatch.setattr(ops, "spike_conv2d", spy)
    with torch.no_grad():
        assert torch.equal(snn(x), ref)
    monkeypatch.undo()
    assert len({st.data_ptr() for st in storages}) == 1
    B, C, H, W = x.shape[0], snn.hidden[0].module.out_channels, *x.shape[2:]
    assert storages[0].nbytes() == 2 * B * C * H * W * 4  # 2 steps of currents

    potentials = []  # (layer, weak reference to a call's final potential)

    def kept(m, args, out, k):
        v = m.v_final
        potentials.append((k, weakref.ref(v if v._base is None else v._base)))

    def starts(m, args, k):
        alive = [layer for layer, ref in potentials if ref() is not None]
        assert alive in ([], [k]), f"neuron {k} starts with potentials of layers {alive} alive"

    hooks = [h for k, n in enumerate(snn.neurons_)
             for h in (n.register_forward_hook(lambda m, a, o, k=k: kept(m, a, o, k)),
                       n.register_forward_pre_hook(lambda m, a, k=k: starts(m, a, k)))]
    try:
        with torch.no_grad():
            assert torch.equal(snn(x), ref)
    finally:
        for h in hooks:
            h.remove()
    assert len(potentials) == 3 * len(snn.neurons_)


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_step_chunks_with_autograd_give_the_unchunked_gradients(neuron):
    """With autograd the chunks chain through each neuron's start potential (v0
    carries the gradient back to the chunk before): the same gradients and
    energy estimate (track_energy: summed per chunk) up to float rounding."""
    snn, x = dyadic_snn(neuron, 4, seed=8)
    snn.track_energy()
    (ref, ref_energy, ref_grads), *chunked = chunked_backward(snn, x)
    assert ref_energy > 0
    for out, energy, grads in chunked:
        assert torch.allclose(out, ref, rtol=0, atol=1e-6)
        assert energy == pytest.approx(ref_energy, rel=1e-6)
        for k in ref_grads:
            assert torch.allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6), k
    assert any(g.abs().sum() > 0 for k, g in ref_grads.items() if "theta" in k)


@pytest.mark.parametrize("arch", ["dncnn", "dncnn-masks", "aodnet"])
def test_one_snn_serves_calls_that_interleave(arch):
    """Threads sharing one SNN: another call that runs between a forward's neurons
    and its read-out (here, deterministically, from a hook on the last neurons)
    leaves that forward's output as it was. The read-out read the neurons'
    ``v_final`` attribute, which the other call had overwritten: with threads,
    outputs of another image's potential (same sizes) or a shape error."""
    ann, c = (tiny_dncnn(), 1) if arch.startswith("dncnn") else (tiny_aodnet(), 3)
    snn = to_snn(ann, images(c), 4, backend="cpp")
    if arch.startswith("dncnn"):
        snn.use_spike_conv(arch == "dncnn-masks", backend="cpp")
    x, other, smaller = (torch.rand(1, c, s, s, generator=torch.Generator().manual_seed(k))
                         for k, s in ((0, 12), (1, 12), (2, 10)))
    with torch.no_grad():
        ref = snn(x)
        for between in (other, smaller):
            hook = snn.neurons_[-1].register_forward_hook(
                lambda m, i, o, between=between: (hook.remove(), snn(between)) and None)
            out = snn(x)
            hook.remove()
            assert torch.equal(out, ref)
    # and with real threads, each on its own image, against a single-thread run
    import threading
    xs = images(c, n=4, size=12, seed=3) + images(c, n=2, size=10, seed=4)
    with torch.no_grad():
        refs = [snn(im) for im in xs]
    got, errors = {}, []

    def work(k):
        try:
            with torch.no_grad():
                got[k] = [snn(xs[k]) for _ in range(3)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, outs in got.items():
        assert all(torch.equal(o, refs[k]) for o in outs), f"image {k}"


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_masks_inference_frees_the_conv_buffer_before_the_readout(neuron, monkeypatch):
    """The conv buffer (the last neurons' input) is freed before the read-out
    makes its temporaries, not at return: before, it sat beside them (the s25
    SNN, 256x256, T=10: peak RSS ~350 MiB above the model's, ~235 without it)."""
    snn, x = dyadic_snn(neuron, 3, seed=7)
    snn.use_spike_conv(True, backend="cpp", masks=True)
    buffers, real_conv, real_rate = [], ops.spike_conv2d, snn._rate

    def spy(*args, out=None, **kw):
        buffers.append(weakref.ref(out._base if out._base is not None else out))
        return real_conv(*args, out=out, **kw)

    def rate(neuron, y, v_final):
        assert buffers and all(b() is None for b in buffers), "conv buffer alive at the read-out"
        return real_rate(neuron, y, v_final)

    monkeypatch.setattr(ops, "spike_conv2d", spy)
    monkeypatch.setattr(snn, "_rate", rate)
    with torch.no_grad():
        snn(x)


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_masks_inference_leaves_inputs_a_neuron_hook_kept_intact(neuron):
    """The conv buffer is not a neuron input that a hook of that neuron may hold:
    before, a forward hook keeping each neuron's input (layer currents, as
    calibration hooks do) found every hidden layer's overwritten by the next
    conv (the s25 SNN: 14 of its 16 neurons' held inputs wrong, all one tensor)."""
    snn, x = dyadic_snn(neuron, 3, seed=6)
    snn.use_spike_conv(True, backend="cpp", masks=True)

    def run(clone):
        held = []
        hooks = [n.register_forward_hook(
            lambda m, i, o: held.append(i[0].clone() if clone else i[0])) for n in snn.neurons_]
        with torch.no_grad():
            out = snn(x)
        for h in hooks:
            h.remove()
        return held, out

    kept, out = run(clone=False)
    copies, ref = run(clone=True)
    assert torch.equal(out, ref)
    assert len(kept) == len(snn.neurons_)
    for i, (a, b) in enumerate(zip(kept, copies)):
        assert torch.equal(a, b), f"neuron {i}: the input its hook kept was overwritten"


@pytest.mark.parametrize("arch", ["dncnn", "aodnet"])
def test_forward_without_backward_frees_its_graph_with_the_output(arch):
    """An SNN forward with autograd on and no backward (an evaluation without
    torch.no_grad()) frees what it saved for backward once its output is
    dropped: before, the neurons' v_final attributes held the whole graph until
    the next forward (the s25 SNN, 128x128, T=4: 340 MiB kept; two graphs at
    the next forward's peak). v_final keeps its value, and training still
    reaches every parameter."""
    ann, c = (tiny_dncnn(), 1) if arch == "dncnn" else (tiny_aodnet(), 3)
    x = images(c, n=1, size=16)[0]
    snn = to_snn(ann, [x], 3, neuron="mprn", backend="cpp")
    saved = []

    def pack(t):  # a detached alias: a weak reference that lives as long as the graph's
        d = t.detach()
        saved.append(weakref.ref(d))
        return d

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = snn(x)
    params = {p.data_ptr() for p in snn.parameters()}
    activations = [w for w in saved if w() is not None and w().data_ptr() not in params]
    assert out.requires_grad and activations
    del out
    gc.collect()
    assert all(w() is None for w in activations)
    v = snn.neurons_[-1].v_final
    assert v is not None and v.grad_fn is None and v.shape[-2:] == x.shape[-2:]
    torch.nn.functional.mse_loss(snn(x), x).backward()
    assert all(p.grad is not None for p in snn.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["dncnn", "aodnet"])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_energy_ratio_estimate_matches_counted_sops(arch, neuron):
    """track_energy(): the differentiable estimate (spikes x fan-out, x 0.9 pJ over
    the ANN's MACs x 4.6 pJ) equals the SOP share of the counted energy up to
    the zero-padding border (the estimate counts every tap), and its gradient
    reaches the thresholds (surrogate gradients through the spike counts)."""
    ann, c = (tiny_dncnn(), 1) if arch == "dncnn" else (tiny_aodnet(), 3)
    x = images(c, n=1, size=40)[0]
    snn = to_snn(ann, [x], 4, neuron=neuron, backend="cpp").track_energy()
    with torch.no_grad():
        snn.record_stats()(x)
    counted = snn.stats["sops"] * 0.9 / (4.6 * sum(
        m[2] for m in conv_macs(ann, tuple(x.shape))))
    assert counted > 0.05  # the network does spike
    estimate = float(snn.energy_ratio)
    assert counted <= estimate <= counted * 1.25, (estimate, counted)
    snn.record_stats(False).train()
    snn(x)
    snn.energy_ratio.backward()
    grads = [n.theta.grad for n in snn.neurons()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    snn(x)  # energy_ratio in a live graph: deepcopy (AveragedModel, pickle) still works
    twin = copy.deepcopy(snn)
    assert twin.energy_ratio == snn.energy_ratio and not twin.energy_ratio.requires_grad
    snn.track_energy(False)
    snn(x)
    assert snn.energy_ratio is None


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_spike_total_equals_counting_every_element(per_channel, neuron):
    """The energy term's spike total (per-channel sums, then divided by the spike
    size) has the value and the gradients of dividing every element of
    ``theta * s`` (and ``beta * s`` on the reuse step) by its size; a channel
    with beta = 0 contributes no reuse spikes."""
    torch.manual_seed(3)
    snn = to_snn(tiny_dncnn(), images(1, n=1, size=13), 3, neuron=neuron, per_channel=per_channel)
    n = snn.neurons_[0]
    steps, C = snn.steps, n.theta.numel() if per_channel else 8
    with torch.no_grad():
        n.theta.uniform_(0.5, 2.0)
        if neuron == "mprn":
            n.beta.uniform_(0.5, 2.0)
            n.beta.view(-1)[0] = 0.0
    s = (torch.rand(steps, 2, C, 5, 7) < 0.3).double()

    def spike_values():  # theta * s, and beta * s on the reuse step
        size = [n.effective_theta()] * 3 + ([n.beta] if neuron == "mprn" else [])
        return torch.stack([s[t] * (z.view(-1, 1, 1) if per_channel else z)
                            for t, z in enumerate(size)])

    def reference(y):  # every element divided by its size
        th = n.effective_theta().reshape(-1, 1, 1) if per_channel else n.effective_theta()
        total = (y[:3] / th).sum()
        if neuron == "mprn":
            b = n.beta.reshape(-1, 1, 1) if per_channel else n.beta
            total = total + torch.where(b != 0, y[3] / torch.where(b != 0, b, 1.0), 0.0).sum()
        return total

    grads = []
    for fn in (reference, lambda y: snn._spike_total(n, y)):
        n.zero_grad()
        y = spike_values().detach().requires_grad_()
        total = fn(y)  # y is a leaf: theta and beta get the division's gradients only
        total.backward()
        grads.append((float(total.detach()), y.grad.clone(), n.theta.grad.clone(),
                      n.beta.grad.clone() if neuron == "mprn" else None))
    (v0, gy0, gt0, gb0), (v1, gy1, gt1, gb1) = grads
    assert v1 == pytest.approx(v0, rel=1e-6) and v0 > 0
    assert torch.allclose(gy1.double(), gy0.double(), rtol=1e-6)
    assert torch.allclose(gt1, gt0, rtol=1e-5, atol=1e-7)
    if neuron == "mprn":
        assert torch.allclose(gb1, gb0, rtol=1e-5, atol=1e-7)
        if per_channel:
            assert gb1.view(-1)[0] == 0


_GPU_BACKENDS = ([b for b in ("cuda", "triton") if b in ops.available_backends("cuda", op="spike_conv2d")]
                 if torch.cuda.is_available() else [])


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU_BACKENDS, reason="needs a CUDA GPU and a GPU backend")
@pytest.mark.parametrize("backend", _GPU_BACKENDS)
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_gpu_spike_conv_snn_matches_cpu(backend, neuron):
    """The whole SNN on the GPU (fused neurons emitting masks into the fused
    spike_conv2d, the MPRN reuse step through out=) gives the CPU dense SNN's
    output: on dyadic grids every sum is exact, so bit for bit."""
    snn, x = dyadic_snn(neuron, 4, seed=4)
    with torch.no_grad():
        ref = snn(x)
    snn.cuda()
    for n in snn.neurons():
        n.backend = backend
    outs = []
    for masks in (True, False):
        snn.use_spike_conv(True, backend=backend, masks=masks)
        with torch.no_grad():
            outs.append(snn(x.cuda()).cpu())
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], ref)
    # Parameters were checked on first sight: a second forward never waits for the
    # GPU (the host queues all of it; torch's sync debug mode raises otherwise).
    xc = x.cuda()
    for spike_conv in (True, False):  # fused conv from masks; cuDNN on float spikes
        snn.use_spike_conv(spike_conv, backend=backend, masks=True)
        with torch.no_grad():
            snn(xc)  # first sight of the parameters (after use_spike_conv)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                y = snn(xc)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(y.cpu(), ref)
    # ... so the forward can be captured in a CUDA graph and replayed (no host work
    # per op: benchmarks/bench_snn.py's "CUDA graph" columns)
    snn.use_spike_conv(True, backend=backend, masks=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            snn(xc)  # warm-up off the capture stream
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = snn(xc)
    y.zero_()
    graph.replay()
    assert torch.equal(y.cpu(), ref)


# ----------------------------------------------------------- AOD-Net DC offsets

def dc_aodnet(seed=0):
    """A small AOD-Net whose activations, like the trained one's, never reach zero."""
    m = tiny_aodnet(seed)
    for c in m.convs():
        c.weight.data.mul_(0.15)
        c.bias.data.uniform_(0.3, 0.6)
    return m


def test_offsets_are_the_low_activation_percentile():
    from spikingir.convert import calibrate_offsets
    ann, x = dc_aodnet(), images(3)
    offsets = calibrate_offsets(ann, x, 1.0, per_channel=True)
    with torch.no_grad():
        r, xs = torch.relu, torch.cat(x)
        x1 = r(ann.conv1(xs))
        x2 = r(ann.conv2(x1))
        x3 = r(ann.conv3(torch.cat([x1, x2], 1)))
        x4 = r(ann.conv4(torch.cat([x2, x3], 1)))
    for m, a in zip(offsets, (x1, x2, x3, x4)):
        expect = torch.quantile(a.transpose(0, 1).flatten(1), 0.01, dim=1)
        assert torch.allclose(m, expect, rtol=1e-6) and (m > 0).all()
    per_layer = calibrate_offsets(ann, x, 1.0)
    assert per_layer[2].dim() == 0 and per_layer[2] == pytest.approx(torch.quantile(x3.flatten(), 0.01).item())
    # thresholds are then the percentile of the activations less the offsets
    th = calibrate(ann, x, 99.0, per_channel=True, offsets=offsets)
    shifted = (x3 - offsets[2].view(1, -1, 1, 1)).transpose(0, 1).flatten(1)
    expect = torch.stack([torch.quantile(row[row > 0], 0.99) for row in shifted])  # positive ones
    assert torch.allclose(th[2], expect, rtol=1e-5)
    zero_often = tiny_aodnet()  # ReLU outputs that are zero more than 1 % of the time
    for c in zero_often.convs():
        c.bias.data.fill_(-0.5)
    assert all((m == 0).all() for m in calibrate_offsets(zero_often, x, 1.0, per_channel=True))
    for bad in (100.0, -1, "half", None):
        with pytest.raises(ValueError, match="offset percentile"):
            calibrate_offsets(ann, x, bad)
    with pytest.raises(ValueError, match="offset percentile"):
        to_snn(ann, x, 4, offset_percentile="half")
    with pytest.raises(ValueError, match="AOD-Net only"):
        to_snn(tiny_dncnn(), images(1), 4, offset_percentile=1.0)
    # "auto" (the default): offsets for AOD-Net at DEFAULT_OFFSET_PERCENTILE, none for DnCNN
    from spikingir.convert import DEFAULT_OFFSET_PERCENTILE
    auto = to_snn(ann, x, 4, per_channel=True).offset
    assert torch.equal(auto, torch.cat(calibrate_offsets(ann, x, DEFAULT_OFFSET_PERCENTILE, True)))
    assert (to_snn(ann, x, 4, per_channel=True, offset_percentile=None).offset == 0).all()


def test_offset_map_adds_back_the_offsets_exactly():
    """conv(x' + m) = conv(x') + conv(m), the image of constants m with zero padding,
    inside the image and at its border."""
    import torch.nn.functional as F
    snn = to_snn(dc_aodnet(), images(3), 4, per_channel=True, offset_percentile=1.0)
    g = torch.Generator().manual_seed(2)
    for conv, sl in ((snn.conv2.module, slice(0, 3)), (snn.conv4.module, slice(3, 9)),
                     (snn.mapper.conv, slice(0, 12))):
        xp = torch.rand(2, conv.in_channels, 13, 10, generator=g)
        m = snn.offset[sl].view(1, -1, 1, 1)
        lhs = F.conv2d(xp + m, conv.weight, conv.bias, conv.stride, conv.padding)
        rhs = conv(xp) + snn._offset_map(conv, sl, xp.shape)
        assert torch.allclose(lhs, rhs, atol=1e-5)


def test_offsets_spend_fewer_spikes_for_a_closer_output():
    """On a network whose channels never reach zero, offsets lower the firing rate
    and bring the SNN closer to the ANN; the energy counts the offset maps' border
    MACs (brute force: outputs whose window reaches into the padding)."""
    import torch.nn.functional as F
    ann, x = dc_aodnet(), images(3)
    plain = to_snn(ann, x, 8, per_channel=True, v0="half", offset_percentile=None).record_stats()
    shifted = to_snn(ann, x, 8, per_channel=True, v0="half", offset_percentile=1.0).record_stats()
    with torch.no_grad():
        ref = ann(x[0])
        err_plain = (plain(x[0]) - ref).abs().mean()
        err_shift = (shifted(x[0]) - ref).abs().mean()
        rates = plain.firing_rate(), shifted.firing_rate()
        assert err_shift < err_plain and rates[1] < 0.8 * rates[0], (err_shift, err_plain, rates)
        shifted.timesteps = 256
        assert (shifted(x[0]) - ref).abs().mean() < 0.05
    shifted.timesteps = 8
    with torch.no_grad():
        shifted(torch.cat([x[0], x[1]]))
    expect = 0
    for conv, sl in ((shifted.conv2.module, slice(0, 3)), (shifted.conv3.module, slice(0, 6)),
                     (shifted.conv4.module, slice(3, 9)), (shifted.mapper.conv, slice(0, 12))):
        k = conv.kernel_size[0]
        reach = F.conv2d(torch.ones(1, 1, 24, 24), torch.ones(1, 1, k, k), padding=conv.padding)
        border = int((reach < k * k).sum())
        expect += 2 * border * conv.out_channels * int(torch.count_nonzero(shifted.offset[sl])) * k * k
    assert shifted.stats["offset_macs"] == expect > 0
    st = shifted.stats
    assert shifted.energy_mj() == pytest.approx(
        (st["first_layer_macs"] + st["readout_macs"] + expect) * E_MAC_PJ * 1e-9 + st["sops"] * E_SOP_PJ * 1e-9)


def test_offsets_save_and_load(tmp_path):
    snn = to_snn(dc_aodnet(), images(3), 3, per_channel=True, offset_percentile=1.0)
    save_snn(snn, tmp_path / "aod.pt")
    back = load_snn(tmp_path / "aod.pt")
    x = images(3)[0]
    with torch.no_grad():
        assert torch.equal(back.offset, snn.offset) and torch.equal(back(x), snn(x))
    # a file saved before offsets existed loads with none
    obj = torch.load(tmp_path / "aod.pt", weights_only=True)
    del obj["state_dict"]["offset"]
    torch.save(obj, tmp_path / "old.pt")
    assert (load_snn(tmp_path / "old.pt").offset == 0).all()
    with pytest.raises(ValueError, match="offset"):
        type(snn)([c for c in AODNet().convs()], list(snn.neurons_), 3, offset=-torch.ones(12))


def test_load_shipped_snn_is_ready_for_inference():
    from spikingir.models.spiking import SpikingAODNet, SpikingDnCNN
    from spikingir.pipeline import load_shipped_snn
    snn = load_shipped_snn("denoise", 25, timesteps=4)
    assert isinstance(snn, SpikingDnCNN) and snn.timesteps == 4 and snn.spike_conv
    assert not snn.training
    assert isinstance(load_shipped_snn("dehaze", timesteps=2), SpikingAODNet)
    with pytest.raises(ValueError, match="sigma"):
        load_shipped_snn("denoise", 30)
    with pytest.raises(ValueError, match="timesteps"):
        load_shipped_snn("denoise", 25, timesteps=0)


@pytest.mark.parametrize("arch", ["dncnn", "aodnet"])
def test_restore_is_the_network_on_the_image(arch):
    """pipeline.restore: the network's output on the image (tiled or whole), in the
    image's layout; a gray image is replicated for AOD-Net; wrong layouts raise."""
    import numpy as np
    from spikingir.pipeline import restore
    ann, c = (tiny_dncnn(), 1) if arch == "dncnn" else (tiny_aodnet(), 3)
    snn = to_snn(ann, images(c, n=1), 3)
    img = np.random.default_rng(0).random((19, 23) if c == 1 else (19, 23, 3)).astype(np.float32)
    x = torch.from_numpy(img)[None, None] if c == 1 else torch.from_numpy(img).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = snn(x)[0]
    ref = ref[0].numpy() if c == 1 else ref.permute(1, 2, 0).numpy()
    for tile in (0, 8):
        out = restore(img, snn, tile=tile)
        assert out.shape == img.shape and np.allclose(out, ref, atol=1e-6)
    if c == 3:
        gray = img.mean(2)
        assert np.allclose(restore(gray, snn), restore(np.repeat(gray[..., None], 3, 2), snn))
    else:
        with pytest.raises(ValueError, match="1 channel"):
            restore(np.zeros((8, 8, 3), np.float32), snn)
    with pytest.raises(TypeError, match="float numpy"):
        restore((img * 255).astype(np.uint8), snn)


def test_restore_per_channel_is_each_channel_as_gray():
    """restore(colour="per-channel"): a grayscale network restores an H x W x 3
    image's channels as one batch of three: each channel as restored alone (whole
    or in tiles), the 8-bit image bit for bit; the floats up to float32 rounding
    (oneDNN's float32 convolutions, the SNN's read-out and the ANN's, can round a
    batch of three apart from one image by an ulp; the spikes are the same); a
    gray image is restored as without it; without it an RGB image is refused with
    the hint; a colour network and an unknown mode raise."""
    import numpy as np
    from spikingir.metrics import to_uint8
    from spikingir.pipeline import for_inference, restore
    ann = tiny_dncnn()
    snn = for_inference(to_snn(ann, images(1, n=1), 3))
    img = np.random.default_rng(0).random((19, 23, 3)).astype(np.float32)
    for net in (snn, ann):
        want = np.stack([restore(np.ascontiguousarray(img[..., c]), net, tile=0)
                         for c in range(3)], -1)
        for tile in (0, 8):
            out = restore(img, net, tile=tile, colour="per-channel")
            assert out.shape == img.shape and out.dtype == np.float32
            np.testing.assert_allclose(out, want, atol=1e-6, rtol=0)
            np.testing.assert_array_equal(to_uint8(out), to_uint8(want))
    gray = np.ascontiguousarray(img[..., 1])
    np.testing.assert_array_equal(restore(gray, snn, colour="per-channel"), restore(gray, snn))
    with pytest.raises(ValueError, match="colour='per-channel' restores each channel"):
        restore(img, snn)
    colour_net = DnCNN(depth=3, channels=4, image_channels=3, batchnorm=False).eval()
    with pytest.raises(ValueError, match="takes 3 channels"):
        restore(img, colour_net, colour="per-channel")
    with pytest.raises(ValueError, match="takes 3 channels"):
        restore(img, tiny_aodnet(), colour="per-channel")
    with pytest.raises(ValueError, match="colour: expected None or 'per-channel'"):
        restore(img, snn, colour="rgb")


def test_denoise_samples_in_colour(tmp_path):
    """denoise_samples(colour="per-channel"): an RGB file keeps its three channels,
    with the protocol's noise drawn over H x W x 3 at seed 0, its input the noisy
    channels as a batch [3, 1, H, W]; a gray file stays gray; the built-in photos
    keep their own kind. Without it an RGB file is refused, naming --colour."""
    import numpy as np
    from PIL import Image
    from spikingir.data import add_gaussian_noise
    from spikingir.pipeline import denoise_samples
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (14, 17, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    c, g = denoise_samples(25, tmp_path, colour="per-channel")
    assert c.clean.shape == (14, 17, 3) and np.array_equal(c.clean, rgb / np.float32(255))
    noisy = add_gaussian_noise(c.clean, 25, seed=0)
    assert c.inputs.shape == (3, 1, 14, 17)
    assert torch.equal(c.inputs[:, 0], torch.from_numpy(noisy).permute(2, 0, 1))
    assert g.clean.shape == (14, 17) and g.inputs.shape == (1, 1, 14, 17)
    with pytest.raises(ValueError, match="c.png: an RGB image .*--colour per-channel"):
        denoise_samples(25, tmp_path)
    with pytest.raises(ValueError, match="colour: expected None or 'per-channel'"):
        denoise_samples(25, tmp_path, colour="luma")
    built_in = {s.name: s for s in denoise_samples(25, crop=16, colour="per-channel")}
    assert built_in["camera"].clean.shape == (16, 16)            # a gray photo
    assert built_in["astronaut"].inputs.shape == (3, 1, 16, 16)  # a colour one


def test_samples_and_calibration_for_a_colour_model(tmp_path):
    """channels=3 (a colour model): denoise_samples gives every image in RGB, input
    [1, 3, H, W] with the protocol's seed-0 noise over H x W x 3, a gray file (and
    the built-in camera) replicated before the noise; calibration_inputs RGB crops;
    input_channels reads 3 from the ANN and from its SNN. Per-channel colour with a
    colour model, and other counts, raise."""
    import numpy as np
    from PIL import Image
    from spikingir.data import add_gaussian_noise
    from spikingir.pipeline import calibration_inputs, denoise_samples, input_channels
    rgb = np.random.default_rng(0).integers(0, 256, (14, 17, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    c, g = denoise_samples(25, tmp_path, channels=3)
    assert c.clean.shape == g.clean.shape == (14, 17, 3)
    noisy = add_gaussian_noise(rgb / np.float32(255), 25, seed=0)
    assert c.inputs.shape == (1, 3, 14, 17)
    assert torch.equal(c.inputs[0], torch.from_numpy(noisy).permute(2, 0, 1))
    assert np.array_equal(g.clean, np.repeat(rgb[..., :1], 3, 2) / np.float32(255))
    assert {s.clean.shape for s in denoise_samples(25, crop=16, channels=3)} == {(16, 16, 3)}
    assert [tuple(x.shape) for x in calibration_inputs("denoise", 25, crop=16, channels=3)] == \
        [(1, 3, 16, 16)] * 4
    with pytest.raises(ValueError, match="a colour model .channels=3. takes the RGB images"):
        denoise_samples(25, tmp_path, colour="per-channel", channels=3)
    for bad in (2, 4, True):
        with pytest.raises(ValueError, match="channels: expected 1 .* or 3"):
            denoise_samples(25, tmp_path, channels=bad)
    ann = DnCNN(depth=3, channels=4, image_channels=3, batchnorm=False).eval()
    assert input_channels(ann) == 3
    assert input_channels(to_snn(ann, calibration_inputs("denoise", 25, crop=16, channels=3),
                                 2)) == 3
    assert input_channels(tiny_dncnn()) == 1


# ------------------------------------------------------------ layer calibration

def _output_mse(snn, ann, xs):
    with torch.no_grad():
        return sum(float(((snn(x) - ann(x)) ** 2).mean()) for x in xs) / len(xs)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["bias", "weights"])
def test_layer_calibration_brings_the_snn_closer_to_the_ann(method, per_channel):
    ann = tiny_dncnn()
    calib, held_out = images(1, n=4, size=20), images(1, n=3, size=20, seed=7)
    plain = to_snn(ann, calib, 4, per_channel=per_channel)
    cal = to_snn(ann, calib, 4, per_channel=per_channel, layer_calibration=method)
    before, after = _output_mse(plain, ann, held_out), _output_mse(cal, ann, held_out)
    assert after < 0.2 * before, (before, after)  # measured: 0.03-0.05
    # thresholds are conversion's; bias-only calibration leaves the weights alone
    for a, b in zip(plain.neurons(), cal.neurons()):
        assert torch.equal(a.theta, b.theta)
    if method == "bias":
        for a, b in zip(plain.modules(), cal.modules()):
            if isinstance(a, torch.nn.Conv2d):
                assert torch.equal(a.weight, b.weight)


def test_bias_correction_zeroes_the_mean_error_of_the_first_layer():
    """The first layer sees the image, as the ANN's does: after the correction its
    per-channel mean rate equals the ANN activation's mean (iterated, as clipping at
    0 makes one step fall short; thresholds at the maximum, as saturated neurons
    cannot follow a higher bias)."""
    ann, calib = tiny_dncnn(), images(1, n=4, size=20)

    def first_layer_error(snn):
        with torch.no_grad():
            err = 0
            for x in calib:
                cur = snn.conv1(x).unsqueeze(0).expand(snn.steps, -1, -1, -1, -1)
                y = snn.neurons_[0](cur)
                err = err + (torch.relu(ann.convs()[0](x)) - y.sum(0) / snn.timesteps).mean((0, 2, 3))
            return (err / len(calib)).abs().max().item()

    snn = to_snn(ann, calib, 4, percentile=100)
    before = first_layer_error(snn)
    calibrate_layers(snn, ann, calib, method="bias")
    assert first_layer_error(snn) < 0.1 * before, before


@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_layer_calibration_equals_calibrating_after_conversion(neuron):
    ann, calib = tiny_dncnn(batchnorm=True), images(1, n=3, size=16)  # both fold the BN
    a = to_snn(ann, calib, 3, neuron=neuron, layer_calibration="weights")
    b = calibrate_layers(to_snn(ann, calib, 3, neuron=neuron), ann, calib, method="weights")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, rtol=1e-5, atol=1e-6), ka


@pytest.mark.parametrize("method", ["bias", "weights"])
def test_layer_calibration_reads_each_images_own_residual(method):
    """The read-out's recycled residual is each image's own: calibrating on a
    list of images equals calibrating on them as one batch (it once read the
    last image's residual for every image: a crash on images of different
    sizes, a silently different fit otherwise), and mixed sizes work."""
    ann, calib = tiny_dncnn(), images(1, n=3, size=16)
    listed = to_snn(ann, calib, 3, layer_calibration=method)
    batched = to_snn(ann, torch.cat(calib), 3, layer_calibration=method)
    for (ka, va), (kb, vb) in zip(listed.state_dict().items(), batched.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, rtol=1e-5, atol=1e-6), ka
    mixed = [calib[0], torch.rand(1, 1, 20, 12, generator=torch.Generator().manual_seed(4))]
    snn = to_snn(ann, mixed, 3, layer_calibration=method)
    with torch.no_grad():
        assert snn(mixed[1]).shape == mixed[1].shape


def test_layer_calibration_keeps_spike_conv_mode():
    ann, calib = tiny_dncnn(), images(1, n=2, size=16)
    snn = to_snn(ann, calib, 3).use_spike_conv(True, backend="torch", masks=False)
    calibrate_layers(snn, ann, calib)
    assert snn.spike_conv and snn.spike_conv_backend == "torch" and not snn.spike_masks
    assert not any(n.scale_output for n in snn.neurons_[:len(snn.hidden)])
    dense = to_snn(ann, calib, 3, layer_calibration="weights")
    with torch.no_grad():
        torch.testing.assert_close(snn(calib[0]), dense(calib[0]), rtol=1e-4, atol=1e-5)


def test_bad_conversion_and_restore_arguments_are_clear_errors():
    """Checked where they enter, not at the SNN's first forward: the neuron
    options, the ANN, non-finite calibration images; restore()'s image and
    network; nearest_sigma and evaluate's timesteps."""
    import numpy as np
    from spikingir.pipeline import denoise_samples, nearest_sigma, restore
    ann, calib = tiny_dncnn(), images(1, n=1, size=16)
    for kw, match in ((dict(surrogate="foo"), "surrogate: expected one of"),
                      (dict(alpha=-1.0), "alpha: expected a finite number > 0"),
                      (dict(alpha=float("nan")), "alpha: expected a finite number > 0"),
                      (dict(reuse_alpha=2.0), r"reuse_alpha: expected a number in \(0.5, 1\]"),
                      (dict(backend="fast"), "backend: expected 'auto' or one of")):
        with pytest.raises(ValueError, match=match):
            to_snn(ann, calib, 2, **kw)
    with pytest.raises(TypeError, match="ann: expected a trained nn.Module"):
        to_snn(None, calib, 2)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or inf"):
            to_snn(ann, [calib[0], torch.full((1, 1, 8, 8), value)], 2)
    snn = to_snn(ann, calib, 2)
    for image in (np.zeros(5, np.float32), np.zeros((1, 2, 3, 4), np.float32),
                  np.zeros((0, 5), np.float32)):
        with pytest.raises(ValueError, match="expected an H x W or H x W x C image"):
            restore(image, snn)
    with pytest.raises(ValueError, match="has no Conv2d layer"):
        restore(np.zeros((8, 8), np.float32), torch.nn.Identity())
    with pytest.raises(TypeError, match="as an nn.Module"):
        restore(np.zeros((8, 8), np.float32), None)
    with pytest.raises(ValueError, match="finite noise level"):
        nearest_sigma(float("inf"))
    assert nearest_sigma(np.float32(24.0)) == 25
    samples = denoise_samples(25, crop=32)[:1]
    for bad in ([2.5], [0], [], [True]):
        with pytest.raises(ValueError, match="timesteps: expected ints >= 1"):
            evaluate("denoise", ann, snn, samples, bad, sigma=25)
    batch = [Sample("b", torch.rand(2, 3, 16, 16), np.zeros((16, 16, 3), np.float32))]
    with pytest.raises(ValueError, match=r"b: inputs: expected \[1, C, H, W\]"):
        evaluate("denoise", ann, snn, batch, [2], sigma=25)  # not one image


def test_bad_layer_calibration_arguments():
    ann, calib = tiny_dncnn(), images(1, n=2, size=16)
    snn = to_snn(ann, calib, 2)
    with pytest.raises(ValueError, match="method: expected 'bias' or 'weights'"):
        calibrate_layers(snn, ann, calib, method="all")
    with pytest.raises(ValueError, match="bias_iters"):
        calibrate_layers(snn, ann, calib, bias_iters=-1)
    with pytest.raises(ValueError, match="do not match"):
        calibrate_layers(snn, DnCNN(depth=6, channels=8, batchnorm=False), calib)
    with pytest.raises(ValueError, match="at least one image"):
        calibrate_layers(snn, ann, [])
    with pytest.raises(ValueError, match=r"expected \[B, 1, H, W\] tensors, got \(1, 3, 16, 16\)"):
        calibrate_layers(snn, ann, [torch.rand(1, 3, 16, 16)])
    with pytest.raises(TypeError, match="expected the DnCNN"):
        calibrate_layers(snn, tiny_aodnet(), calib)
    aod = tiny_aodnet()
    with pytest.raises(TypeError, match="expected a SpikingDnCNN"):
        calibrate_layers(to_snn(aod, images(3, n=2, size=16), 2), ann, calib)
    with pytest.raises(ValueError, match="layer_calibration: not for AOD-Net"):
        to_snn(aod, images(3, n=2, size=16), 2, layer_calibration="weights")
    other = copy.deepcopy(ann)  # the same layers, other weights: not the ANN converted
    with torch.no_grad():
        other.convs()[-1].weight.mul_(2)
    with pytest.raises(ValueError, match="other weights than the ANN it was converted from"):
        calibrate_layers(snn, other, calib)
    with pytest.raises(ValueError, match="layer_calibration: expected"):
        to_snn(ann, calib, 2, layer_calibration="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_calibration_on_the_gpu_matches_the_cpu():
    """calibrate_layers runs where the SNN is: on a GPU it gives the CPU's network
    (least squares in float64 on both; spikes may flip at a few threshold ties)."""
    ann, calib = tiny_dncnn(), images(1, n=3, size=20)
    cpu = calibrate_layers(to_snn(ann, calib, 4), ann, calib)
    gpu = calibrate_layers(to_snn(ann, calib, 4).cuda(), ann.cuda(), [x.cuda() for x in calib])
    x = images(1, n=1, size=20, seed=5)[0]
    with torch.no_grad():
        a, b = cpu(x), gpu(x.cuda()).cpu()
    assert (a - b).abs().mean() < 1e-3, (a - b).abs().max()


# ------------------------------------------------------------ mapper refit

def test_refit_mapper_is_the_least_squares_optimum():
    """After the refit, the squared error on the fitting pairs is below the
    converted mapper's and below any small perturbation of the refitted one
    (a least-squares optimum, ridge aside); only the mapper changes; T is kept."""
    from spikingir.finetune import refit_mapper
    ann = tiny_dncnn()
    clean = images(1, n=3, size=20, seed=3)
    g = torch.Generator().manual_seed(4)
    noisy = [c + 0.1 * torch.randn(c.shape, generator=g) for c in clean]
    snn = to_snn(ann, noisy, 4)
    before = {k: v.clone() for k, v in snn.state_dict().items()}

    def sse(net):
        with torch.no_grad():
            return sum(float(((net(x) - c) ** 2).sum()) for x, c in zip(noisy, clean))

    converted = sse(snn)
    refit_mapper(snn, noisy, clean, ridge=1e-9)
    assert snn.timesteps == 4
    fitted = sse(snn)
    assert fitted < converted
    for k, v in snn.state_dict().items():
        assert torch.equal(v, before[k]) != k.startswith("mapper."), k
    w = snn.mapper.conv.weight
    for _ in range(3):
        delta = 1e-3 * torch.randn(w.shape, generator=g)
        with torch.no_grad():
            w += delta
            assert sse(snn) >= fitted * (1 - 1e-6)
            w -= delta


def test_refit_mapper_rejects_bad_input():
    from spikingir.finetune import refit_mapper
    snn = to_snn(tiny_dncnn(), images(1, n=1), 2)
    x = images(1, n=1)
    with pytest.raises(ValueError, match="as many clean as noisy"):
        refit_mapper(snn, x, [])
    with pytest.raises(ValueError, match="\\[B, 1, H, W\\] tensors of equal shape"):
        refit_mapper(snn, x, [torch.rand(1, 1, 5, 5)])
    with pytest.raises(TypeError, match="expected a SpikingDnCNN or SpikingChain"):
        refit_mapper(to_snn(tiny_aodnet(), images(3, n=1), 2), x, x)


@pytest.mark.skipif(not ops.HAS_CPP_OPS, reason="spikingir._C not built")
def test_export_with_dynamic_height_and_width():
    """A per-channel SNN exports with symbolic H and W (its neuron ops take the
    spatial size as a SymInt; as an int it was fixed: "Constraints violated (H)"),
    and the exported program on another size equals the eager SNN."""
    from torch.export import Dim
    snn = to_snn(tiny_dncnn(), images(1, n=1, size=16), 2, per_channel=True)
    snn.requires_grad_(False)
    dims = {2: Dim("H", min=8, max=256), 3: Dim("W", min=8, max=256)}
    ep = torch.export.export(snn, (torch.rand(1, 1, 12, 12),), dynamic_shapes={"x": dims})
    x = torch.rand(1, 1, 20, 17)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), snn(x), atol=1e-5)
