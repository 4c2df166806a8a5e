"""Converting your own CNN: nn.Sequential conv chains (spikingir.models.chain)
through to_snn, layer calibration, spike_conv2d, energy, save / load."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from spikingir.convert import calibrate_layers, to_snn
from spikingir.energy import ann_macs
from spikingir.models import ConvChain, DnCNN, Residual, conv_chain
from spikingir.models.spiking import SpikingChain, SpikingDnCNN
from spikingir.pipeline import for_inference, load_snn, save_snn

from helpers import dyadic_network_, randomise_bn

torch.set_num_threads(1)


def odd_body(seed=0):
    """Every layer kind the chain form accepts: nesting, a BN after a bias-free
    conv, in-place ReLU, dropout (skipped), padding='same', 1x1 and 5x5 kernels,
    uneven widths."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(12, 10, 5, padding=2, bias=False), nn.BatchNorm2d(10), nn.ReLU()),
        nn.Conv2d(10, 8, 1), nn.Dropout2d(0.2), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding="same"), nn.Identity(), nn.ReLU(),
        nn.Conv2d(12, 1, 3, padding=1))
    return randomise_bn(body, seed).eval()


def strided_chain(seed=0):
    """Not residual, not size-preserving: a stride-2 conv, a 2x2 kernel (no
    spike_conv2d kernel: stays dense), a dilated conv, 3 output channels."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 3, 3, padding=1)).eval()


def images(n=3, size=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 1, size, size, generator=g) for _ in range(n)]


@pytest.mark.parametrize("subtract", [None, True, False])
def test_chain_form_computes_the_network(subtract):
    body = odd_body()
    ann = (body if subtract is None else Residual(body, subtract=subtract)).eval()
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    chain = conv_chain(ann)
    assert isinstance(chain, ConvChain) and chain.residual == (subtract is not None)
    assert [c.padding for c in chain.convs()] == [(1, 1), (2, 2), (0, 0), (1, 1), (1, 1)]
    assert all(c.bias is not None for c in chain.convs())
    x = torch.rand(2, 1, 17, 14)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), ann(x), rtol=1e-5, atol=1e-5)
    after = ann.state_dict()  # the caller's model untouched (BN folded into copies)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dncnn_converts_as_the_same_chain():
    """to_snn(DnCNN) and to_snn(Residual(dncnn.dncnn)) are one conversion: the
    same thresholds, weights and outputs, bit for bit."""
    torch.manual_seed(0)
    ann = randomise_bn(DnCNN(depth=5, channels=8, batchnorm=True)).eval()
    calib = images()
    a = to_snn(ann, calib, 4)
    b = to_snn(Residual(ann.dncnn), calib, 4)
    assert type(a) is SpikingDnCNN and type(b) is SpikingChain and b.residual
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    with torch.no_grad():
        assert torch.equal(a(calib[0]), b(calib[0]))


@pytest.mark.parametrize("make", [lambda: Residual(odd_body()), strided_chain])
def test_chain_snn_approaches_its_ann(make):
    ann, calib = make(), images(n=4)
    x = images(n=1, seed=9)[0]
    with torch.no_grad():
        want = ann(x)
        errs = []
        for T in (4, 64):
            snn = to_snn(ann, calib, T, neuron="if")
            out = snn(x)
            assert out.shape == want.shape
            errs.append(float((out - want).abs().mean()))
    assert errs[1] < 0.25 * errs[0], errs
    assert errs[1] < 0.05 * float(want.abs().mean()), errs


def _dyadic(snn, x):
    """The SNN and input moved onto dyadic grids (weights, biases and input on a
    1/16 grid, thresholds powers of two, beta = theta / 2): every potential is
    exact, so the dense and spike_conv2d paths cannot flip a spike on any CPU."""
    dyadic_network_(snn.convs(), snn.neurons())
    return snn, (x * 16).round() / 16


@pytest.mark.parametrize("make", [lambda: Residual(odd_body()), strided_chain])
@pytest.mark.parametrize("neuron", ["if", "mprn"])
def test_chain_snn_on_spike_conv_save_load_and_energy(make, neuron, tmp_path):
    ann, calib = make(), images(n=2)
    snn, x = _dyadic(to_snn(ann, calib, 5, neuron=neuron), images(n=1, seed=5)[0])
    with torch.no_grad():
        dense = snn(x)
        path = tmp_path / "chain.pt"
        save_snn(snn, path, extra={"note": "test"})
        back = load_snn(path)
        assert type(back) is SpikingChain and back.residual == snn.residual
        assert torch.equal(back(x), dense)
        for_inference(back, backend="cpp")  # eligible hidden convs on spike_conv2d, the rest dense
        torch.testing.assert_close(back(x), dense, rtol=1e-4, atol=1e-5)
    eligible = [n.scale_output is False for n in back.neurons_[:len(back.hidden)]]
    hidden = [h.module for h in back.hidden]
    assert eligible == [c.kernel_size[0] in (1, 3, 5) and c.dilation == (1, 1) for c in hidden]
    # the energy normaliser is the ANN's MACs, each conv at its own input size
    assert snn._ann_macs(x) == ann_macs(ann, tuple(x.shape))
    snn.track_energy(True)
    y = snn(x)
    assert snn.energy_ratio > 0
    y.square().mean().backward()  # fine-tuning reaches every parameter
    assert all(p.grad is not None for p in snn.parameters() if p.requires_grad)
    with torch.no_grad():
        back.record_stats()(x)
    assert 0 < back.firing_rate() < 1  # the comparisons saw spikes, not silence


@pytest.mark.parametrize("make", [lambda: Residual(odd_body(), subtract=False), strided_chain])
@pytest.mark.parametrize("method", ["bias", "weights"])
def test_layer_calibration_of_a_chain(method, make):
    """x + body(x): the sign lives in the mapper and is fitted as such; the
    strided chain: the fit's im2col follows stride, dilation and a 2x2 kernel."""
    ann = make()
    calib, held_out = images(n=4), images(n=3, seed=7)
    plain = to_snn(ann, calib, 4)
    cal = to_snn(ann, calib, 4, layer_calibration=method)

    def mse(snn):
        with torch.no_grad():
            return sum(float(((snn(x) - ann(x)) ** 2).mean()) for x in held_out)

    assert mse(cal) < 0.5 * mse(plain), (mse(plain), mse(cal))
    with pytest.raises(ValueError, match="do not match"):
        calibrate_layers(to_snn(ann, calib, 2), Residual(odd_body()) if make is strided_chain
                         else strided_chain(), calib)


