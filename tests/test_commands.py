"""The restoration commands of the CLI: outputs, and one-line errors with exit status 2."""
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spikingir import cli
from spikingir.cli import main
from spikingir.convert import to_snn
from spikingir.models import AODNet, DnCNN
from spikingir.pipeline import save_snn
from spikingir.weights import WEIGHTS_DIR

torch.set_num_threads(1)


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    dn = DnCNN(depth=4, channels=8, batchnorm=False)
    torch.save(dn.state_dict(), d / "dncnn.pt")
    torch.save(AODNet().state_dict(), d / "aod.pt")
    colour_dn = DnCNN(depth=3, channels=4, image_channels=3, batchnorm=False).eval()
    torch.save(colour_dn.state_dict(), d / "dncnn3.pt")  # a colour model, and its SNN
    save_snn(to_snn(colour_dn, [torch.rand(1, 3, 16, 16)], 2), d / "snn3.pt")
    gray = d / "gray"
    gray.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(gray / f"im{i}.png")
    rgb = d / "rgb"
    rgb.mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(rgb / "c.png")
    (d / "empty").mkdir()
    (d / "tiny").mkdir()  # smaller than SSIM's 11 x 11 window
    Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).save(d / "tiny" / "t.png")
    haze = d / "haze"
    (haze / "hazy").mkdir(parents=True)
    (haze / "gt").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(haze / "hazy" / "7_1.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(haze / "gt" / "8.png")
    train = d / "gray48"  # large enough for 40x40 training patches
    train.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(train / f"t{i}.png")
    for c in (2, 4):  # models of neither gray nor RGB images
        odd = DnCNN(depth=3, channels=4, image_channels=c, batchnorm=False)
        torch.save(odd.state_dict(), d / f"dncnn{c}.pt")
    return d


def test_evaluate_writes_json_markdown_figures(files, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--data",
                             str(files / "gray"), "--timesteps", "2", "3", "--ann-weights",
                             str(files / "dncnn.pt"), "--json", str(out), "--markdown",
                             str(tmp_path / "t.md"), "--figures", str(tmp_path / "fig")], capsys)
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["task"] == "denoise" and r["sigma"] == 25 and r["images"] == 2
    assert [s["timesteps"] for s in r["snn"]] == [2, 3]
    assert "| SNN | 3 |" in (tmp_path / "t.md").read_text() and "| SNN | 2 |" in stdout
    pngs = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert "psnr_vs_T_denoise.png" in pngs and len(pngs) == 3


def test_restore_writes_an_image(files, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, _, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(out), "--task",
                        "denoise", "--sigma", "25", "--timesteps", "2", "--ann-weights",
                        str(files / "dncnn.pt")], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(out)).shape == (20, 24)


def test_restore_colour_per_channel_is_each_channel_as_gray(files, tmp_path, capsys):
    """--colour per-channel: an RGB image's channels through the shipped grayscale
    SNN as one batch (here in tiles and step chunks) give an RGB PNG whose channels
    are, bit for bit, each channel restored alone as a gray image (whole, all steps
    at once); a gray image in the same run stays gray; alpha is dropped, saying so."""
    rgb = np.asarray(Image.open(files / "rgb" / "c.png"))
    big = np.tile(rgb, (4, 3, 1))[:75, :70]  # more than one 64-pixel tile
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.concatenate([big, np.full((75, 70, 1), 128, np.uint8)], 2)).save(src / "c.png")
    for c in range(3):
        Image.fromarray(np.ascontiguousarray(big[..., c])).save(src / f"g{c}.png")
    common = ["--task", "denoise", "--sigma", "25", "--timesteps", "3"]
    code, out, err = run(["restore", str(src), "-o", str(tmp_path / "a") + "/", "--colour",
                          "per-channel", "--tile", "64", "--step-chunk", "2"] + common, capsys)
    assert code == 0, err
    assert "c.png (denoise, each RGB channel on its own" in out
    assert "c.png: its alpha channel is dropped" in err
    code, _, err = run(["restore", *(str(src / f"g{c}.png") for c in range(3)), "-o",
                        str(tmp_path / "b") + "/", "--tile", "0"] + common, capsys)
    assert code == 0, err
    got = Image.open(tmp_path / "a" / "c.png")
    want = np.stack([np.asarray(Image.open(tmp_path / "b" / f"g{c}.png")) for c in range(3)], -1)
    assert got.mode == "RGB" and want.shape == (75, 70, 3)
    np.testing.assert_array_equal(np.asarray(got), want)
    for c in range(3):  # the gray inputs of the --colour run: gray, as without it
        gray = Image.open(tmp_path / "a" / f"g{c}.png")
        assert gray.mode == "L" and np.array_equal(np.asarray(gray), want[..., c])


def test_evaluate_colour_per_channel(files, tmp_path, capsys):
    """evaluate --colour per-channel: RGB images in RGB (a gray one in the folder
    stays gray); the JSON has the usual fields and says so; the energy is the
    whole image's: an RGB image's ANN MACs are three gray images' of its size; the
    figures of the RGB image are RGB."""
    data = tmp_path / "mixed"
    data.mkdir()
    Image.open(files / "rgb" / "c.png").save(data / "c.png")  # 20 x 24, as gray/im0.png
    Image.open(files / "gray" / "im0.png").save(data / "g.png")
    common = ["--task", "denoise", "--sigma", "25", "--timesteps", "2", "--ann-weights",
              str(files / "dncnn.pt")]
    js = tmp_path / "r.json"
    code, out, err = run(["evaluate", "--data", str(data), "--color", "per-channel", "--json",
                          str(js), "--figures", str(tmp_path / "fig")] + common, capsys)
    assert code == 0, err
    assert "2 images (1 in colour, each channel on its own)" in out
    r = json.loads(js.read_text())
    assert r["task"] == "denoise" and r["images"] == 2
    assert r["colour"] == "per-channel" and r["colour_images"] == 1
    assert set(r["ann"]) == {"psnr", "ssim", "energy_mj"}
    assert {"timesteps", "psnr", "ssim", "psnr_loss", "conversion_rate", "energy_mj",
            "firing_rate"} <= set(r["snn"][0])
    assert all(np.isfinite(v) for v in (r["ann"]["psnr"], r["ann"]["ssim"], r["snn"][0]["psnr"]))
    gray = tmp_path / "g.json"
    code, _, err = run(["evaluate", "--data", str(files / "gray"), "--json", str(gray)] + common,
                       capsys)
    assert code == 0, err
    one = json.loads(gray.read_text())["ann"]["energy_mj"]  # a 20 x 24 gray image
    assert r["ann"]["energy_mj"] == pytest.approx((3 * one + one) / 2, rel=1e-12)
    assert np.asarray(Image.open(tmp_path / "fig" / "c_noisy_ann_snn_clean.png")).ndim == 3
    assert np.asarray(Image.open(tmp_path / "fig" / "g_noisy_ann_snn_clean.png")).ndim == 2


_COLOUR_NET = """
import torch.nn.functional as F
from torch import nn

class Colour(nn.Module):  # a colour denoiser with a skip: the graph conversion
    def __init__(self):
        super().__init__()
        self.head, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.head(x))
        return x - self.tail(F.relu(h + self.body(h)))

def colour():
    return Colour()
"""


def test_a_colour_model_restores_rgb_images(files, tmp_path, capsys):
    """A colour denoiser (3 input channels) takes RGB images as they are, however it
    is given: --snn-weights, whole and in tiles, writes the Python API's restore()
    of that SNN into an RGB PNG, bit for bit (blind sigma too: that file runs
    whatever the estimate); --ann-weights and --ann-module (a network with a skip)
    are converted, calibrated on RGB photos, into RGB results."""
    from spikingir.data import load_image
    from spikingir.metrics import to_uint8
    from spikingir.pipeline import for_inference, load_snn, restore
    big = np.tile(np.asarray(Image.open(files / "rgb" / "c.png")), (4, 3, 1))[:75, :70]
    src = tmp_path / "big.png"
    Image.fromarray(big).save(src)
    snn = for_inference(load_snn(files / "snn3.pt"))
    snn.timesteps = 3
    want = to_uint8(restore(load_image(src), snn, tile=0))
    assert want.shape == (75, 70, 3)
    for extra in (["--tile", "0"], ["--tile", "64"], ["--tile", "64", "--sigma", "25"]):
        out = tmp_path / "o.png"
        code, stdout, err = run(["restore", str(src), "-o", str(out), "--task", "denoise",
                                 "--timesteps", "3", "--snn-weights", str(files / "snn3.pt")]
                                + extra, capsys)
        assert code == 0, err
        assert "each RGB channel" not in stdout
        got = Image.open(out)
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), want)
    net = tmp_path / "colour.py"
    net.write_text(_COLOUR_NET)
    spec = importlib.util.spec_from_file_location("colour_net", net)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.colour().state_dict(), tmp_path / "colour.pt")
    for weights in (["--ann-weights", str(files / "dncnn3.pt")],
                    ["--ann-weights", str(tmp_path / "colour.pt"), "--ann-module",
                     f"{net}:colour"]):
        out = tmp_path / "a.png"
        code, stdout, err = run(["restore", str(src), "-o", str(out), "--task", "denoise",
                                 "--sigma", "25", "--timesteps", "2", "--layer-calibration",
                                 "none"] + weights, capsys)
        assert code == 0, err
        assert "converted ANN" in stdout
        got = np.asarray(Image.open(out))
        assert got.shape == (75, 70, 3) and not np.array_equal(got, big)


