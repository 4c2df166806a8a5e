"""Training loop (fit), checkpoints and resume, `spikingir train-ann` bad input,
and the shipped ANN weights."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spikingir import train
from spikingir.cli import main
from spikingir.models import AODNet, DnCNN
from spikingir.weights import WEIGHTS_DIR, load_shipped_ann, weights_path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Smooth(Dataset):
    """Smooth random 1 x 16 x 16 images; each access flips at random (global RNG),
    as the real patch sampler does."""

    def __init__(self, n=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(n, 1, 4, 4, generator=g)
        self.x = nn.functional.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return x.flip(-1) if torch.rand(()) < 0.5 else x


def _make_batch(clean, device):
    clean = clean.to(device)
    return clean + 0.1 * torch.randn_like(clean), clean


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return DnCNN(depth=3, channels=8, batchnorm=False)


def _loss_on(model, data):
    g = torch.Generator().manual_seed(123)
    clean = data.x
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(noisy), clean))


def _val_with_rng(model):
    torch.randn(7)  # validation must not shift the training stream
    np.random.rand(3)
    return {"psnr": 1.0}


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _no_temp_files(folder):
    return not [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- fit

def test_fit_lowers_loss(tmp_path, one_thread):
    data = _Smooth(16)
    model = _tiny_model()
    before = _loss_on(model, data)
    res = train.fit(model, DataLoader(data, batch_size=4, shuffle=True, drop_last=True), _make_batch,
                    steps=40, lr=3e-3, schedule="constant", log_every=0, progress=False)
    after = _loss_on(model, data)
    assert res.step == 40 and res.finished
    assert after < 0.5 * before, f"loss {before:.5f} -> {after:.5f}"


def test_lr_factor():
    assert train.lr_factor(0, 100, "cosine") == pytest.approx(1.0)
    assert train.lr_factor(99, 100, "cosine", min_factor=0.01) == pytest.approx(0.01)
    assert train.lr_factor(49, 100, "multistep", milestones=(0.5, 0.75)) == 1.0
    assert train.lr_factor(50, 100, "multistep", milestones=(0.5, 0.75)) == pytest.approx(0.1)
    assert train.lr_factor(80, 100, "multistep", milestones=(0.5, 0.75)) == pytest.approx(0.01)
    assert train.lr_factor(0, 100, "constant", warmup=4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        train.lr_factor(0, 10, "linear")


def test_param_groups_keep_their_rates(one_thread):
    data = _Smooth(8)
    model = _tiny_model()
    convs = model.convs()
    groups = [{"params": convs[0].parameters(), "lr": 1e-2}, {"params": [p for c in convs[1:] for p in c.parameters()]}]
    seen = []

    def mb(batch, device):
        seen.append(None)
        return _make_batch(batch, device)

    opt_holder = {}

    def factory(g):
        opt_holder["opt"] = torch.optim.Adam(g, lr=1e-4)
        return opt_holder["opt"]

    train.fit(model, DataLoader(data, batch_size=4), mb, steps=2, optimizer=factory, param_groups=groups,
              schedule="constant", log_every=0, progress=False)
    lrs = [g["lr"] for g in opt_holder["opt"].param_groups]
    assert lrs == [1e-2, 1e-4] and len(seen) == 2


def test_checkpoint_is_atomic_and_weights_only(tmp_path, one_thread):
    data = _Smooth(10)
    ckpt = tmp_path / "run" / "model.ckpt"
    res = train.fit(_tiny_model(), DataLoader(data, batch_size=4, shuffle=True, drop_last=True), _make_batch,
                    _val_with_rng, steps=5, checkpoint=ckpt, checkpoint_every=2, val_every=2, log_every=0,
                    progress=False, config={"path": tmp_path, "n": 3})
    assert ckpt.is_file() and _no_temp_files(ckpt.parent)
    ck = torch.load(ckpt, weights_only=True)
    assert ck["format"] == train.CHECKPOINT_FORMAT
    assert ck["step"] == 5 and ck["finished"] is True and ck["total_steps"] == 5
    assert ck["config"] == {"path": str(tmp_path), "n": 3}
    assert [h["step"] for h in ck["history"]] == [2, 4, 5] == [h["step"] for h in res.history]
    assert set(ck["model"]) == set(_tiny_model().state_dict())
    assert isinstance(ck["rng"]["torch"], torch.Tensor)


@pytest.mark.parametrize("log_every", [0, 3, 50])
def test_nonfinite_loss_raises_and_never_reaches_a_checkpoint(tmp_path, one_thread, log_every):
    # fit reads the losses back in batches (no host wait per step); a NaN loss must
    # still stop the run, name its step, and leave the last checkpoint finite.
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        loss = nn.functional.mse_loss(out, target)
        return loss * float("nan") if len(calls) == 13 else loss

    ck = tmp_path / "nan.ckpt"
    with pytest.raises(FloatingPointError, match="at step 12"):
        train.fit(_tiny_model(), DataLoader(_Smooth(), batch_size=2), _make_batch, steps=40, loss_fn=loss_fn,
                  checkpoint=ck, checkpoint_every=5, log_every=log_every, progress=False, log=lambda m: None)
    saved = train.load_checkpoint(ck)
    assert saved["step"] == 10
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_save_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "x.pt"
    train.save_atomic({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        train.save_atomic({"f": lambda: 0}, path)  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert _no_temp_files(tmp_path)


def _run(tmp_path, name, *, steps, stop_after=None, resume=True, interrupt_at=None):
    data = _Smooth(10)  # 2 batches per epoch: the runs cross epochs and stop mid-epoch
    loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True)
    calls = {"n": 0}

    def mb(batch, device):
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return _make_batch(batch, device)

    model = _tiny_model()
    res = train.fit(model, loader, mb, _val_with_rng, steps=steps, lr=1e-2, schedule="cosine", seed=5,
                    checkpoint=tmp_path / f"{name}.ckpt", checkpoint_every=3, val_every=2, resume=resume,
                    stop_after=stop_after, log_every=0, progress=False)
    return model, res


def test_resume_reproduces_uninterrupted_run(tmp_path, one_thread):
    full, res_full = _run(tmp_path, "full", steps=9)
    part, res_part = _run(tmp_path, "part", steps=9, stop_after=5)
    assert not res_part.finished and res_part.step == 5
    assert torch.load(tmp_path / "part.ckpt", weights_only=True)["step"] == 5
    resumed, res_resumed = _run(tmp_path, "part", steps=9)
    assert res_resumed.step == 9 and res_resumed.finished
    assert torch.equal(_params(resumed), _params(full)), "resumed run differs from the uninterrupted one"
    assert [h["step"] for h in res_resumed.history] == [h["step"] for h in res_full.history]
    # a finished checkpoint: resuming does nothing more
    again, res_again = _run(tmp_path, "part", steps=9)
    assert torch.equal(_params(again), _params(full)) and res_again.wall_s < 5


def test_resume_after_keyboard_interrupt(tmp_path, one_thread):
    full, _ = _run(tmp_path, "full", steps=7)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "intr", steps=7, interrupt_at=5)  # during the 5th step: 4 done
    assert torch.load(tmp_path / "intr.ckpt", weights_only=True)["step"] == 4
    resumed, _ = _run(tmp_path, "intr", steps=7)
    assert torch.equal(_params(resumed), _params(full))


def test_resume_with_other_settings_says_which(tmp_path, one_thread):
    """Resuming a checkpoint whose run had other settings (its stored config) goes on,
    but logs each difference; the same settings log no note."""
    def fit(config):
        lines = []
        train.fit(_tiny_model(), [torch.rand(2, 1, 16, 16)], _make_batch, steps=4, stop_after=2, lr=1e-2,
                  checkpoint=tmp_path / "c.ckpt", config=config, log_every=0, progress=False,
                  log=lines.append)
        return lines
    fit({"sigma": 25, "batch_size": 8})
    assert not any("note" in line for line in fit({"sigma": 25, "batch_size": 8}))
    notes = [line for line in fit({"sigma": 50, "batch_size": 8, "amp": True}) if "note" in line]
    assert len(notes) == 1 and "sigma 25 -> 50" in notes[0] and "amp None -> True" in notes[0], notes
    assert "batch_size" not in notes[0]


def test_resume_with_a_new_learning_rate_uses_it(tmp_path, one_thread):
    """The resumed run's learning rate (and weight decay) are this call's, not the
    checkpoint's; the optimizer's moments are resumed."""
    seen, opts = [], []

    def run(lr, wd, stop_after=None):
        def adam(groups):
            opts.append(torch.optim.Adam(groups, lr=lr, weight_decay=wd))
            return opts[-1]

        def val(model):
            g = opts[-1].param_groups[0]
            seen.append((g["lr"], g["weight_decay"]))
            return {"psnr": 0.0}
        train.fit(_tiny_model(), [torch.rand(2, 1, 16, 16)], _make_batch, val, steps=4,
                  stop_after=stop_after, optimizer=adam, schedule="constant", val_every=1,
                  checkpoint=tmp_path / "c.ckpt", log_every=0, progress=False, log=lambda _: None)
    run(1e-3, 0.0, stop_after=2)
    run(1e-1, 1e-4)
    assert seen == [(1e-3, 0.0)] * 2 + [(1e-1, 1e-4)] * 2, seen
    assert opts[-1].state  # Adam's moments came back from the checkpoint


def test_resume_rejects_another_model(tmp_path, one_thread):
    _run(tmp_path, "m", steps=2)
    with pytest.raises(ValueError, match="does not fit"):
        train.fit(AODNet(), [(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))], lambda b, d: b, steps=3,
                  checkpoint=tmp_path / "m.ckpt", log_every=0, progress=False)


# ----------------------------------------------------------------------------- CLI

def _gray_folder(path, n=2, size=48, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path / f"{k:02d}.png")
    return path


def _haze_folder(path, scenes=(1, 2), size=40):
    rng = np.random.default_rng(0)
    (path / "hazy").mkdir(parents=True, exist_ok=True)
    (path / "gt").mkdir(exist_ok=True)
    for s in scenes:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / "gt" / f"{s}.png")
        for k in (1, 2):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                path / "hazy" / f"{s}_{k}.png")
    return path


def _bad_cli(capsys, out_dir, argv):
    out = out_dir / "w.pt"
    code = main(["train-ann", *argv, "--out", str(out), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "error" in lines[0]
    left = [p.name for p in out_dir.iterdir()] if out_dir.exists() else []
    assert left == [], f"files left behind: {left}"
    return lines[0]


def test_cli_bad_input(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    val = _gray_folder(tmp_path / "val", n=1)
    msg = _bad_cli(capsys, out, ["--task", "denoise", "--data", str(tmp_path / "missing"), "--val-data", str(val)])
    assert "missing" in msg
    (tmp_path / "empty").mkdir()
    msg = _bad_cli(capsys, out, ["--task", "denoise", "--data", str(tmp_path / "empty"), "--val-data", str(val)])
    assert "no image" in msg
    msg = _bad_cli(capsys, out, ["--task", "denoise", "--sigma", "30", "--data", str(val), "--val-data", str(val)])
    assert "sigma" in msg
    bad = _gray_folder(tmp_path / "bad", n=1)
    (bad / "zz.png").write_bytes(b"not a png")
    msg = _bad_cli(capsys, out, ["--task", "denoise", "--data", str(bad), "--val-data", str(val)])
    assert "zz.png" in msg
    haze = _haze_folder(tmp_path / "haze")
    (haze / "gt" / "2.png").unlink()  # hazy 2_k have no clean image
    msg = _bad_cli(capsys, out, ["--task", "dehaze", "--data", str(haze), "--val-scenes", "1"])
    assert "no clean image" in msg
    msg = _bad_cli(capsys, out, ["--task", "dehaze", "--sigma", "25", "--data", str(haze)])
    assert "sigma" in msg
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    msg = _bad_cli(capsys, out, ["--task", "denoise", "--init", str(junk), "--data", str(val), "--val-data", str(val)])
    assert "junk.pt" in msg
    aod = tmp_path / "aod.pt"
    torch.save(AODNet().state_dict(), aod)  # weights of another model
    msg = _bad_cli(capsys, out, ["--task", "denoise", "--init", str(aod), "--data", str(val), "--val-data", str(val)])
    assert "DnCNN" in msg


def test_cli_train_denoise_writes_folded_weights_and_resumes(tmp_path, capsys, one_thread):
    data, val = _gray_folder(tmp_path / "train", n=2), _gray_folder(tmp_path / "val", n=1, seed=1)
    out = tmp_path / "w" / "dncnn.pt"
    argv = ["train-ann", "--task", "denoise", "--sigma", "25", "--data", str(data), "--val-data", str(val),
            "--batch-size", "4", "--out", str(out), "--no-progress", "--log-every", "0"]
    assert main([*argv, "--steps", "2"]) == 0
    sd = torch.load(out, weights_only=True)
    DnCNN(batchnorm=False).load_state_dict(sd, strict=True)
    import json
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["task"] == "denoise" and meta["sigma"] == 25 and meta["steps"] == 2
    assert meta["form"] == "bn-folded" and np.isfinite(meta["val_psnr"])
    assert _no_temp_files(out.parent)
    capsys.readouterr()
    assert main([*argv, "--steps", "3"]) == 2  # a checkpoint exists: --resume or delete it
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["steps"] == 3
    assert torch.load(str(out) + ".ckpt", weights_only=True)["step"] == 3


def test_cli_train_a_colour_denoiser(tmp_path, capsys, one_thread):
    """train-ann --channels 3: a colour DnCNN (image_channels=3) on RGB patches,
    validated in RGB; the weights load into DnCNN(image_channels=3) and the
    metadata say so. --channels for dehazing is refused."""
    import json
    rng = np.random.default_rng(0)
    data = tmp_path / "rgb"
    data.mkdir()
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(data / f"{k}.png")
    out = tmp_path / "dncnn3.pt"
    assert main(["train-ann", "--task", "denoise", "--channels", "3", "--data", str(data),
                 "--val-data", str(data), "--val-crop", "24", "--batch-size", "4", "--steps", "2",
                 "--out", str(out), "--no-progress", "--log-every", "0"]) == 0
    DnCNN(image_channels=3, batchnorm=False).load_state_dict(torch.load(out, weights_only=True))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["channels"] == 3 and "image_channels=3" in meta["model"]
    assert np.isfinite(meta["val_psnr"]) and np.isfinite(meta["val_full_psnr"])
    capsys.readouterr()
    msg = _bad_cli(capsys, tmp_path / "none", ["--task", "dehaze", "--channels", "3"])
    assert "--channels applies to --task denoise only" in msg


def test_cli_train_dehaze(tmp_path, one_thread):
    haze = _haze_folder(tmp_path / "haze", scenes=(1, 2, 3))
    out = tmp_path / "aod.pt"
    assert main(["train-ann", "--task", "dehaze", "--data", str(haze), "--val-scenes", "3", "--crop", "32",
                 "--batch-size", "2", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    AODNet().load_state_dict(torch.load(out, weights_only=True), strict=True)
    import json
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["val_scenes"] == ["3"] and "3" not in meta["train_scenes"]
    # --init: start a new run from the first run's checkpoint
    out2 = tmp_path / "aod2.pt"
    assert main(["train-ann", "--task", "dehaze", "--data", str(haze), "--val-scenes", "3", "--crop", "32",
                 "--batch-size", "2", "--steps", "1", "--lr", "1e-12", "--init", str(out) + ".ckpt",
                 "--out", str(out2), "--no-progress"]) == 0
    a, b = torch.load(out, weights_only=True), torch.load(out2, weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ----------------------------------------------------------------------------- shipped weights

def test_load_shipped_ann_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="sigma"):
        load_shipped_ann("denoise", 30)
    with pytest.raises(ValueError, match="sigma"):
        load_shipped_ann("denoise")
    with pytest.raises(ValueError, match="task"):
        load_shipped_ann("deblur")
    with pytest.raises(ValueError, match="sigma"):
        load_shipped_ann("dehaze", 25)
    import spikingir.weights as w
    monkeypatch.setattr(w, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="dncnn_s25.pt"):
        load_shipped_ann("denoise", 25)
    with pytest.raises(FileNotFoundError):
        weights_path("aodnet.pt")


SHIPPED = [("denoise", 15), ("denoise", 25), ("denoise", 50), ("dehaze", None)]


@pytest.mark.parametrize("task,sigma", SHIPPED)
def test_shipped_weights_load_strictly(task, sigma):
    name = f"dncnn_s{sigma}.pt" if task == "denoise" else "aodnet.pt"
    if not (WEIGHTS_DIR / name).is_file():
        pytest.skip(f"{name} is not shipped yet")
    model = load_shipped_ann(task, sigma)
    assert not model.training
    assert isinstance(model, DnCNN if task == "denoise" else AODNet)
    if task == "denoise":
        assert not model.batchnorm
    assert (WEIGHTS_DIR / name).stat().st_size < 3_000_000


def test_shipped_dncnn_s25_denoises_set12_crop():
    from spikingir.data import add_gaussian_noise, load_image
    from spikingir.metrics import psnr

    if not (WEIGHTS_DIR / "dncnn_s25.pt").is_file():
        pytest.skip("dncnn_s25.pt is not shipped yet")
    path = DATA / "set12" / "05.png"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    clean = load_image(path, gray=True)[64:192, 64:192]
    noisy_img = add_gaussian_noise(clean, 25, seed=0)
    with torch.no_grad():
        out = load_shipped_ann("denoise", 25)(torch.from_numpy(noisy_img)[None, None])
    gain = psnr(clean, out) - psnr(clean, noisy_img)
    assert gain > 5.0, f"denoising gains only {gain:.2f} dB"


def test_shipped_aodnet_dehazes_held_out_scene():
    from spikingir.data import DehazePairs
    from spikingir.metrics import psnr

    if not (WEIGHTS_DIR / "aodnet.pt").is_file():
        pytest.skip("aodnet.pt is not shipped yet")
    if not (DATA / "sots_train").is_dir():
        pytest.skip("../shared/data/sots_train not present")
    hazy, clean = DehazePairs(DATA / "sots_train").subset(["1424"])[0]
    with torch.no_grad():
        out = load_shipped_ann("dehaze")(hazy[None])[0]
    assert psnr(clean.permute(1, 2, 0).numpy(), out.permute(1, 2, 0).numpy()) > \
        psnr(clean.permute(1, 2, 0).numpy(), hazy.permute(1, 2, 0).numpy()) + 3.0


def test_amp_hint_only_for_cpu_fp32_runs_on_bf16_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert "AVX512-BF16" in train.amp_hint("cpu", False) and "--amp" in train.amp_hint("cpu", False)
    assert train.amp_hint("cpu", True) is None and train.amp_hint("cuda", False) is None
    assert train.amp_hint("cpu", False, training=False) is None  # inference: no bf16 advice
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert "AMX" in train.amp_hint(torch.device("cpu"), False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert train.amp_hint("cpu", False) is None


def test_amp_warning_on_a_cpu_without_bf16_units(monkeypatch):
    """--amp where bf16 is emulated (an AVX2-only CPU: 9x slower measured) warns,
    for training and inference alike; never on a GPU."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    for training in (True, False):
        msg = train.amp_hint("cpu", True, training=training)
        assert msg.startswith("warning:") and "drop --amp" in msg
    assert train.amp_hint("cuda", True) is None
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert train.cpu_bf16_units() == "AVX512-BF16" and train.amp_hint("cpu", True) is None