def test_chain_snn_finetunes_and_evaluates(tmp_path):
    """The Python workflow for your own denoiser: convert, fine-tune on an image
    folder, evaluate against the ANN (the --json report's format)."""
    from spikingir.evaluate import evaluate
    from spikingir.finetune import finetune_snn
    from spikingir.pipeline import denoise_samples
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
    ann = Residual(odd_body())
    snn = to_snn(ann, images(n=2), 3, backend="cpp")
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    finetune_snn(snn, "denoise", sigma=25, data=tmp_path, val_data=tmp_path, steps=2, batch_size=2,
                 val_crop=32, progress=False, log=lambda _: None)
    assert any(not torch.equal(before[k], v) for k, v in snn.state_dict().items())
    report = evaluate("denoise", ann, snn, denoise_samples(25, tmp_path, crop=32), [2, 3], sigma=25)
    assert [r["timesteps"] for r in report["snn"]] == [2, 3]
    assert report["ann"]["energy_mj"] > 0 and all(0 < r["firing_rate"] < 1 for r in report["snn"])


def test_saved_chain_snn_records_its_ann(tmp_path, capsys):
    """to_snn notes the ANN's fingerprint and save_snn keeps it, so the CLI can
    say when a saved SNN is compared with an ANN it was not converted from."""
    from spikingir.cli import main
    from spikingir.pipeline import ann_fingerprint
    ann = Residual(odd_body())
    snn = to_snn(ann, images(n=1), 2)
    assert snn.meta == {"ann_fingerprint": ann_fingerprint(ann)}
    path = tmp_path / "snn.pt"
    save_snn(snn, path, extra={"note": "mine"})
    assert load_snn(path).meta == {"ann_fingerprint": ann_fingerprint(ann), "note": "mine"}
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint8)).save(
        folder / "a.png")
    code = main(["evaluate", "--task", "denoise", "--sigma", "25", "--snn-weights", str(path),
                 "--data", str(folder), "--timesteps", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "was converted from another ANN than the shipped ANN" in err


def test_refit_mapper_of_a_plain_chain():
    """Without the skip the mapper's target is the clean image itself (here of
    the strided chain's output shape): a least-squares optimum after the refit."""
    from spikingir.finetune import refit_mapper
    ann, xs = strided_chain(), images(n=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        targets = [ann(x) + 0.05 * torch.randn(ann(x).shape, generator=g) for x in xs]
    snn = to_snn(ann, xs, 4)

    def sse():
        with torch.no_grad():
            return sum(float(((snn(x) - c) ** 2).sum()) for x, c in zip(xs, targets))

    converted = sse()
    refit_mapper(snn, xs, targets, ridge=1e-9)
    fitted = sse()
    assert fitted < converted
    with torch.no_grad():
        delta = 1e-3 * torch.randn(snn.mapper.conv.weight.shape, generator=g)
        snn.mapper.conv.weight += delta
        assert sse() >= fitted * (1 - 1e-6)
    with pytest.raises(ValueError, match="the SNN returns"):
        refit_mapper(snn, xs, xs)  # clean images of the input's shape, not the output's


def _seq(*layers):
    return nn.Sequential(*layers)


@pytest.mark.parametrize("model, error, match", [
    (_seq(nn.Conv2d(1, 4, 3), nn.LeakyReLU(), nn.Conv2d(4, 1, 3)), ValueError,
     r"layer 1 \(LeakyReLU\) is not supported"),
    (_seq(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3), nn.ReLU()), ValueError,
     "ends with the activation 3"),
    (_seq(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3)), ValueError,
     r"layer 0 \(BatchNorm2d\): expected a Conv2d"),
    (_seq(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 1, 1)),
     ValueError, "2: grouped convolutions"),
    (_seq(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(4, 1, 3)),
     ValueError, "padding_mode='reflect'"),
    (_seq(nn.Conv2d(1, 4, 3), nn.ReLU()), ValueError, "ends with the activation"),
    (_seq(nn.Conv2d(1, 4, 3)), ValueError, "at least two Conv2d"),
    (_seq(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(5, 1, 3)), ValueError,
     "4 outputs feeds one with 5 inputs"),
    (_seq(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
          nn.Conv2d(4, 1, 3)), ValueError, r"layer 1 \(BatchNorm2d\) has no running statistics"),
    (_seq(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(4, 1, 3)), ValueError,
     r"layer 1 \(BatchNorm2d\): expected 4 features \(its conv's outputs\), got 2"),
    (Residual(_seq(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))), ValueError,
     "returns 2 channels for 1 input channels"),
    (_seq(nn.Conv2d(1, 4, 4, padding="same"), nn.ReLU(), nn.Conv2d(4, 1, 3)), ValueError,
     "even kernel extent"),
    (Residual(nn.Conv2d(1, 1, 3)), TypeError, "got Conv2d"),
    (nn.ModuleList([nn.Conv2d(1, 1, 3)]), TypeError, "expected a DnCNN, an AODNet, an nn.Sequential"),
])
def test_unconvertible_chains_name_the_layer(model, error, match):
    with pytest.raises(error, match=match):
        to_snn(model, images(n=1), 4)