def test_evaluate_a_colour_model_in_rgb(files, tmp_path, capsys):
    """evaluate with a colour model (--ann-weights, and its SNN from --snn-weights):
    the images in RGB, noise add_gaussian_noise of H x W x 3 at seed 0; a gray image
    in the folder replicated to RGB before its noise is drawn; the ANN's PSNR and
    SSIM those of the ANN on these inputs over the three channels."""
    from spikingir.data import add_gaussian_noise, load_image
    from spikingir.metrics import psnr, ssim
    from spikingir.models import load_dncnn
    data = tmp_path / "mixed"
    data.mkdir()
    Image.open(files / "rgb" / "c.png").save(data / "c.png")
    Image.open(files / "gray" / "im0.png").save(data / "g.png")
    js = tmp_path / "r.json"
    code, out, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--data", str(data),
                          "--timesteps", "2", "--ann-weights", str(files / "dncnn3.pt"),
                          "--snn-weights", str(files / "snn3.pt"), "--json", str(js)], capsys)
    assert code == 0, err
    assert "2 images (in RGB: a colour model)" in out
    r = json.loads(js.read_text())
    assert r["images"] == 2 and "colour" not in r
    ann = load_dncnn(str(files / "dncnn3.pt"))
    ps, ss = [], []
    for name in ("c.png", "g.png"):
        clean = load_image(data / name, gray=False)  # the gray one as R = G = B
        noisy = add_gaussian_noise(clean, 25, seed=0)
        with torch.no_grad():
            y = ann(torch.from_numpy(noisy).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        ps.append(psnr(clean, y))
        ss.append(ssim(clean, y))
    assert r["ann"]["psnr"] == pytest.approx(np.mean(ps), abs=1e-9)
    assert r["ann"]["ssim"] == pytest.approx(np.mean(ss), abs=1e-9)
    assert np.isfinite(r["snn"][0]["psnr"]) and r["snn"][0]["energy_mj"] > 0


@pytest.mark.parametrize("task,image,weights", [("denoise", "gray/im0.png", "dncnn.pt"),
                                                ("dehaze", "rgb/c.png", "aod.pt")])
def test_restore_in_tiles_is_the_whole_image(files, tmp_path, capsys, task, image, weights):
    """--tile N: overlapping tiles with the receptive radius around each core give
    the image restored whole (--tile 0), pixel for pixel; tiles under 64 pixels
    (mostly margin) are refused."""
    big = tmp_path / ("big" + Path(image).suffix)
    small = np.asarray(Image.open(files / image))
    Image.fromarray(np.tile(small, (4, 3) + (1,) * (small.ndim - 2))[:75, :70]).save(big)
    outs = []
    for tile in ("0", "64"):
        out = tmp_path / f"t{tile}.png"
        code, _, err = run(["restore", str(big), "-o", str(out), "--task", task,
                            "--timesteps", "3", "--ann-weights", str(files / weights), "--tile",
                            tile] + (["--sigma", "25"] if task == "denoise" else []), capsys)
        assert code == 0, err
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape[:2] == (75, 70) and np.array_equal(outs[0], outs[1])
    code, _, err = run(["restore", str(big), "-o", str(tmp_path / "t7.png"), "--task", task,
                        "--tile", "7"] + (["--sigma", "25"] if task == "denoise" else []), capsys)
    assert code == 2 and "0 or a tile size >= 64" in err


@pytest.mark.parametrize("task,image,weights", [("denoise", "gray/im0.png", "dncnn.pt"),
                                                ("dehaze", "rgb/c.png", "aod.pt")])
def test_restore_and_evaluate_in_step_chunks(files, tmp_path, capsys, task, image, weights):
    """--step-chunk N (the SNN's steps in chunks: memory bounded independently of T)
    writes the image and the evaluation of all steps at once; 0 is refused."""
    extra = ["--ann-weights", str(files / weights), "--timesteps", "3"] + \
        (["--sigma", "25"] if task == "denoise" else [])
    outs, reports = [], []
    for chunk in ([], ["--step-chunk", "2"]):
        out = tmp_path / f"r{len(outs)}.png"
        code, _, err = run(["restore", str(files / image), "-o", str(out), "--task", task]
                           + extra + chunk, capsys)
        assert code == 0, err
        outs.append(np.asarray(Image.open(out)))
        if task == "denoise":
            js = tmp_path / f"e{len(reports)}.json"
            code, _, err = run(["evaluate", "--task", task, "--data", str(files / "gray"),
                                "--json", str(js)] + extra + chunk, capsys)
            assert code == 0, err
            reports.append(json.loads(js.read_text())["snn"])
    assert np.array_equal(outs[0], outs[1])
    if reports:
        keys = ("psnr", "ssim", "firing_rate", "energy_mj")
        assert [{k: r.get(k) for k in keys} for r in reports[0]] == \
            [{k: r.get(k) for k in keys} for r in reports[1]]
        assert all(r[k] is not None for r in reports[0] for k in keys)
    code, _, err = run(["restore", str(files / image), "-o", str(tmp_path / "x.png"), "--task",
                        task, "--step-chunk", "0"] + extra, capsys)
    assert code == 2 and "--step-chunk" in err and "positive integer" in err


@pytest.mark.parametrize("task,image,weights", [("denoise", "gray/im0.png", "dncnn.pt"),
                                                ("dehaze", "rgb/c.png", "aod.pt")])
def test_restore_and_evaluate_in_bf16(files, tmp_path, capsys, task, image, weights):
    """--amp (bf16 autocast, channels-last, the SNN's convs on F.conv2d): an image
    close to the exact one, and evaluate's figures close to the exact ones."""
    from spikingir.train import cpu_bf16_units
    extra = ["--ann-weights", str(files / weights), "--timesteps", "3"] + \
        (["--sigma", "25"] if task == "denoise" else [])
    data = files / ("gray" if task == "denoise" else "haze2")
    if task == "dehaze":  # a matched pair for evaluate
        (data / "hazy").mkdir(parents=True, exist_ok=True)
        (data / "gt").mkdir(exist_ok=True)
        Image.open(files / image).save(data / "hazy" / "3_1.png")
        Image.open(files / image).save(data / "gt" / "3.png")
    outs, reports = [], []
    for amp in ([], ["--amp"]):
        out = tmp_path / f"r{len(amp)}.png"
        code, _, err = run(["restore", str(files / image), "-o", str(out), "--task", task]
                           + extra + amp, capsys)
        assert code == 0, err
        # the emulated-bf16 warning exactly where this CPU lacks bf16 units
        assert ("drop --amp" in err) == (bool(amp) and cpu_bf16_units() is None)
        outs.append(np.asarray(Image.open(out)).astype(float))
        js = tmp_path / f"r{len(amp)}.json"
        code, _, err = run(["evaluate", "--task", task, "--data", str(data), "--json", str(js)]
                           + extra + amp, capsys)
        assert code == 0, err
        assert ("drop --amp" in err) == (bool(amp) and cpu_bf16_units() is None)
        reports.append(json.loads(js.read_text()))
    assert outs[0].shape == outs[1].shape
    # a random 4-layer SNN at T=3 on noise: bf16 currents flip some spikes (measured:
    # mean |diff| 3.5 gray levels denoising, correlation 0.995)
    assert np.corrcoef(outs[0].ravel(), outs[1].ravel())[0, 1] > 0.98
    exact, bf16 = reports
    assert abs(exact["ann"]["psnr"] - bf16["ann"]["psnr"]) < 0.5
    assert abs(exact["snn"][0]["psnr"] - bf16["snn"][0]["psnr"]) < 0.5
    assert bf16["snn"][0]["energy_mj"] > 0


@pytest.mark.parametrize("argv,match", [
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/nowhere"], "no such directory"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/empty"], "no image files"),
    # an RGB image for the grayscale model: refused by default, naming the option
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/rgb"],
     "c.png: an RGB image .*--colour per-channel"),
    (["evaluate", "--task", "denoise", "--sigma", "30", "--data", "{d}/gray"], "unknown sigma"),
    (["evaluate", "--task", "denoise", "--data", "{d}/gray"], "--sigma is required"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--ann-weights",
      "{d}/aod.pt"], "not a DnCNN"),
    (["evaluate", "--task", "dehaze", "--data", "{d}/haze", "--ann-weights", "{d}/dncnn.pt"],
     "hazy|clean|no"),
    (["evaluate", "--task", "dehaze", "--data", "{d}/gray", "--ann-weights", "{d}/aod.pt"], ""),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--timesteps", "0"], "--timesteps.*positive"),
    (["restore", "{d}/gray/missing.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25"],
     "no such image"),
    (["restore", "{d}/rgb/c.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--ann-weights", "{d}/dncnn.pt"], "c.png: an RGB image .*--colour per-channel"),
    # --colour per-channel: for a grayscale denoising model only
    (["restore", "{d}/rgb/c.png", "-o", "{o}/x.png", "--task", "dehaze", "--colour",
      "per-channel"], "--colour per-channel applies to --task denoise only"),
    (["evaluate", "--task", "dehaze", "--data", "{d}/haze", "--color", "per-channel"],
     "--colour per-channel applies to --task denoise only"),
    (["restore", "{d}/rgb/c.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--colour", "per-channel", "--snn-weights", "{d}/snn3.pt"], r"takes 3 channels \(a colour"),
    (["restore", "{d}/rgb/c.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--colour", "per-channel", "--ann-weights", "{d}/dncnn3.pt"], r"takes 3 channels \(a colour"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/rgb", "--colour",
      "per-channel", "--ann-weights", "{d}/dncnn3.pt"], r"takes 3 channels \(a colour"),
    (["restore", "{d}/rgb/c.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--colour", "rgb"], "--colour.*invalid choice"),
    # a colour model (3 input channels): a gray photo is refused (its noise is the same
    # in the three channels), before any conversion; its SNN needs its own ANN to compare
    (["restore", "{d}/rgb/c.png", "{d}/gray/im0.png", "-o", "{o}/", "--task", "denoise",
      "--sigma", "25", "--snn-weights", "{d}/snn3.pt"],
     "im0.png: a grayscale image for the colour denoising model"),
    (["restore", "{d}/gray/im0.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--ann-weights", "{d}/dncnn3.pt"], "im0.png: a grayscale image for the colour denoising"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/rgb", "--snn-weights",
      "{d}/snn3.pt"], r"snn3.pt takes 3 image channel\(s\), the shipped ANN 1"),
    # models of neither 1 nor 3 input channels
    (["restore", "{d}/rgb/c.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--ann-weights", "{d}/dncnn4.pt"], "dncnn4.pt: a denoising model of 4 input channels"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/rgb", "--ann-weights",
      "{d}/dncnn2.pt"], "dncnn2.pt: a denoising model of 2 input channels"),
    (["convert", "--task", "denoise", "--sigma", "25", "--ann-weights", "{d}/dncnn4.pt",
      "--out", "{o}/x.pt"], "dncnn4.pt: a denoising model of 4 input channels"),
    (["restore", "{d}/gray/im0.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--ann-weights", "{d}/missing.pt"], "No such file|no such"),
    (["restore", "{d}/gray/im0.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--snn-weights", "{d}/dncnn.pt"], "not a SpikingIR SNN"),
    (["finetune", "--task", "denoise", "--sigma", "25", "--snn-weights", "{d}/dncnn.pt",
      "--data", "{d}/gray", "--val-data", "{d}/gray", "--out", "{o}/x.pt"], "not a SpikingIR SNN"),
    (["finetune", "--task", "denoise", "--sigma", "25", "--snn-weights", "{d}/snn3.pt",
      "--distill", "0.5", "--data", "{d}/gray48", "--val-data", "{d}/gray", "--out", "{o}/x.pt"],
     r"snn3.pt takes 3 image channel\(s\), the shipped ANN 1"),
    (["finetune", "--task", "denoise", "--sigma", "25", "--energy-weight", "-1",
      "--out", "{o}/x.pt"], "--energy-weight.*>= 0"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--ann-weights",
      "{d}/dncnn.pt", "--offset-percentile", "1"], "AOD-Net only"),
    (["evaluate", "--task", "dehaze", "--offset-percentile", "100"], "--offset-percentile.*auto, none"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/tiny", "--ann-weights",
      "{d}/dncnn.pt"], "t: 5 x 6 is smaller than SSIM's 11 x 11 window"),
    (["restore", "{d}/gray/im0.png", "-o", "{o}/x.xyz", "--task", "denoise", "--sigma", "25",
      "--ann-weights", "{d}/dncnn.pt"], "cannot write images of type '.xyz'"),
    (["restore", "{d}/gray/im0.png", "-o", "{o}/x.png", "--task", "denoise", "--sigma", "25",
      "--snn-weights", "{w}/snn_aodnet.pt"], "AOD-Net SNN .*not one for the denoise task"),
    (["finetune", "--task", "dehaze", "--snn-weights", "{w}/snn_dncnn_s25.pt", "--out",
      "{o}/x.pt"], "DnCNN SNN .*not one for the dehaze task"),
    # outputs that could only fail after the work: refused before it
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--markdown", "{d}/gray"],
     "--markdown .* is a directory"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--markdown",
      "{d}/gray/im0.png/t.md"], "im0.png is not a writable folder"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--figures",
      "{d}/gray/im0.png"], "--figures .* exists and is not a folder"),
    (["restore", "{d}/gray/im0.png", "-o", "{d}/gray/im0.png/x.png", "--task", "denoise", "--sigma",
      "25"], "im0.png is not a writable folder"),
    (["restore", "{d}/gray/im0.png", "{d}/gray/im1.png", "-o", "{d}/gray/im0.png", "--task", "denoise",
      "--sigma", "25"], "-o .* exists and is not a folder"),
    (["demo", "--out", "{d}/gray/im0.png"], "--out .* exists and is not a folder"),
    (["convert", "--task", "denoise", "--sigma", "25", "--data", "{d}/tiny", "--ann-weights",
      "{d}/dncnn.pt", "--out", "{o}/x.pt"], "t.png: 5 x 6 is too small to calibrate on"),
    # options of the other task: refused, not silently ignored
    (["finetune", "--task", "dehaze", "--val-crop", "16", "--out", "{o}/x.pt"],
     "--val-crop applies to --task denoise only"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--scenes", "1420"],
     "--scenes applies to --task dehaze only"),
    # two outputs naming one path (the JSON was written, then the figures failed)
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--markdown",
      "{o}/r.json"], "--json and --markdown both name"),
    (["evaluate", "--task", "denoise", "--sigma", "25", "--data", "{d}/gray", "--figures",
      "{o}/r.json"], "--json and --figures both name"),
])
def test_bad_input_is_one_line_exit_2_no_output(files, tmp_path, capsys, argv, match):
    argv = [a.format(d=files, o=tmp_path, w=WEIGHTS_DIR) for a in argv]
    json_out = tmp_path / "r.json"
    if argv[0] == "evaluate":
        argv += ["--json", str(json_out)]
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err  # usage errors too (argparse's usage block is not printed)
    import re
    assert re.search(match, lines[-1], re.I), lines[-1]
    assert not json_out.exists() and not list(tmp_path.glob("x.*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_unreadable_weight_files_are_one_line_errors(files, tmp_path, capsys):
    """A text file, random bytes, a zip that is no checkpoint, a truncated SNN
    file, a bare tensor, an SNN file with a key missing: each a one-line error
    naming the file, exit 2, for --snn-weights and --ann-weights alike."""
    import os
    import zipfile
    from spikingir.weights import WEIGHTS_DIR as W
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.pt").write_text("not weights\n")
    (bad / "random.pt").write_bytes(os.urandom(4096))
    with zipfile.ZipFile(bad / "zip.pt", "w") as z:
        z.writestr("a.txt", "x")
    whole = (W / "snn_dncnn_s25.pt").read_bytes()
    (bad / "truncated.pt").write_bytes(whole[:len(whole) // 2])
    torch.save(torch.zeros(3), bad / "tensor.pt")
    ck = torch.load(W / "snn_dncnn_s25.pt", weights_only=True)
    torch.save({**ck, "config": {k: v for k, v in ck["config"].items() if k != "neuron"}},
               bad / "no_neuron.pt")
    state = {k: v for k, v in ck["state_dict"].items() if k != "neurons_.2.theta"}
    torch.save({**ck, "state_dict": state}, bad / "no_theta.pt")
    # loaded, then failed inside the forward (a traceback), or a message without the file
    short = {k: (v[:10] if k.startswith("neurons_.0.") and v.dim() == 1 else v)
             for k, v in ck["state_dict"].items()}
    torch.save({**ck, "state_dict": short}, bad / "no_match_theta.pt")
    torch.save({**ck, "config": {**ck["config"], "alpha": [1.0, 2.0]}}, bad / "no_match_alpha.pt")
    torch.save({**ck, "config": {**ck["config"], "timesteps": "abc"}}, bad / "no_int_t.pt")
    base = ["restore", str(files / "gray" / "im0.png"), "-o", str(tmp_path / "x.png"), "--task",
            "denoise", "--sigma", "25", "--timesteps", "2"]
    for name in sorted(p.name for p in bad.iterdir()):
        options = ["--snn-weights"] + (["--ann-weights"] if "no_" not in name else [])
        for option in options:
            code, _, err = run(base + [option, str(bad / name)], capsys)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, (name, option, err)
            assert name in lines[0], (name, option, lines[0])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [
    ["finetune", "--task", "denoise", "--sigma", "25", "--energy-weight", "inf"],
    ["finetune", "--task", "denoise", "--sigma", "25", "--lr-weights", "inf"],
    ["finetune", "--task", "denoise", "--sigma", "25", "--ssim-weight", "nan"],
    ["train-ann", "--task", "denoise", "--sigma", "25", "--lr", "inf"],
    ["train-ann", "--task", "denoise", "--sigma", "25", "--lr", "0"],
])
def test_non_finite_numbers_are_refused_before_any_work(tmp_path, capsys, argv):
    code, _, err = run(argv + ["--out", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "finite number" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_restore_several_images_into_a_folder(files, tmp_path, capsys):
    """Several inputs (files and folders): one network, each image written under
    its own name into the -o folder, equal to restoring it alone."""
    outdir = tmp_path / "outs"
    common = ["--task", "denoise", "--sigma", "25", "--timesteps", "2", "--ann-weights",
              str(files / "dncnn.pt")]
    code, stdout, err = run(["restore", str(files / "gray"), str(files / "gray48" / "t0.png"),
                             "-o", str(outdir)] + common, capsys)
    assert code == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == ["im0.png", "im1.png", "t0.png"]
    single = tmp_path / "single.png"
    code, _, err = run(["restore", str(files / "gray" / "im1.png"), "-o", str(single)] + common,
                       capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(outdir / "im1.png")))
    code, _, err = run(["restore", str(files / "gray"), str(files / "gray" / "im0.png"), "-o",
                        str(tmp_path / "dup")] + common, capsys)
    assert code == 2 and "same file name" in err and not (tmp_path / "dup").exists()
    # a bad file after good ones (garbage, an RGB image for the gray model): one line,
    # exit 2, and none of the outputs (every input is read before the first is written)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("a.png", "b.png"):
        (mixed / name).write_bytes((files / "gray" / "im0.png").read_bytes())
    for bad, content in (("c.png", b"not an image"), ("c.png", (files / "rgb" / "c.png").read_bytes())):
        (mixed / bad).write_bytes(content)
        code, _, err = run(["restore", str(mixed), "-o", str(tmp_path / "mixed_out")] + common, capsys)
        assert code == 2 and "c.png" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "mixed_out").exists()


def test_restore_keeps_16_bits(files, tmp_path, capsys):
    """A 16-bit gray input is restored into a 16-bit PNG/TIFF (the network's
    output rounded to 1/65535, not 1/255); 8-bit-only formats (BMP) get 8 bits
    of the same image."""
    from spikingir.metrics import to_uint8

    g16 = np.random.default_rng(3).integers(0, 65536, (20, 24), dtype=np.uint16)
    src = tmp_path / "g16.png"
    Image.fromarray(g16).save(src)
    common = ["--task", "denoise", "--sigma", "25", "--timesteps", "2", "--ann-weights",
              str(files / "dncnn.pt")]
    outs = {}
    for ext in ("png", "tif", "bmp"):
        out = tmp_path / f"o.{ext}"
        code, _, err = run(["restore", str(src), "-o", str(out)] + common, capsys)
        assert code == 0, err
        outs[ext] = np.asarray(Image.open(out))
    assert outs["png"].dtype == outs["tif"].dtype == np.uint16 and outs["bmp"].dtype == np.uint8
    assert np.array_equal(outs["png"], outs["tif"]) and outs["png"].shape == (20, 24)
    assert len(np.unique(outs["png"] % 257)) > 1  # not 8-bit values scaled up
    # the same image: rounding the 16-bit result to 8 bits differs from rounding the
    # float once by at most 1 (double rounding at ties), and the two mostly agree
    diff = to_uint8(outs["png"] / 65535.0).astype(int) - outs["bmp"].astype(int)
    assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.95


def test_restore_without_sigma_estimates_it(files, tmp_path, capsys):
    """No --sigma: the noise level is estimated from the image and the nearest
    shipped model used (here the noise of the random image reads as ~50+)."""
    out = tmp_path / "o.png"
    code, stdout, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(out), "--task",
                             "denoise", "--timesteps", "1"], capsys)
    assert code == 0, err
    assert "estimated noise sigma" in stdout and "the sigma 50 model" in stdout
    assert "snn_dncnn_s50.pt" in stdout and out.exists()
    # with --snn-weights that file runs: the estimate is printed, no model choice, and
    # a note says the file was fine-tuned at another sigma
    s25 = WEIGHTS_DIR / "snn_dncnn_s25.pt"
    code, stdout, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(out), "--task",
                             "denoise", "--timesteps", "1", "--snn-weights", str(s25)], capsys)
    assert code == 0, err
    assert "estimated noise sigma" in stdout and "model" not in stdout.splitlines()[0], stdout
    assert str(s25) in stdout and "fine-tuned at sigma 25" in err, err


