"""DnCNN / AOD-Net layouts, weight loading, BN folding."""
from pathlib import Path

import pytest
import torch
from torch import nn

from spikingir.models import AODNet, DnCNN, fold_batchnorm, load_dncnn, load_dncnn_pytorch_bn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights"
SET12 = SHARED / "data" / "set12"


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 4 + 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ----------------------------------------------------------------------------- DnCNN layout

def test_dncnn_bn_layout():
    m = DnCNN()
    seq = list(m.dncnn)
    assert len(seq) == 2 + 15 * 3 + 1
    assert isinstance(seq[0], nn.Conv2d) and seq[0].bias is not None and isinstance(seq[1], nn.ReLU)
    for i in range(15):
        conv, bn, relu = seq[2 + 3 * i: 5 + 3 * i]
        assert isinstance(conv, nn.Conv2d) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 1e-4 and bn.momentum == 0.95
        assert isinstance(relu, nn.ReLU)
    assert isinstance(seq[-1], nn.Conv2d) and seq[-1].bias is None and seq[-1].out_channels == 1


def test_dncnn_plain_layout():
    m = DnCNN(batchnorm=False)
    seq = list(m.dncnn)
    assert len(seq) == 33
    for i, layer in enumerate(seq):
        assert isinstance(layer, nn.Conv2d if i % 2 == 0 else nn.ReLU), (i, layer)
        if i % 2 == 0:
            assert layer.bias is not None and layer.kernel_size == (3, 3) and layer.padding == (1, 1)
    assert sorted({k.split(".")[1] for k in m.state_dict()}, key=int) == [str(i) for i in range(0, 33, 2)]


def test_dncnn_forward_is_residual():
    m = DnCNN(depth=5, channels=8, batchnorm=False).eval()
    x = torch.rand(2, 1, 13, 17)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x - m.dncnn(x))
    assert m(x).shape == x.shape


def test_dncnn_input_checks():
    with pytest.raises(ValueError, match="depth"):
        DnCNN(depth=1)
    with pytest.raises(TypeError, match="depth"):
        DnCNN(depth=17.0)
    with pytest.raises(TypeError, match="batchnorm"):
        DnCNN(batchnorm=1)
    m = DnCNN(depth=3, channels=4)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        m(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError):
        m(torch.rand(1, 8, 8))
    with pytest.raises(TypeError):
        m([1.0])


# ----------------------------------------------------------------------------- BN folding

@pytest.mark.parametrize("image_channels", [1, 3])
def test_fold_batchnorm_equivalence(image_channels):
    torch.manual_seed(0)
    m = DnCNN(depth=6, channels=16, image_channels=image_channels, batchnorm=True)
    _randomize_bn(m)
    m.train()  # folding must use the running statistics whatever the mode
    folded = fold_batchnorm(m)
    assert not folded.batchnorm and not folded.training and m.training
    assert not any(isinstance(x, nn.BatchNorm2d) for x in folded.modules())
    m.eval()
    x = torch.rand(2, image_channels, 21, 19)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_plain_is_copy():
    m = DnCNN(depth=3, channels=4, batchnorm=False)
    f = fold_batchnorm(m)
    assert f is not m
    for a, b in zip(m.state_dict().values(), f.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError):
        fold_batchnorm(nn.Conv2d(1, 1, 3))


# ----------------------------------------------------------------------------- shipped weights

@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_official_weights_load_strict(sigma):
    path = _need(WEIGHTS / f"dncnn_s{sigma}_official.pt")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    m = DnCNN(batchnorm=False)
    m.load_state_dict(sd, strict=True)
    auto = load_dncnn(path)
    assert not auto.batchnorm and auto.depth == 17 and auto.channels == 64


def test_load_dncnn_handles_module_prefix_and_errors(tmp_path):
    m = DnCNN(depth=4, channels=8, batchnorm=False)
    sd = {"module." + k: v for k, v in m.state_dict().items()}
    got = load_dncnn(sd)
    assert got.depth == 4 and got.channels == 8 and not got.batchnorm
    with pytest.raises(FileNotFoundError):
        load_dncnn(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="conv"):
        load_dncnn({"foo.weight": torch.zeros(1)})
    plain = tmp_path / "plain.pt"
    torch.save(m.state_dict(), plain)
    with pytest.raises(ValueError, match="BatchNorm"):
        load_dncnn_pytorch_bn(plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_dncnn(garbage)


def test_pytorch_bn_weights_load_and_fold():
    path = _need(WEIGHTS / "dncnn_s25_pytorch_bn.pt")
    m = load_dncnn_pytorch_bn(path)
    assert m.batchnorm and m.depth == 17
    sd = torch.load(path, map_location="cpu", weights_only=True)
    DnCNN(batchnorm=True).load_state_dict(sd, strict=True)  # keys match the BN layout as stored
    folded = load_dncnn_pytorch_bn(path, fold=True)
    x = torch.rand(1, 1, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), atol=1e-5, rtol=0)


def test_official_s25_denoises_set12_01():
    path = _need(WEIGHTS / "dncnn_s25_official.pt")
    img = _need(SET12 / "01.png")
    from spikingir.data import add_gaussian_noise, load_image
    from spikingir.metrics import psnr

    m = load_dncnn(path)
    clean = load_image(img)
    noisy = add_gaussian_noise(clean, 25, seed=0)
    with torch.no_grad():
        out = m(torch.from_numpy(noisy)[None, None])[0, 0].numpy()
    p_out, p_in = psnr(clean, out), psnr(clean, noisy)
    assert p_out > 29.0, p_out
    assert p_out - p_in > 8.0, (p_out, p_in)
    assert abs(p_out - 30.208) < 0.05, p_out  # measured on CPU (Set12 mean 30.43 as in the weights README)


# ----------------------------------------------------------------------------- AOD-Net

def test_aodnet_layout():
    m = AODNet()
    spec = {"conv1": (3, 3, 1), "conv2": (3, 3, 3), "conv3": (6, 3, 5), "conv4": (6, 3, 7), "conv5": (12, 3, 3)}
    for name, (cin, cout, k) in spec.items():
        conv = getattr(m, name)
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (cin, cout, (k, k))
        assert conv.padding == (k // 2, k // 2)
    assert m.convs() == [m.conv1, m.conv2, m.conv3, m.conv4, m.conv5]


def test_aodnet_forward_formula():
    torch.manual_seed(0)
    m = AODNet()
    for c in m.convs():
        nn.init.normal_(c.weight, 0, 0.3)
        nn.init.uniform_(c.bias, -0.1, 0.3)
    x = torch.rand(2, 3, 15, 22)
    r = torch.relu
    x1 = r(m.conv1(x))
    x2 = r(m.conv2(x1))
    x3 = r(m.conv3(torch.cat([x1, x2], 1)))
    x4 = r(m.conv4(torch.cat([x2, x3], 1)))
    k = r(m.conv5(torch.cat([x1, x2, x3, x4], 1)))
    torch.testing.assert_close(m.estimate_k(x), k)
    torch.testing.assert_close(m(x), r(k * x - k + 1))
    assert (m(x) >= 0).all()
    # K = 1 gives back the input
    torch.testing.assert_close(m.recover(torch.ones_like(x), x), x)


def test_aodnet_input_checks():
    m = AODNet()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError):
        m("image")
    with pytest.raises(ValueError):
        m.recover(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 5))