def small_snn(**kw):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
    return Residual(body).eval(), to_snn(Residual(body).eval(), torch.rand(2, 1, 16, 16), 4, **kw)


def test_snn_in_half_and_double():
    """An SNN cast with .half() runs on spike_conv2d from masks too; restore()
    feeds a .double() network double images."""
    import copy
    from spikingir.pipeline import restore
    _, snn = small_snn()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        ref = for_inference(copy.deepcopy(snn))(x)
        half = for_inference(copy.deepcopy(snn)).half()(x.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=5e-3, rtol=0)
    img = np.random.default_rng(0).random((24, 24))
    torch.testing.assert_close(torch.from_numpy(restore(img, copy.deepcopy(snn).double())),
                               torch.from_numpy(restore(img, snn)), atol=1e-5, rtol=0)


def test_per_channel_alpha_saves_and_loads(tmp_path):
    _, snn = small_snn(per_channel=True, alpha=torch.linspace(2.0, 5.0, 8))
    save_snn(snn, tmp_path / "a.pt")
    back = load_snn(tmp_path / "a.pt")
    assert torch.equal(back.neurons_[0].alpha, torch.linspace(2.0, 5.0, 8))
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), snn(x))
    with pytest.raises(ValueError, match="task: expected None, 'denoise' or 'dehaze'"):
        load_snn(tmp_path / "a.pt", task="deblur")