def test_conversion_options_convert_instead_of_the_shipped_snn(files, tmp_path, capsys):
    """A conversion option asks for a conversion of the (shipped) ANN, not the shipped
    fine-tuned SNN; with an SNN file the options that cannot apply are named as ignored."""
    out = tmp_path / "o.png"
    image = str(files / "gray" / "im0.png")
    common = [image, "-o", str(out), "--task", "denoise", "--sigma", "25", "--timesteps", "1"]
    code, stdout, err = run(["restore"] + common, capsys)
    assert code == 0 and "snn_dncnn_s25.pt" in stdout, err
    code, stdout, err = run(["restore"] + common + ["--neuron", "if", "--layer-calibration",
                                                    "none"], capsys)
    assert code == 0 and "converted ANN (if," in stdout and "snn_dncnn_s25" not in stdout, err
    code, stdout, err = run(["restore"] + common + ["--percentile", "99", "--no-recycling",
                                                    "--snn-weights",
                                                    str(WEIGHTS_DIR / "snn_dncnn_s25.pt")], capsys)
    assert code == 0, err
    assert "note: --percentile ignored" in err and "--no-recycling" not in err


def test_demo_with_conversion_options(tmp_path, capsys):
    """demo converts both shipped ANNs with the options given (it used to fail reading
    the task it has none of); layer calibration applies to the DnCNN half only."""
    code, stdout, err = run(["demo", "--out", str(tmp_path / "d"), "--timesteps", "1", "--crop",
                             "32", "--neuron", "if", "--layer-calibration", "bias",
                             "--threads", "1"], capsys)
    assert code == 0, err
    assert "converted ANN (if, p99.9, v0=half, layer calibration: bias" in stdout
    assert stdout.count("converted ANN (if,") == 2
    assert "--layer-calibration applies to the DnCNN half only" in err