def test_any_paired_dehazing_folder_holds_out_its_own_scenes(tmp_path):
    """convert/finetune/train-ann held out sots_train's scene ids 1420-1424 from any
    folder, so a folder without them was refused ("unknown scene id(s)")."""
    from PIL import Image
    from spikingir.data import DehazePairs
    from spikingir.pipeline import calibration_inputs
    from spikingir.train import held_out_scenes
    rng = np.random.default_rng(0)
    (tmp_path / "hazy").mkdir()
    (tmp_path / "gt").mkdir()
    for scene in ("7", "12", "100"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "gt" / f"{scene}.png")
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / "hazy" / f"{scene}_1.png")
    pairs = DehazePairs(tmp_path)
    assert held_out_scenes(pairs) == ["100"]  # the last tenth (at least one), numerically
    assert len(calibration_inputs("dehaze", data=tmp_path)) == 2  # the other two scenes
    with pytest.raises(ValueError, match="one scene only.*--val-data"):
        held_out_scenes(pairs.subset(["7"]))


def test_colour_training_images_are_converted_with_a_warning(tmp_path):
    """A colour image in a grayscale model's training folder was converted silently."""
    from PIL import Image
    from spikingir.data import load_gray
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match="colour images are converted to gray"):
        gray = load_gray(tmp_path / "c.png")
    assert gray.shape == (8, 9)