def test_to_snn_calibration_input_types():
    """numpy calibration images are taken, integer ones refused (unscaled uint8
    would give thresholds ~255x too high); numpy integer timesteps taken, bool not."""
    ann, snn = small_snn()
    calib = torch.rand(2, 1, 16, 16)
    twin = to_snn(ann, calib.numpy(), np.int64(4))
    assert twin.timesteps == 4 and isinstance(twin.timesteps, int)
    with pytest.raises(TypeError, match=r"float images in \[0, 1\].*uint8"):
        to_snn(ann, (calib * 255).to(torch.uint8), 4)
    with pytest.raises(ValueError, match="timesteps: expected an int"):
        to_snn(ann, calib, True)


def test_restore_layout_and_tile_checks():
    from spikingir.pipeline import restore
    _, snn = small_snn()
    img = np.random.default_rng(0).random((20, 20))
    assert restore(img[..., None], snn).shape == (20, 20, 1)
    assert restore(img, snn).shape == (20, 20)
    for tile in (-1, 3.5, True):
        with pytest.raises(ValueError, match="tile: expected None or an int >= 0"):
            restore(img, snn, tile=tile)


def test_evaluate_and_finetune_leave_the_networks_as_they_were(tmp_path):
    """evaluate restores the train/eval modes, the stats switch and the spike-conv
    setting (also after amp); finetune_snn restores the mapper's requires_grad and
    the energy-tracking switch, and asks for sigma when denoising."""
    from spikingir.evaluate import evaluate
    from spikingir.finetune import finetune_snn
    from spikingir.pipeline import denoise_samples
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(tmp_path / f"t{i}.png")
    ann, snn = small_snn()
    ann.train()
    ann.body[1].eval()
    snn.train().record_stats(True).use_spike_conv(True, backend="torch", masks=False)
    samples = denoise_samples(25, tmp_path, crop=16)
    for amp in (False, True):
        evaluate("denoise", ann, snn, samples, [2], sigma=25, amp=amp)
        assert ann.training and not ann.body[1].training and snn.training and snn._record
        assert (snn.spike_conv, snn.spike_conv_backend, snn.spike_masks) == (True, "torch", False)
    snn.track_energy(True)
    finetune_snn(snn, "denoise", sigma=25, data=tmp_path, val_data=tmp_path, steps=1,
                 batch_size=2, patch=16, val_crop=16, progress=False, log=lambda _: None,
                 train_mapper=False)
    assert all(p.requires_grad for p in snn.mapper.parameters()) and snn._track_energy
    with pytest.raises(ValueError, match="sigma: denoising needs the noise level"):
        finetune_snn(snn, "denoise", data=tmp_path, val_data=tmp_path, steps=1)