def test_an_snn_used_at_another_sigma_says_so(files, tmp_path, capsys):
    """The shipped s25 SNN at sigma 15 runs (a user may mean it) with a note on stderr."""
    out = tmp_path / "o.png"
    code, _, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(out), "--task",
                        "denoise", "--sigma", "15", "--timesteps", "1", "--snn-weights",
                        str(WEIGHTS_DIR / "snn_dncnn_s25.pt")], capsys)
    assert code == 0 and out.exists()
    assert "fine-tuned at sigma 25, used here at sigma 15" in err
    # an ANN whose train-ann metadata says another sigma (convert ignored it), and
    # --sigma with --task dehaze (ignored; train-ann refuses it)
    code, _, err = run(["convert", "--task", "denoise", "--sigma", "25", "--timesteps", "1",
                        "--layer-calibration", "none", "--threads", "1",
                        "--ann-weights", str(WEIGHTS_DIR / "dncnn_s50.pt"), "--out",
                        str(tmp_path / "c.pt")], capsys)
    assert code == 0 and "dncnn_s50.pt was trained at sigma 50, used here at sigma 25" in err, err
    code, _, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(tmp_path / "h.png"),
                        "--task", "dehaze", "--sigma", "25"], capsys)
    assert code == 2 and "--sigma applies to --task denoise only" in err


def test_keep_freed_memory_applies_on_glibc():
    """The allocator setting the CLI makes: applied where glibc has mallopt, a
    no-op (False) elsewhere; run in a child so this process keeps its allocator."""
    import subprocess
    import sys
    code = ("from spikingir.allocator import keep_freed_memory; import torch; "
            "ok = keep_freed_memory(); x = torch.ones(1 << 23); y = x + 1; "
            "print(ok, float(y.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ok, total = out.stdout.split()
    import ctypes.util
    glibc = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")
    assert ok == str(glibc)
    assert float(total) == 2.0 * (1 << 23)  # allocations still work after it


def test_cli_sets_huge_pages_before_torch_loads():
    """THP_MEM_ALLOC_ENABLE is read once, at torch's first allocation: the CLI
    module must set it (keeping a user's own value) with torch not yet imported."""
    import subprocess
    import sys
    code = ("import os, sys; import spikingir.cli; "
            "print('torch' in sys.modules, os.environ['THP_MEM_ALLOC_ENABLE'])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.split() == ["False", "1"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert out.stdout.split() == ["False", "0"]


def test_parser_does_not_import_torch():
    """The parser is built for every command: `spikingir --help` (and a usage error)
    answers without importing torch (~3 s; it imported spikingir.bench.neuron for
    the bench options' defaults), and those defaults are the bench's."""
    import subprocess
    import sys
    code = ("import sys; from spikingir.cli import _build_parser; p = _build_parser(); "
            "p.parse_args(['bench', 'neuron']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
    from spikingir.bench import neuron as bn
    from spikingir.cli import _build_parser
    args = _build_parser().parse_args(["bench", "neuron"])
    assert args.modes == list(bn.MODES) and args.T is None and args.N is None


@pytest.mark.parametrize("amp", [False, True])
def test_finetune_continues_an_snn_with_an_energy_term(files, tmp_path, capsys, amp):
    """finetune --snn-weights starts from a saved SNN (no conversion), and
    --energy-weight adds the energy term; both are recorded in the output.
    --amp trains in bf16 autocast (here on the CPU) and saves float32 weights."""
    from spikingir.pipeline import load_snn
    from spikingir.weights import WEIGHTS_DIR
    data = files / "gray48"
    out = tmp_path / "snn.pt"
    code, stdout, err = run(["finetune", "--task", "denoise", "--sigma", "25",
                             "--snn-weights", str(WEIGHTS_DIR / "snn_dncnn_s25.pt"),
                             "--timesteps", "2", "--steps", "2", "--batch-size", "2",
                             "--data", str(data), "--val-data", str(data), "--val-crop", "32",
                             "--energy-weight", "0.01", "--out", str(out)]
                            + (["--amp", "--val-every", "1", "--warmup", "5"] if amp else []),
                            capsys)
    assert code == 0, err
    from spikingir.train import amp_hint
    assert ("bf16 autocast (--amp)" in err) == (amp_hint("cpu", amp) is not None)
    validations = (stdout + err).count("validation at step")
    assert validations == (2 if amp else 1)  # --val-every 1: after each of the 2 steps
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["energy_weight"] == 0.01 and meta["init"].endswith("snn_dncnn_s25.pt")
    assert meta["amp"] is amp and meta["warmup"] == (5 if amp else 0)
    sd = torch.load(out, weights_only=True)["state_dict"]
    assert all(t.dtype == torch.float32 for t in sd.values() if t.is_floating_point())
    assert not torch.equal(sd["hidden.0.module.weight"], torch.load(
        WEIGHTS_DIR / "snn_dncnn_s25.pt", weights_only=True)["state_dict"]["hidden.0.module.weight"])
    assert meta["steps"] == 2
    snn = load_snn(out)
    assert snn.energy_ratio is None and snn.timesteps == 2
    # trained channels-last on the CPU, saved in the default layout
    assert all(t.is_contiguous() for t in torch.load(out, weights_only=True)["state_dict"].values())


def test_finetune_calibrates_layers_once_not_on_resume(files, tmp_path, capsys, monkeypatch):
    """A fine-tuning run from a conversion calibrates the layers (the DnCNN default);
    resuming it from its checkpoint does not redo that (the checkpoint replaces
    every weight) and gives the same network."""
    import spikingir.convert
    calls = []
    real = spikingir.convert.calibrate_layers
    monkeypatch.setattr(spikingir.convert, "calibrate_layers",
                        lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    data, ck = files / "gray48", tmp_path / "run.ckpt"
    argv = ["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights", str(files / "dncnn.pt"),
            "--timesteps", "2", "--steps", "2", "--batch-size", "2", "--data", str(data),
            "--val-data", str(data), "--val-crop", "32", "--checkpoint", str(ck)]
    code, _, err = run(argv + ["--out", str(tmp_path / "a.pt")], capsys)
    assert code == 0 and calls == ["weights"], err
    assert torch.load(tmp_path / "a.pt", weights_only=True)["meta"]["layer_calibration"] == "weights"
    code, _, err = run(argv + ["--resume", "--out", str(tmp_path / "b.pt")], capsys)
    assert code == 0 and calls == ["weights"], err
    a, b = (torch.load(tmp_path / f, weights_only=True)["state_dict"] for f in ("a.pt", "b.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_at_several_timesteps(files, tmp_path, capsys):
    """--timesteps 2 3: each batch runs at T=2 or T=3 (drawn from the seeded torch
    RNG: both occur, the same sequence again when repeated); validation and the
    saved SNN use the largest T, and the file records both."""
    from spikingir.convert import to_snn
    from spikingir.finetune import finetune_snn
    from spikingir.pipeline import load_snn
    data = files / "gray48"
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))

    def trained_ts():
        snn = to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 3, backend="cpp")
        seen, val_seen = [], []
        snn.register_forward_pre_hook(
            lambda m, a: (seen if m.training else val_seen).append(m.timesteps))
        finetune_snn(snn, "denoise", sigma=25, data=data, val_data=data, steps=8, batch_size=2,
                     val_crop=32, timesteps=[3, 2], progress=False, log=lambda _: None)
        assert snn.timesteps == 3 and set(val_seen) == {3}
        return seen
    seen = trained_ts()
    assert len(seen) == 8 and set(seen) == {2, 3}
    assert trained_ts() == seen
    with pytest.raises(ValueError, match="timesteps"):
        finetune_snn(to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 3, backend="cpp"), "denoise",
                     sigma=25, data=data, val_data=data, timesteps=[])
    out = tmp_path / "snn.pt"
    code, stdout, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights",
                             str(files / "dncnn.pt"), "--timesteps", "2", "3", "--steps", "2",
                             "--batch-size", "2", "--data", str(data), "--val-data", str(data),
                             "--val-crop", "32", "--no-progress", "--log-every", "1", "--out", str(out)],
                            capsys)
    assert code == 0, err
    assert "step 1/2" in err and "step 2/2" in err  # plain log lines, one per step
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["timesteps"] == [2, 3] and meta["steps"] == 2 and meta["patch_size"] == 40
    assert meta["val_step"] == 2 and meta["val_psnr"] > 0  # the last validation's figures
    from spikingir.pipeline import ann_fingerprint, load_ann
    assert meta["ann_fingerprint"] == ann_fingerprint(load_ann("denoise", 25, files / "dncnn.pt"))
    assert load_snn(out).timesteps == 3


def test_finetune_patch_size(files, tmp_path, capsys):
    """--patch-size N trains on N x N patches (the SNN sees [B, 1, N, N] batches)
    and the file records it; a patch larger than every image is one clear line."""
    from spikingir.convert import to_snn
    from spikingir.finetune import finetune_snn
    data = files / "gray48"
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))
    snn = to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 2, backend="cpp")
    shapes = set()
    snn.register_forward_pre_hook(lambda m, a: shapes.add(tuple(a[0].shape)) if m.training else None)
    finetune_snn(snn, "denoise", sigma=25, data=data, val_data=data, steps=2, batch_size=3,
                 patch=24, val_crop=32, progress=False, log=lambda _: None)
    assert shapes == {(3, 1, 24, 24)}
    out = tmp_path / "snn.pt"
    args = ["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights",
            str(files / "dncnn.pt"), "--timesteps", "2", "--steps", "1", "--batch-size", "2",
            "--data", str(data), "--val-data", str(data), "--val-crop", "32", "--no-progress",
            "--out", str(out)]
    code, _, err = run(args + ["--patch-size", "32"], capsys)
    assert code == 0, err
    assert torch.load(out, weights_only=True)["meta"]["patch_size"] == 32
    out.unlink()
    code, _, err = run(args + ["--patch-size", "49"], capsys)
    assert code == 2 and "no 49 x 49 patch fits" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_warnings_are_one_line(files, tmp_path, capsys):
    """A warning of the library under a command prints as one line, ``spikingir:
    warning: ...`` (found by a user journey: Python's form with the library's file,
    line and source such as ``img = load(path)``); Python's own form is back after."""
    import sys
    import warnings
    folder = tmp_path / "colour"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 44, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "c.png")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # as Python's default outside pytest (which records warnings): to stderr
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))
        code, _, err = run(["convert", "--task", "denoise", "--sigma", "25", "--ann-weights",
                            str(files / "dncnn.pt"), "--data", str(folder), "--timesteps", "2",
                            "--layer-calibration", "none", "--out", str(tmp_path / "s.pt")],
                           capsys)
    assert code == 0, err
    assert (f"spikingir: warning: {folder}: colour images are converted to gray (luma) for the "
            "grayscale denoising model\n") in err, err
    assert ".py:" not in err and "UserWarning" not in err, err
    assert warnings.formatwarning is not cli._warning_line


def test_finetune_and_refit_a_colour_snn(files, tmp_path, capsys):
    """A colour SNN (3 input channels) fine-tunes on RGB patches and validates in
    RGB (gray training files replicated, with a warning; it failed on gray patches
    after the conversion); refit-mapper fits its mapper on RGB crops."""
    train = tmp_path / "train"
    train.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(train / "c.png")
    out = tmp_path / "snn.pt"
    with pytest.warns(UserWarning, match="gray images are replicated to RGB"):
        code, stdout, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights",
                                 str(files / "dncnn3.pt"), "--timesteps", "2", "--steps", "1",
                                 "--batch-size", "2", "--patch-size", "16", "--data", str(train),
                                 "--val-data", str(files / "gray"), "--val-crop", "16",
                                 "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    saved = torch.load(out, weights_only=True)
    assert saved["state_dict"]["conv1.weight"].shape[1] == 3
    assert np.isfinite(saved["meta"]["val_psnr"])
    code, stdout, err = run(["refit-mapper", "--sigma", "25", "--snn-weights", str(out), "--data",
                             str(train), "--images", "1", "--crop", "32", "--timesteps", "2",
                             "--out", str(tmp_path / "refit.pt")], capsys)
    assert code == 0, err
    assert "fitted by least squares on 1 crops" in stdout


def test_finetune_freeze_mapper_keeps_the_anns_output_conv(files, tmp_path, capsys):
    """--freeze-mapper (the "without mapper" ablation) keeps the ANN's output conv
    as the mapper also after the default layer calibration, which refits the
    mapper (the frozen mapper was that fit, 0.25 away from the ANN's conv)."""
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))
    out = tmp_path / "snn.pt"
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights",
                        str(files / "dncnn.pt"), "--timesteps", "2", "--steps", "1", "--batch-size", "2",
                        "--patch-size", "16", "--data", str(files / "gray48"), "--val-data",
                        str(files / "gray48"), "--val-crop", "16", "--no-progress", "--freeze-mapper",
                        "--out", str(out)], capsys)
    assert code == 0, err
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["layer_calibration"] == "weights" and saved["meta"]["train_mapper"] is False
    last = ann.convs()[-1]
    assert torch.equal(saved["state_dict"]["mapper.conv.weight"], last.weight.detach())
    assert torch.equal(saved["state_dict"]["mapper.conv.bias"], last.bias.detach())
    assert not torch.equal(saved["state_dict"]["hidden.0.module.weight"], ann.convs()[1].weight)


def test_finetune_with_fewer_patches_than_the_batch_says_so(files, tmp_path, capsys):
    """A training folder of one image gives 2 patches of 40 x 40: with the default
    batch of 8 the error names the patches and the batch size (it was fit's
    "train_loader yields no batch (... drop_last?)")."""
    from spikingir.convert import to_snn
    from spikingir.finetune import finetune_snn
    one = tmp_path / "one"
    one.mkdir()
    (one / "t0.png").write_bytes((files / "gray48" / "t0.png").read_bytes())
    snn = to_snn(DnCNN(depth=4, channels=8, batchnorm=False).eval(), [torch.rand(1, 1, 16, 16)], 2)
    with pytest.raises(ValueError, match=r"one: 2 40 x 40 patches, fewer than the batch size 8"):
        finetune_snn(snn, "denoise", sigma=25, data=one, val_data=one, steps=1, progress=False)
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights",
                        str(files / "dncnn.pt"), "--timesteps", "2", "--steps", "1", "--data", str(one),
                        "--val-data", str(one), "--out", str(tmp_path / "a.pt")], capsys)
    assert code == 2 and "fewer than the batch size 8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.pt").exists()


def test_finetune_dehaze_with_fewer_pairs_than_the_batch_repeats_them(tmp_path):
    """Dehazing samples are random crops: a folder with fewer training pairs than
    the batch passes over them again in one batch (as train-ann does), rather than
    failing with fit's "train_loader yields no batch"."""
    from spikingir.convert import to_snn
    from spikingir.finetune import finetune_snn
    rng = np.random.default_rng(0)
    d = tmp_path / "pairs"
    (d / "hazy").mkdir(parents=True)
    (d / "gt").mkdir()
    for scene in ("1", "2"):  # scene 2 is held out for validation: one training pair
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / "gt" / f"{scene}.png")
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / "hazy" / f"{scene}_1.png")
    torch.manual_seed(0)
    snn = to_snn(AODNet().eval(), [torch.rand(1, 3, 16, 16)], 2)
    res = finetune_snn(snn, "dehaze", data=d, steps=1, batch_size=4, patch=16, progress=False)
    assert res.step == 1 and all(torch.isfinite(p).all() for p in snn.parameters())


def test_finetune_of_an_snn_file_notes_another_sigma_and_another_teacher(files, tmp_path, capsys):
    """finetune --snn-weights says, as evaluate does, when the file was fine-tuned
    at another sigma, and when --distill trains towards another ANN than the one
    the SNN was converted from (both were silent)."""
    from spikingir.convert import to_snn
    from spikingir.pipeline import ann_fingerprint, save_snn
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))
    path = tmp_path / "s25.pt"
    save_snn(to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 2), path,
             {"sigma": 25, "ann_fingerprint": ann_fingerprint(ann)})
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(DnCNN(depth=4, channels=8, batchnorm=False).state_dict(), other)
    base = ["finetune", "--task", "denoise", "--snn-weights", str(path), "--timesteps", "2",
            "--steps", "1", "--batch-size", "2", "--patch-size", "16", "--data", str(files / "gray48"),
            "--val-data", str(files / "gray48"), "--val-crop", "16", "--no-progress"]
    code, _, err = run(base + ["--sigma", "50", "--distill", "1", "--ann-weights", str(other),
                               "--out", str(tmp_path / "a.pt")], capsys)
    assert code == 0, err
    assert f"{path} was fine-tuned at sigma 25, used here at sigma 50" in err
    assert f"{path} was converted from another ANN than {other}" in err
    code, _, err = run(base + ["--sigma", "25", "--distill", "1", "--ann-weights",
                               str(files / "dncnn.pt"), "--out", str(tmp_path / "b.pt")], capsys)
    assert code == 0 and "note" not in err, err


def test_finetune_refuses_what_it_could_only_fail_at_the_end(files, tmp_path, capsys):
    """Output paths and numbers that a fine-tuning run would only trip over when it
    writes its results (hours later), or that would overwrite a run's checkpoint,
    are one-line errors before any work, and leave no file behind."""
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"a previous run")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights", str(files / "dncnn.pt"),
            "--steps", "1", "--data", str(files / "gray48"), "--val-data", str(files / "gray48")]
    cases = [
        (["--checkpoint", str(ckpt), "--out", str(tmp_path / "a.pt")], "exists: pass --resume"),
        (["--resume", "--out", str(tmp_path / "a.pt")], "--resume needs --checkpoint"),
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(a_file / "a.pt")], "is not a writable folder"),
        (["--checkpoint", str(tmp_path), "--resume", "--out", str(tmp_path / "a.pt")], "is a directory"),
        (["--percentile", "0", "--out", str(tmp_path / "a.pt")], "a percentile in (0, 100]"),
        (["--percentile", "101", "--out", str(tmp_path / "a.pt")], "a percentile in (0, 100]"),
        (["--threads", "0", "--out", str(tmp_path / "a.pt")], "a positive integer"),
        (["--lr-weights=-1e-5", "--out", str(tmp_path / "a.pt")], "a finite number >= 0"),
        (["--time-limit=-5", "--out", str(tmp_path / "a.pt")], "a finite number >= 0"),
        (["--log-every=-1", "--out", str(tmp_path / "a.pt")], "an integer >= 0"),
        (["--offset-percentile", "100", "--out", str(tmp_path / "a.pt")], "[0, 100)"),
        (["--checkpoint", str(tmp_path / "a.pt"), "--out", str(tmp_path / "a.pt")],
         "--out and --checkpoint both name"),  # the SNN overwrote the checkpoint
        (["--energy-target", "0.45", "--out", str(tmp_path / "a.pt")],
         "it needs --energy-weight > 0"),  # trained without the term, recorded as a budget
    ]
    for extra, message in cases:
        code, out, err = run(base + extra, capsys)
        assert code == 2 and message in err, (extra, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run.ckpt"]
    assert ckpt.read_bytes() == b"a previous run"


def test_convert_writes_the_snn_that_evaluate_takes(files, tmp_path, capsys):
    """`spikingir convert` writes the conversion of --ann-weights, calibrated on
    --data: the same network as to_snn on the same calibration images; evaluate
    runs it with --snn-weights; a weights file of the other model is one line."""
    from spikingir.convert import to_snn
    from spikingir.pipeline import calibration_inputs, load_ann, load_snn, save_snn
    out = tmp_path / "snn.pt"
    code, stdout, err = run(["convert", "--task", "denoise", "--sigma", "25", "--ann-weights",
                             str(files / "dncnn.pt"), "--data", str(files / "gray48"), "--timesteps",
                             "3", "--neuron", "if", "--out", str(out)], capsys)
    assert code == 0, err
    assert "IF SNN, T=3" in stdout and "gray48" in stdout
    snn = load_snn(out).eval()
    assert snn.timesteps == 3 and snn.neuron_kind == "if" and snn.meta["steps"] == 0
    ref = to_snn(load_ann("denoise", 25, files / "dncnn.pt"),
                 calibration_inputs("denoise", 25, data=files / "gray48"), 3, neuron="if",
                 per_channel=True, v0="half", layer_calibration="weights").eval()  # the CLI's defaults
    x = torch.rand(1, 1, 20, 22)
    with torch.no_grad():
        torch.testing.assert_close(snn(x), ref(x), rtol=0, atol=1e-6)
    code, stdout, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--ann-weights",
                             str(files / "dncnn.pt"), "--snn-weights", str(out), "--data",
                             str(files / "gray"), "--timesteps", "3"], capsys)
    assert code == 0, err
    assert "another ANN" not in err
    # against the shipped ANN instead: evaluate says the figures compare different networks
    code, stdout, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--snn-weights", str(out),
                             "--data", str(files / "gray"), "--timesteps", "3"], capsys)
    assert code == 0 and "was converted from another ANN than the shipped ANN" in err, err
    # a file that does not record its ANN: evaluate says it cannot check
    snn = load_snn(out)
    snn.meta.pop("ann_fingerprint")
    save_snn(snn, tmp_path / "anon.pt")
    code, stdout, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--ann-weights",
                             str(files / "dncnn.pt"), "--snn-weights", str(tmp_path / "anon.pt"),
                             "--data", str(files / "gray"), "--timesteps", "3"], capsys)
    assert code == 0 and "does not record the ANN it was converted from" in err, err
    for argv, message in ((["--task", "dehaze", "--ann-weights", str(files / "dncnn.pt")], ""),
                          (["--task", "denoise", "--sigma", "25", "--data", str(tmp_path / "none")],
                           "no such directory")):
        code, stdout, err = run(["convert", *argv, "--out", str(tmp_path / "x.pt")], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.pt").exists()


def test_convert_with_layer_calibration(files, tmp_path, capsys):
    """--layer-calibration runs calibrate_layers on the calibration images after the
    conversion (the same network as to_snn with it) and is recorded in the file;
    for AOD-Net it is one line, exit 2, no file."""
    from spikingir.convert import to_snn
    from spikingir.pipeline import calibration_inputs, load_ann, load_snn
    out = tmp_path / "cal.pt"
    code, stdout, err = run(["convert", "--task", "denoise", "--sigma", "25", "--ann-weights",
                             str(files / "dncnn.pt"), "--data", str(files / "gray48"), "--timesteps",
                             "3", "--layer-calibration", "weights", "--out", str(out)], capsys)
    assert code == 0, err
    assert "and layer calibration (weights), calibrated on" in stdout
    snn = load_snn(out).eval()
    assert snn.meta["layer_calibration"] == "weights"
    code, stdout, err = run(["convert", "--task", "denoise", "--sigma", "25", "--ann-weights",
                             str(files / "dncnn.pt"), "--data", str(files / "gray48"), "--timesteps",
                             "3", "--layer-calibration", "none", "--out", str(tmp_path / "plain.pt")],
                            capsys)
    assert code == 0 and "layer calibration" not in stdout, err
    assert load_snn(tmp_path / "plain.pt").meta["layer_calibration"] is None
    ref = to_snn(load_ann("denoise", 25, files / "dncnn.pt"),
                 calibration_inputs("denoise", 25, data=files / "gray48"), 3, per_channel=True,
                 v0="half", layer_calibration="weights").eval()
    x = torch.rand(1, 1, 20, 22)
    with torch.no_grad():
        torch.testing.assert_close(snn(x), ref(x), rtol=0, atol=1e-6)
    code, stdout, err = run(["convert", "--task", "dehaze", "--ann-weights", str(files / "aod.pt"),
                             "--data", str(files / "haze"), "--layer-calibration", "bias", "--out",
                             str(tmp_path / "aod.pt")], capsys)
    assert code == 2 and "--layer-calibration: for denoising (DnCNN) only" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "aod.pt").exists()