def test_residual_body_must_keep_the_shape():
    """A body that shrinks the image (no padding) or changes the channel count is a
    clear error, not a broadcast (a 1-channel body under a 3-channel skip would
    broadcast silently)."""
    shrink = Residual(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3))).eval()
    with pytest.raises(ValueError, match=r"maps \(1, 1, 16, 16\) to \(1, 1, 12, 12\)"):
        shrink(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="same shape"):
        to_snn(shrink, torch.rand(2, 1, 16, 16), 4)
    gray_body = Residual(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(4, 1, 3, padding=1))).eval()
    with pytest.raises(ValueError, match="same shape"):
        gray_body(torch.rand(1, 3, 8, 8))



class _ScaledReLU(nn.ReLU):
    def forward(self, x):
        return 0.5 * super().forward(x)


class _StdConv2d(nn.Conv2d):  # weight standardisation, as in timm's StdConv2d
    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w / (w.std((1, 2, 3), keepdim=True) + 1e-5), self.bias)


class _LeakySequential(nn.Sequential):  # its layers list a ReLU, its forward runs leaky_relu
    def forward(self, x):
        return self[2](nn.functional.leaky_relu(self[0](x), 0.2))


class _CircularConv2d(nn.Conv2d):  # Conv2d.forward kept, _conv_forward pads circularly
    def _conv_forward(self, x, weight, bias):
        x = nn.functional.pad(x, (1, 1, 1, 1), mode="circular")
        return nn.functional.conv2d(x, weight, bias)


class _DoubledResidual(Residual):
    def forward(self, x):
        return x - 2 * self.body(x)


def _plain_body():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))


@pytest.mark.parametrize("model, match", [
    (_LeakySequential(*_plain_body()), r"the model \([\w.]*_LeakySequential\) overrides Sequential"),
    (_DoubledResidual(_plain_body()), r"the model \([\w.]*_DoubledResidual\) overrides Residual"),
    (Residual(_LeakySequential(*_plain_body())), r"the body \([\w.]*_LeakySequential\) overrides"),
    (_seq(nn.Conv2d(1, 4, 3), _LeakySequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)),
          nn.ReLU(), nn.Conv2d(4, 1, 1)), r"layer 1 \([\w.]*_LeakySequential\) overrides Sequential"),
    (_seq(_StdConv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3)), r"layer 0 \([\w.]*_StdConv2d\) overrides Conv2d"),
    (_seq(nn.Conv2d(1, 4, 3), _ScaledReLU(), nn.Conv2d(4, 1, 3)), r"layer 1 \([\w.]*_ScaledReLU\) overrides ReLU"),
    (_seq(_CircularConv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3)),
     r"layer 0 \([\w.]*_CircularConv2d\) overrides Conv2d._conv_forward"),
])
def test_layers_with_their_own_forward_are_refused(model, match):
    """A subclass whose forward computes something else than its base class would
    convert silently into the base class's network (measured before: a 0.5-scaled
    ReLU, a weight-standardised conv, a Sequential running leaky_relu all gave an
    SNN that did not approach its ANN)."""
    with pytest.raises(ValueError, match=match):
        to_snn(model.eval(), images(n=1), 4)


def test_subclasses_that_keep_the_forward_convert():
    """A parametrised conv (weight_norm: a Conv2d subclass computing its weight)
    keeps Conv2d's forward: it converts, to the weight it computes."""
    torch.manual_seed(0)
    wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 8, 3, padding=1))
    with torch.no_grad():
        wn.parametrizations.weight.original0.mul_(1.7)
    ann = Residual(nn.Sequential(wn, nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))).eval()
    chain = conv_chain(ann)
    x = images(n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(chain(x), ann(x), atol=1e-6, rtol=0)