def test_refit_mapper_command(files, tmp_path, capsys):
    """refit-mapper rewrites only the mapper of an SNN file (the library's refit on
    the same crops) and records the refit; bad input is one line, exit 2, no file."""
    from spikingir.finetune import refit_mapper
    from spikingir.pipeline import denoise_pairs, load_snn
    snn_file, out = tmp_path / "snn.pt", tmp_path / "refit.pt"
    code, _, err = run(["convert", "--task", "denoise", "--sigma", "25", "--ann-weights",
                        str(files / "dncnn.pt"), "--data", str(files / "gray48"), "--timesteps", "3",
                        "--out", str(snn_file)], capsys)
    assert code == 0, err
    code, stdout, err = run(["refit-mapper", "--sigma", "25", "--snn-weights", str(snn_file),
                             "--data", str(files / "gray48"), "--images", "2", "--crop", "32",
                             "--timesteps", "2", "3", "--out", str(out)], capsys)
    assert code == 0 and "fitted by least squares on 2 crops" in stdout, err
    got, start = load_snn(out), load_snn(snn_file)
    assert got.meta["mapper_refit"]["timesteps"] == [2, 3] and got.timesteps == 3
    ref = refit_mapper(load_snn(snn_file).eval(), *denoise_pairs(25, files / "gray48", 2, 32), [2, 3])
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=0)
        assert torch.equal(v, start.state_dict()[k]) != k.startswith("mapper."), k
    for argv, message in ((["--sigma", "30"], "sigma"),
                          (["--sigma", "25", "--data", str(tmp_path / "none")], "no such directory"),
                          (["--sigma", "25", "--snn-weights", str(tmp_path / "none.pt"), "--data",
                            str(files / "gray48")], "none.pt")):
        code, _, err = run(["refit-mapper", *argv, "--out", str(tmp_path / "x.pt")], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.pt").exists()
    # a graph SNN (a network with skips) has read-out convs, no pixel mapper to refit: one
    # line, exit 2 (found in review: refit_mapper's TypeError ended in a traceback)
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("colour_net", None))
    exec(_COLOUR_NET, mod.__dict__)
    save_snn(to_snn(mod.colour().eval(), [torch.rand(1, 3, 16, 16)], 2), tmp_path / "graph.pt")
    code, _, err = run(["refit-mapper", "--sigma", "25", "--snn-weights", str(tmp_path / "graph.pt"),
                        "--data", str(files / "gray48"), "--out", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "got a SpikingGraph" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.pt").exists()


def test_ann_fingerprint_is_of_the_network_not_its_form():
    """The same weights with BN or BN folded give one fingerprint; other weights another."""
    from spikingir.models import fold_batchnorm
    from spikingir.pipeline import ann_fingerprint
    torch.manual_seed(0)
    bn = DnCNN(depth=3, channels=4, batchnorm=True).eval()
    for m in bn.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(bn)
    assert ann_fingerprint(bn) == ann_fingerprint(folded)
    assert len(ann_fingerprint(bn)) == 16
    with torch.no_grad():
        folded.dncnn[0].weight[0, 0, 0, 0] += 1e-3
    assert ann_fingerprint(folded) != ann_fingerprint(bn)


def test_finetune_interrupted_is_one_line(files, tmp_path, capsys, monkeypatch):
    """Ctrl-C during fine-tuning: exit status 130, one line that says where the
    progress is (the checkpoint, or that none was kept), no traceback, no --out."""
    import spikingir.finetune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(spikingir.finetune, "finetune_snn", interrupted)
    base = ["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights", str(files / "dncnn.pt"),
            "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
            "--out", str(tmp_path / "snn.pt")]
    (tmp_path / "old.ckpt").write_bytes(b"a run's progress")
    for extra, kept in (([], "nothing kept"),
                        (["--checkpoint", str(tmp_path / "c.ckpt")], "no checkpoint yet"),
                        (["--checkpoint", str(tmp_path / "old.ckpt"), "--resume"],
                         "old.ckpt (--resume continues)")):
        code, out, err = run(base + extra, capsys)
        assert code == 130 and "interrupted" in err and kept in err, err
        assert "Traceback" not in err and not (tmp_path / "snn.pt").exists()


def test_finetune_ssim_term_and_recycling_off(files, tmp_path, capsys):
    """--ssim-weight adds (1 - SSIM) to the loss: the same seeded run ends at other
    weights than without it; --no-recycling turns a loaded SNN's recycling off;
    both are recorded; a negative weight is a clear error."""
    from spikingir.convert import to_snn
    from spikingir.finetune import finetune_snn
    from spikingir.pipeline import load_snn, save_snn
    data = files / "gray48"
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))

    def tuned(ssim_weight, snn=None):
        torch.manual_seed(0)
        snn = snn or to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 2, backend="cpp")
        res = finetune_snn(snn, "denoise", sigma=25, data=data, val_data=data, steps=2,
                           batch_size=2, val_crop=32, ssim_weight=ssim_weight, progress=False,
                           log=lambda _: None)
        return snn.state_dict(), res
    (plain, res), (with_ssim, _) = tuned(0.0), tuned(0.5)
    assert torch.equal(plain["hidden.0.module.weight"], tuned(0.0)[0]["hidden.0.module.weight"])
    assert not torch.equal(plain["hidden.0.module.weight"], with_ssim["hidden.0.module.weight"])
    snn = to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 2, backend="cpp")
    with pytest.raises(ValueError, match="ssim_weight"):
        finetune_snn(snn, "denoise", sigma=25, data=data, val_data=data, ssim_weight=-1.0)
    start, out = tmp_path / "start.pt", tmp_path / "snn.pt"
    save_snn(snn, start, {})
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--snn-weights", str(start),
                        "--timesteps", "2", "--steps", "1", "--batch-size", "2", "--data", str(data),
                        "--val-data", str(data), "--val-crop", "32", "--ssim-weight", "0.2",
                        "--no-recycling", "--out", str(out)], capsys)
    assert code == 0, err
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["ssim_weight"] == 0.2 and meta["recycling"] is False
    assert load_snn(start).recycling and not load_snn(out).recycling


def test_finetune_validation_reports_the_energy_ratio(files):
    """Each fine-tuning validation adds `energy`: the counted SNN/ANN energy ratio of
    the validation forwards, here equal to that of the final SNN on the same inputs."""
    from spikingir.convert import to_snn
    from spikingir.data import add_gaussian_noise, center_crop, list_images, load_image
    from spikingir.energy import ann_energy_mj
    from spikingir.finetune import finetune_snn
    data = files / "gray48"
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))
    snn = to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 2, backend="cpp")
    res = finetune_snn(snn, "denoise", sigma=25, data=data, val_data=data, steps=2, batch_size=2,
                       val_crop=32, progress=False, log=lambda _: None)
    assert not snn._record  # validation's recording is switched off again
    ratios = []
    snn.record_stats(True)
    with torch.no_grad():
        for p in list_images(data):
            x = add_gaussian_noise(center_crop(load_image(p, gray=True), 32), 25, seed=0)
            snn(torch.from_numpy(x)[None, None])
            ratios.append(snn.energy_mj() / ann_energy_mj(ann, (1, 1, 32, 32)))
    assert 0 < res.history[-1]["energy"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)


def test_finetune_energy_target_penalises_only_the_excess(files):
    """energy_target is a budget: with the ratio under it the energy term is 0 and
    the run equals one without the term, bit for bit; with target 0 the same
    weight changes the weights; a negative target is refused."""
    from spikingir.convert import to_snn
    from spikingir.finetune import finetune_snn
    data = files / "gray48"
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))

    def run(**kw):
        snn = to_snn(ann.eval(), [torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))], 2,
                     backend="cpp")
        finetune_snn(snn, "denoise", sigma=25, data=data, val_data=data, steps=3, batch_size=2, val_crop=32,
                     progress=False, log=lambda _: None, seed=4, **kw)
        return snn.state_dict()

    plain, budget = run(), run(energy_weight=1.0, energy_target=100.0)
    penalised = run(energy_weight=1.0)
    assert all(torch.equal(plain[k], budget[k]) for k in plain)
    assert not all(torch.equal(plain[k], penalised[k]) for k in plain)
    with pytest.raises(ValueError, match="energy_target"):
        run(energy_weight=1.0, energy_target=-0.5)
    with pytest.raises(ValueError, match=r"needs energy_weight > 0"):  # was silently no term
        run(energy_target=0.45)


def test_finetune_distills_towards_the_ann(files, tmp_path, capsys):
    """--distill W: the targets are W x ANN(input) + (1 - W) x clean (the batch
    maker's targets, checked exactly); recorded in the file; W outside [0, 1]
    and W > 0 without a teacher are clear errors."""
    from spikingir.convert import to_snn
    from spikingir.finetune import _distilled, finetune_snn
    ann = DnCNN(depth=4, channels=8, batchnorm=False)
    ann.load_state_dict(torch.load(files / "dncnn.pt", weights_only=True))
    x, clean = torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 12)
    inputs, target = _distilled(lambda b, dev: (x, clean), ann, 0.25)(None, "cpu")
    with torch.no_grad():
        assert inputs is x and torch.allclose(target, 0.75 * clean + 0.25 * ann(x), atol=1e-6)
    snn = to_snn(ann.eval(), [torch.rand(1, 1, 16, 16)], 2, backend="cpp")
    with pytest.raises(ValueError, match="teacher"):
        finetune_snn(snn, "denoise", sigma=25, data=files / "gray48", val_data=files / "gray48",
                     distill=0.5)
    out = tmp_path / "snn.pt"
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--ann-weights",
                        str(files / "dncnn.pt"), "--timesteps", "2", "--steps", "2", "--batch-size",
                        "2", "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
                        "--val-crop", "32", "--distill", "1", "--out", str(out)], capsys)
    assert code == 0, err
    assert torch.load(out, weights_only=True)["meta"]["distill"] == 1.0
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--distill", "1.5",
                        "--out", str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "--distill" in err and not (tmp_path / "x.pt").exists()


def test_version_names_the_backends_available_here(capsys):
    """`spikingir --version`: the versions and, per op, the backends that can run on
    this machine's CPU (the same list as ops.available_backends), exit status 0."""
    import spikingir
    from spikingir.ops import available_backends
    code, out, err = run(["--version"], capsys)
    assert code == 0, err
    assert out.startswith(f"spikingir {spikingir.__version__}, torch {torch.__version__}")
    assert f"cpu spike_conv2d: {', '.join(available_backends('cpu', 'spike_conv2d'))}" in out
    assert ("cuda if_multistep:" in out) == torch.cuda.is_available()


_MY_NET = """
from torch import nn
from spikingir.models import Residual

def make():
    return Residual(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 5, padding=2, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)))

def leaky():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(8, 1, 3, padding=1))

def broken():
    raise RuntimeError("no GPU here")

def exits():  # a script-style file: restore exited 0 and wrote nothing
    import sys
    sys.exit(0)

def two_out():  # two output channels: no image format for them
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))

def shrinks():  # unpadded: the body's output is smaller than the image it subtracts from
    return Residual(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 1, 3)))

import torch.nn.functional as F

class Skips(nn.Module):  # a residual block and a global skip: the graph conversion
    def __init__(self, pool=False):
        super().__init__()
        self.head, self.tail = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.pool = pool

    def forward(self, x):
        h = F.relu(self.head(x))
        if self.pool:
            h = F.max_pool2d(h, 3, 1, 1)
        h = F.relu(h + self.b(F.relu(self.a(h))))
        return x - self.tail(h)

def skips():
    return Skips()

def max_pooled():
    return Skips(pool=True)

class UNet(nn.Module):  # average pooling, upsampling, a concatenation: no receptive radius
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.a(x))
        u = F.interpolate(F.relu(self.b(F.avg_pool2d(h, 2))), scale_factor=2)
        return x - self.c(torch.cat([h, u], 1))

import torch

def unet():
    return UNet()
"""


def _my_net(tmp_path, name):
    """``_MY_NET`` written to ``tmp_path/mynet.py`` and imported as module ``name``:
    (its path, the module)."""
    import importlib.util
    net = tmp_path / "mynet.py"
    net.write_text(_MY_NET)
    spec = importlib.util.spec_from_file_location(name, net)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return net, mod


def test_ann_module_takes_your_own_network_through_the_cli(files, tmp_path, capsys):
    """--ann-module FILE.py:FUNCTION builds your network and --ann-weights loads into it:
    convert, evaluate (against that ANN: no note about another ANN) and finetune run on
    it; each mistake is one line and exit status 2."""
    net, mod = _my_net(tmp_path, "mynet_for_test")
    torch.manual_seed(0)
    torch.save(mod.make().state_dict(), tmp_path / "w.pt")
    torch.save(mod.shrinks().state_dict(), tmp_path / "shrinks.pt")
    torch.save(mod.two_out().state_dict(), tmp_path / "two.pt")
    code, _, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(tmp_path / "two.png"),
                        "--task", "denoise", "--sigma", "25", "--timesteps", "2", "--ann-module",
                        f"{net}:two_out", "--ann-weights", str(tmp_path / "two.pt")], capsys)
    assert code == 2 and "returns 2 channels" in err and not (tmp_path / "two.png").exists()
    common = ["--task", "denoise", "--sigma", "25", "--ann-module", f"{net}:make",
              "--ann-weights", str(tmp_path / "w.pt")]
    snn_file = tmp_path / "snn.pt"
    code, out, err = run(["convert", *common, "--timesteps", "2", "--out", str(snn_file),
                          "--threads", "1"], capsys)
    assert code == 0, err
    meta = torch.load(snn_file, weights_only=True)["meta"]
    assert meta["ann_module"] == f"{net}:make"
    assert torch.load(snn_file, weights_only=True)["config"]["arch"] == "chain"
    code, out, err = run(["evaluate", *common, "--snn-weights", str(snn_file), "--data",
                          str(files / "gray"), "--timesteps", "2", "--threads", "1"], capsys)
    assert code == 0 and "| SNN | 2 |" in out, err
    assert "another ANN" not in err
    code, _, err = run(["finetune", *common, "--timesteps", "2", "--steps", "1", "--batch-size",
                        "2", "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
                        "--val-crop", "32", "--no-progress", "--out", str(tmp_path / "ft.pt")],
                       capsys)
    assert code == 0, err
    bad = tmp_path / "bad.py"
    bad.write_text("this is not python(")
    for module, weights, expected in [
            (f"{net}:missing", "w.pt", "has no function 'missing'"),
            (f"{net}:leaky", "w.pt", r"layer 1 \(LeakyReLU\) is not supported"),
            (f"{net}:broken", "w.pt", "calling it failed \\(RuntimeError: no GPU here\\)"),
            (f"{net}:exits", "w.pt", "calling it failed \\(SystemExit"),
            (f"{bad}:make", "w.pt", "importing it failed \\(SyntaxError"),
            (f"{tmp_path / 'nofile.py'}:make", "w.pt", "no such file"),
            (f"{net}", "w.pt", "expected FILE.py:FUNCTION"),
            (f"{net}:make", "snn.pt", "does not fit the network of"),
            (f"{net}:make", None, "needs --ann-weights"),
            (f"{net}:shrinks", "shrinks.pt", r"the network fails on a \(1, 1, 48, 48\) image")]:
        args = ["evaluate", "--task", "denoise", "--sigma", "25", "--ann-module", module,
                "--data", str(files / "gray"), "--timesteps", "2"]
        if weights:
            args += ["--ann-weights", str(tmp_path / weights)]
        code, _, err = run(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (module, err)
        assert re.search(expected, err), (expected, err)


def test_ann_module_takes_a_network_with_skips(files, tmp_path, capsys):
    """--ann-module takes a network of the graph conversion (skips): convert writes a
    graph SNN file (layer-calibrated by default, as to_snn with layer_calibration=
    "weights" makes it) that evaluate, restore and finetune take with
    --snn-weights; finetune --freeze-mapper keeps the ANN's read-out conv after
    the calibration; max pooling in it is refused in one line before any work."""
    from spikingir.convert import to_snn
    from spikingir.pipeline import calibration_inputs, load_snn
    net, mod = _my_net(tmp_path, "mynet_for_skips")
    torch.manual_seed(0)
    ann = mod.skips()
    torch.save(ann.state_dict(), tmp_path / "w.pt")
    common = ["--task", "denoise", "--sigma", "25", "--ann-module", f"{net}:skips",
              "--ann-weights", str(tmp_path / "w.pt")]
    snn_file = tmp_path / "snn.pt"
    code, out, err = run(["convert", *common, "--timesteps", "2", "--out", str(snn_file),
                          "--data", str(files / "gray48"), "--threads", "1"], capsys)
    assert code == 0 and "and layer calibration (weights)" in out, err
    saved = torch.load(snn_file, weights_only=True)
    assert saved["config"]["arch"] == "graph" and saved["meta"]["layer_calibration"] == "weights"
    ref = to_snn(ann.eval(), calibration_inputs("denoise", 25, data=files / "gray48"), 2,
                 per_channel=True, v0="half", layer_calibration="weights")
    # the file keeps what each conv got (found: only the converted network in memory had it)
    assert saved["meta"]["calibrated_layers"] == ref.meta["calibrated_layers"]
    x = torch.rand(1, 1, 20, 22)
    with torch.no_grad():
        torch.testing.assert_close(load_snn(snn_file).eval()(x), ref(x), rtol=0, atol=1e-6)
    code, _, err = run(["finetune", *common, "--timesteps", "2", "--steps", "1", "--batch-size",
                        "2", "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
                        "--val-crop", "32", "--no-progress", "--freeze-mapper", "--out",
                        str(tmp_path / "frozen.pt")], capsys)
    assert code == 0, err
    frozen = torch.load(tmp_path / "frozen.pt", weights_only=True)
    assert frozen["meta"]["layer_calibration"] == "weights"
    assert torch.equal(frozen["state_dict"]["layers.tail.weight"], ann.tail.weight.detach())
    assert not torch.equal(frozen["state_dict"]["layers.b.weight"], ann.b.weight.detach())
    code, out, err = run(["evaluate", *common, "--snn-weights", str(snn_file), "--data",
                          str(files / "gray"), "--timesteps", "2", "--threads", "1"], capsys)
    assert code == 0 and "| SNN | 2 |" in out, err
    assert "another ANN" not in err
    dst = tmp_path / "out.png"
    code, out, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(dst), "--task",
                          "denoise", "--sigma", "25", "--timesteps", "2", "--snn-weights",
                          str(snn_file)], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(dst)).shape == (20, 24)
    code, out, err = run(["restore", str(files / "gray" / "im0.png"), "-o",  # graphs chunk too
                          str(tmp_path / "chunked.png"), "--task", "denoise", "--sigma", "25",
                          "--timesteps", "2", "--snn-weights", str(snn_file), "--step-chunk",
                          "1"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "chunked.png")),
                          np.asarray(Image.open(dst)))
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--snn-weights",
                        str(snn_file), "--timesteps", "2", "--steps", "1", "--batch-size", "2",
                        "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
                        "--val-crop", "32", "--no-progress", "--out", str(tmp_path / "ft.pt")],
                       capsys)
    assert code == 0, err
    assert torch.load(tmp_path / "ft.pt", weights_only=True)["config"]["arch"] == "graph"
    code, _, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--ann-module",
                        f"{net}:max_pooled", "--ann-weights", str(tmp_path / "w.pt"), "--data",
                        str(files / "gray"), "--timesteps", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"node 'max_pool2d'.*ReLU activations only", err), err


def test_notes_name_the_ann_module_an_snn_file_was_converted_from(files, tmp_path, capsys):
    """evaluate's note on an SNN compared with another ANN said "pass --ann-weights
    with the SNN's own ANN", which for a network of your own fails ("not a DnCNN
    checkpoint"), and finetune --snn-weights dropped the file's ann_module record
    (found evaluating a fine-tuned U-Net SNN without --ann-module). The record is
    kept and the note names --ann-module too."""
    net, mod = _my_net(tmp_path, "mynet_for_notes")
    torch.manual_seed(0)
    torch.save(mod.skips().state_dict(), tmp_path / "w.pt")
    snn_file, ft = tmp_path / "snn.pt", tmp_path / "ft.pt"
    code, _, err = run(["convert", "--task", "denoise", "--sigma", "25", "--ann-module",
                        f"{net}:skips", "--ann-weights", str(tmp_path / "w.pt"), "--timesteps",
                        "2", "--layer-calibration", "none", "--out", str(snn_file), "--data",
                        str(files / "gray48")], capsys)
    assert code == 0, err
    code, _, err = run(["finetune", "--task", "denoise", "--sigma", "25", "--snn-weights",
                        str(snn_file), "--timesteps", "2", "--steps", "1", "--batch-size", "2",
                        "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
                        "--val-crop", "32", "--no-progress", "--out", str(ft)], capsys)
    assert code == 0, err
    assert torch.load(ft, weights_only=True)["meta"]["ann_module"] == f"{net}:skips"
    code, _, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--snn-weights",
                        str(ft), "--ann-weights", str(files / "dncnn.pt"), "--data",
                        str(files / "gray"), "--timesteps", "2"], capsys)
    assert code == 0 and f"pass --ann-module {net}:skips --ann-weights with the SNN's own" in err


def test_restore_says_how_to_restore_an_image_larger_than_a_tile_with_a_unet(tmp_path, capsys):
    """A U-Net (pooling, upsampling) has no receptive radius to tile by: restore of an
    image larger than --tile (the default 512 too) stopped with receptive_radius's
    Python advice ("pass margin= explicitly (or restore with tile=0)"), after the
    conversion (found restoring a photo with a 2-level U-Net SNN). It is now refused
    before any work, with --ann-module as with --snn-weights, naming --tile 0."""
    from spikingir.pipeline import load_ann
    net, mod = _my_net(tmp_path, "mynet_for_unet")
    torch.manual_seed(0)
    torch.save(mod.unet().state_dict(), tmp_path / "w.pt")
    snn_file = tmp_path / "snn.pt"
    module = ["--ann-module", f"{net}:unet", "--ann-weights", str(tmp_path / "w.pt")]
    save_snn(to_snn(load_ann("denoise", 25, str(tmp_path / "w.pt"), f"{net}:unet"),
                    [torch.rand(1, 1, 16, 16)], 2), snn_file)
    img = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 66), dtype=np.uint8)).save(img)
    dst = tmp_path / "out.png"
    for given in (module, ["--snn-weights", str(snn_file)]):
        common = ["restore", str(img), "-o", str(dst), "--task", "denoise", "--sigma", "25",
                  "--timesteps", "2", *given]
        code, _, err = run([*common, "--tile", "64"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "larger than --tile 64" in err and "pass --tile 0" in err and "margin=" not in err
        assert not dst.exists()
        code, _, err = run([*common, "--tile", "0"], capsys)
        assert code == 0, err
        assert np.asarray(Image.open(dst)).shape == (70, 66)
        dst.unlink()


def test_closed_stdout_is_not_a_traceback():
    """`spikingir --version | true`: the reader exits before spikingir writes; the
    command stops quietly instead of printing a BrokenPipeError traceback."""
    import subprocess
    import sys
    res = subprocess.run(f"'{sys.executable}' -m spikingir --version | true", shell=True,
                         stderr=subprocess.PIPE, timeout=300)
    assert b"Traceback" not in res.stderr and b"BrokenPipe" not in res.stderr, res.stderr[-500:]


def test_version_names_the_cpu_instruction_set(capsys, monkeypatch):
    """--version says which instruction set the CPU spike_conv2d kernels use,
    and SPIKINGIR_CPU_ISA caps it."""
    from spikingir.ops import backends
    if not backends.HAS_CPP_OPS:
        pytest.skip("spikingir._C not built")
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and f"CPU spike_conv2d on {backends._C.cpu_isa()}" in out
    assert backends._C.cpu_isa() in ("avx512", "avx2", "generic")
    monkeypatch.setenv("SPIKINGIR_CPU_ISA", "generic")
    assert backends._C.cpu_isa() == "generic"
    assert "CPU spike_conv2d on generic" in run(["--version"], capsys)[1]


def test_write_atomic_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """A failed write names the requested file, not the temporary one beside it,
    keeps the OSError subclass, and leaves nothing behind."""
    import tempfile
    from spikingir.atomic import write_atomic

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=r"cannot write .*out\.png: Permission denied"):
        write_atomic(tmp_path / "out.png", b"x")
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError, match=r"cannot write .*out\.png"):
        write_atomic(tmp_path / "out.png", b"x")
    assert not list(tmp_path.iterdir())


def test_atomic_writes_follow_links_and_keep_special_files(tmp_path):
    """An output that is a symlink has its target replaced (the link was replaced by
    a plain file and the target never written); one that exists but is no regular
    file (a FIFO here, /dev/null in the report) is written directly (a root run
    replaced /dev/null by a plain file); a 250-character name works (the temporary
    name was '.tmp-' + the name: too long); a failed pair leaves the old pair."""
    import stat
    from spikingir.atomic import write_atomic
    from spikingir.train import save_weights
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "t.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so the write does not block
    try:
        write_atomic(fifo, b"abc")
        assert os.read(fd, 16) == b"abc" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    finally:
        os.close(fd)
    long_name = tmp_path / ("n" * 246 + ".png")
    write_atomic(long_name, b"x")
    assert long_name.read_bytes() == b"x"
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"OLD")
    (tmp_path / "m.json").mkdir()  # the metadata cannot be written
    with pytest.raises(OSError, match="cannot write"):
        save_weights(weights, {"w": torch.zeros(2)}, {"a": 1})
    assert weights.read_bytes() == b"OLD"  # was deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["real", "link.png", "fifo", long_name.name, "m.pt", "m.json"])


def test_cli_output_paths_and_interruptions(files, tmp_path, capsys, monkeypatch):
    """Found by a CLI audit: "-o dir/" wrote a file named dir; a 1x1 image among
    several (no --sigma) failed after the first output was written; train-ann's
    metadata path being a folder failed after training and deleted the old
    weights; Ctrl-C outside a training loop and a diverging fine-tuning printed
    tracebacks."""
    base = ["--task", "denoise", "--timesteps", "2", "--threads", "1"]
    code, out, err = run(["restore", str(files / "gray" / "im0.png"), "-o", str(tmp_path / "new") + "/",
                          "--sigma", "25", "--ann-weights", str(files / "dncnn.pt")] + base, capsys)
    assert code == 0 and (tmp_path / "new" / "im0.png").is_file(), err
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "dot.png")
    code, out, err = run(["restore", str(files / "gray" / "im0.png"), str(tmp_path / "dot.png"),
                          "-o", str(tmp_path / "many"), "--ann-weights", str(files / "dncnn.pt")]
                         + base, capsys)
    assert code == 2 and "too small to estimate its noise level; pass --sigma" in err, err
    assert not (tmp_path / "many").exists()
    (tmp_path / "m.json").mkdir()
    (tmp_path / "m.pt").write_bytes(b"OLD")
    code, out, err = run(["train-ann", "--task", "denoise", "--sigma", "25", "--steps", "1",
                          "--data", str(files / "gray48"), "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "m.json is a directory" in err and "Traceback" not in err, err
    assert (tmp_path / "m.pt").read_bytes() == b"OLD"

    import spikingir.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(spikingir.pipeline, "denoise_samples", interrupted)
    code, out, err = run(["evaluate", "--sigma", "25", "--data", str(files / "gray"),
                          "--ann-weights", str(files / "dncnn.pt")] + base, capsys)
    assert code == 130 and err.strip() == "spikingir evaluate: interrupted", err
    import spikingir.finetune

    def diverged(*args, **kwargs):
        raise FloatingPointError("fit: loss is inf at step 1")
    monkeypatch.setattr(spikingir.finetune, "finetune_snn", diverged)
    code, out, err = run(["finetune", "--sigma", "25", "--ann-weights", str(files / "dncnn.pt"),
                          "--data", str(files / "gray48"), "--val-data", str(files / "gray48"),
                          "--out", str(tmp_path / "s.pt")] + base, capsys)
    assert code == 1 and "loss is inf at step 1; try lower learning rates" in err, err
    assert "Traceback" not in err and not (tmp_path / "s.pt").exists()


def test_atomic_writes_to_pipes_and_name_the_right_file(tmp_path):
    """/dev/stdout and /dev/fd/N (a pipe: realpath gives no path) are written in
    place; setup and rename errors name the file asked for, the body's own
    exceptions pass unchanged; fsync is skipped where it cannot apply."""
    from spikingir.atomic import atomic_paths, write_atomic
    from spikingir.train import save_atomic, save_weights
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    r, w = os.pipe()
    try:
        write_atomic(f"/proc/self/fd/{w}", b"abc")
        save_atomic({"a": 1}, f"/proc/self/fd/{w}")  # no fsync of a pipe (EINVAL)
        assert os.read(r, 3) == b"abc"
    finally:
        os.close(r)
        os.close(w)
    (tmp_path / "w.pt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write .*w\.pt"):  # not w.json
        save_weights(tmp_path / "w.pt", {"a": torch.zeros(1)}, {"x": 1})
    with pytest.raises(FileNotFoundError, match="missing") as info:
        with atomic_paths(tmp_path / "o.txt"):
            open(tmp_path / "missing")
    assert "cannot write" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_evaluate_outputs_all_or_none_keeps_earlier_reports(files, tmp_path, capsys):
    """When the figures fail, the report files of an earlier run stay as they were
    (the rollback unlinked what the new run had renamed into place: the earlier
    report, a symlink, or a device such as /dev/null)."""
    real = tmp_path / "real.json"
    real.write_text("earlier report")
    link = tmp_path / "r.json"
    link.symlink_to(real)
    md = tmp_path / "r.md"
    md.write_text("earlier table")
    figs = tmp_path / "figs"
    (figs / "psnr_vs_T_denoise.png").mkdir(parents=True)  # the last figure cannot be written
    code, _, err = run(["evaluate", "--task", "denoise", "--sigma", "25", "--data",
                        str(files / "gray"), "--ann-weights", str(files / "dncnn.pt"),
                        "--timesteps", "1", "--threads", "1", "--json", str(link), "--markdown",
                        str(md), "--figures", str(figs)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert link.is_symlink() and real.read_text() == "earlier report"
    assert md.read_text() == "earlier table"
    assert sorted(p.name for p in figs.iterdir()) == ["psnr_vs_T_denoise.png"]
    assert not [p for p in tmp_path.rglob(".tmp-*")]
