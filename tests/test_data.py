"""Image folders, DnCNN noise and patches, dehazing pairs, synthetic haze."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from spikingir.data import (HAZE_BETAS, DehazePairs, DnCNNPatches, NoiseCollate, add_gaussian_noise,
                            depth_proxy, estimate_noise_sigma, list_images, load_image, motorcycle_haze, noisy, synthesize_haze)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _rand_u8(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- folders / loading

def test_list_images(tmp_path):
    for name in ["b.png", "a.JPG", "c.jpeg", "d.bmp", "e.tif"]:
        _save(tmp_path / name, _rand_u8((8, 8)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.jpeg", "d.bmp", "e.tif"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        list_images(tmp_path / "empty")


def test_load_image_modes(tmp_path):
    g = _rand_u8((9, 11))
    rgb = _rand_u8((9, 11, 3), seed=1)
    x = load_image(_save(tmp_path / "g.png", g))
    assert x.dtype == np.float32 and x.shape == (9, 11)
    assert np.array_equal(x, g.astype(np.float32) / 255)
    assert load_image(tmp_path / "g.png", gray=False).shape == (9, 11, 3)
    y = load_image(_save(tmp_path / "c.png", rgb))
    assert y.shape == (9, 11, 3) and np.array_equal(y, rgb.astype(np.float32) / 255)
    assert load_image(tmp_path / "c.png", gray=True).shape == (9, 11)
    rgba = np.concatenate([rgb, _rand_u8((9, 11, 1))], -1)
    assert np.array_equal(load_image(_save(tmp_path / "a.png", rgba)), y)
    g16 = (np.arange(99, dtype=np.uint16).reshape(9, 11) * 600)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_allclose(load_image(tmp_path / "g16.png"), g16 / 65535, atol=1e-7)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(bad)
    _save(tmp_path / "g.png", _rand_u8((4, 4)))
    with pytest.raises(TypeError):
        load_image(tmp_path / "g.png", gray="yes")


# ----------------------------------------------------------------------------- noise

def test_add_gaussian_noise_is_the_dncnn_protocol():
    clean = _rand_u8((20, 30)).astype(np.float32) / 255
    state = np.random.get_state()
    got = add_gaussian_noise(clean, 25)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global generator untouched
    np.random.seed(0)
    expected = clean + np.random.randn(*clean.shape) * 25 / 255
    assert got.dtype == np.float32
    assert np.array_equal(got, expected.astype(np.float32))
    np.random.seed(0)
    assert np.array_equal(got, (clean + np.random.normal(0, 25 / 255, clean.shape)).astype(np.float32))
    assert got.min() < 0 or got.max() > 1  # not clipped
    assert np.array_equal(add_gaussian_noise(clean, 25, seed=3), add_gaussian_noise(clean, 25, seed=3))
    assert np.array_equal(add_gaussian_noise(clean, 0), clean)


def test_add_gaussian_noise_checks():
    with pytest.raises(TypeError, match="uint8"):
        add_gaussian_noise(_rand_u8((4, 4)), 25)
    with pytest.raises(TypeError):
        add_gaussian_noise(torch.zeros(4, 4), 25)
    with pytest.raises(ValueError):
        add_gaussian_noise(np.zeros((4, 4)), -1)
    with pytest.raises(TypeError):
        add_gaussian_noise(np.zeros((4, 4)), "25")


@pytest.mark.parametrize("sigma", [5, 15, 25, 50])
def test_estimate_noise_sigma_on_a_photo(sigma):
    """Donoho's MAD of the diagonal Haar coefficients recovers the noise level of a
    real photo (gray and RGB) within a few percent (the photo's own fine texture
    adds ~1 at low noise: camera 6.3 at sigma 5); the clean photos read 1.5-2.5."""
    import skimage.data
    gray = skimage.data.camera() / 255.0
    rgb = skimage.data.coffee() / 255.0
    for clean in (gray, rgb):
        est = estimate_noise_sigma(add_gaussian_noise(clean, sigma, seed=1))
        assert est == pytest.approx(sigma, rel=0.06, abs=1.8), (clean.ndim, est)
        assert estimate_noise_sigma(clean) < 3


def test_estimate_noise_sigma_checks():
    with pytest.raises(TypeError, match="float"):
        estimate_noise_sigma(_rand_u8((8, 8)))
    with pytest.raises(ValueError, match="H, W >= 2"):
        estimate_noise_sigma(np.zeros((1, 8)))


def test_nearest_shipped_sigma():
    from spikingir.pipeline import nearest_sigma
    assert [nearest_sigma(s) for s in (0, 9.6, 19.3, 19.5, 35.3, 35.5, 90)] == [15, 15, 15, 25, 25,
                                                                             50, 50]


def test_noisy_and_collate():
    batch = torch.full((64, 1, 40, 40), 0.5)
    g = torch.Generator().manual_seed(0)
    y = noisy(batch, 25, g)
    assert y.shape == batch.shape and (y - batch).std().item() == pytest.approx(25 / 255, rel=0.02)
    assert torch.equal(noisy(batch, 25, torch.Generator().manual_seed(0)), y)
    yb = noisy(batch, (0, 55), torch.Generator().manual_seed(1))
    stds = (yb - batch).flatten(1).std(1) * 255
    assert stds.min() < 15 and stds.max() > 40 and stds.max() < 57
    with pytest.raises(ValueError):
        noisy(batch, (30, 10))
    collate = NoiseCollate(15, torch.Generator().manual_seed(0))
    n, c = collate([torch.rand(1, 8, 8) for _ in range(4)])
    assert n.shape == c.shape == (4, 1, 8, 8)


def test_noise_collate_with_a_generator_in_workers():
    """NoiseCollate(generator=...) in DataLoader workers: every worker started from a
    copy of the generator in the same state, so the two workers' batches got the same
    noise (and so did every epoch). Now: different noise per worker and epoch, the
    same again for the same torch.manual_seed."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method here (spawn workers take seconds to start)")
    zeros = [np.zeros((8, 8), np.float32)] * 4
    ds = DnCNNPatches(zeros, patch=8, stride=8, scales=(1,), augment=False)
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context="fork",
                        collate_fn=NoiseCollate(25, torch.Generator().manual_seed(3)))

    def epoch():  # the noise of each batch (clean patches are zero)
        return [n for n, _ in loader]

    torch.manual_seed(0)
    first, second = epoch(), epoch()
    torch.manual_seed(0)
    again = epoch()
    noise = first + second
    assert all(not torch.equal(a, b) for i, a in enumerate(noise) for b in noise[i + 1:])
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_noise_collate_pickles_its_generator_as_bytes():
    """A torch.Generator sent to a spawn / forkserver worker as itself loses its state
    tensor on the way (pytorch/pytorch#146828: the workers died with "unable to resize
    file"); NoiseCollate sends it as seed and state bytes: nothing goes through shared
    memory, and the copy draws what the original draws."""
    from multiprocessing.reduction import ForkingPickler

    collate = NoiseCollate(25, torch.Generator().manual_seed(3))
    torch.randn(5, generator=collate.generator)
    data = bytes(ForkingPickler.dumps(collate))  # what a spawn worker is sent
    assert b"rebuild_storage" not in data
    twin = pickle.loads(data)
    assert twin.generator.initial_seed() == 3
    assert torch.equal(torch.randn(4, generator=twin.generator),
                       torch.randn(4, generator=collate.generator))


# ----------------------------------------------------------------------------- DnCNN patches

def test_dncnn_patches_count_and_crops():
    img = _rand_u8((180, 180))
    ds = DnCNNPatches([img], augment=False)
    assert len(ds) == 225 + 169 + 121 + 81 == 596  # int(180*0.7) = 125 -> 9 x 9 patches
    assert [tuple(t.shape) for t in ds.images] == [(1, 180, 180), (1, 162, 162), (1, 144, 144),
                                                   (1, 125, 125)]
    x = ds[0]
    assert x.shape == (1, 40, 40) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.from_numpy(img[:40, :40].astype(np.float32) / 255))
    assert torch.equal(ds[16][0], torch.from_numpy(img[10:50, 10:50].astype(np.float32) / 255))
    for k in (230, 595):  # scaled patches are re-quantised to 8 bits as the generator does
        assert torch.equal(torch.round(ds[k] * 255), ds[k] * 255)
    loader = DataLoader(ds, batch_size=8, collate_fn=NoiseCollate(25))
    n, c = next(iter(loader))
    assert n.shape == c.shape == (8, 1, 40, 40)


def test_dncnn_patches_resize_and_augment():
    const = np.full((60, 50), 0.25, np.float32)
    ds = DnCNNPatches([const], scales=(1, 0.8), augment=False)
    assert all(torch.allclose(ds[i], torch.full((1, 40, 40), 0.25)) for i in range(len(ds)))
    img = _rand_u8((40, 40))
    ds = DnCNNPatches([img], scales=(1,), augment=True)
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        seen.add(ds[0].numpy().tobytes())
    base = img.astype(np.float32) / 255
    dihedral = {np.ascontiguousarray(a).tobytes() for r in range(4)
                for a in (np.rot90(base, r), np.flipud(np.rot90(base, r)))}
    assert seen == dihedral and len(seen) == 8


def test_dncnn_patches_checks(tmp_path):
    with pytest.raises(ValueError, match="no 40 x 40 patch"):
        DnCNNPatches([np.zeros((30, 30), np.float32)])
    with pytest.raises(ValueError, match="looks like a colour image"):
        DnCNNPatches(np.zeros((50, 50, 3), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        DnCNNPatches([np.zeros((50, 50, 3), np.float32)])
    with pytest.raises(ValueError, match="scales"):
        DnCNNPatches([np.zeros((50, 50), np.float32)], scales=())
    with pytest.raises(TypeError):
        DnCNNPatches([np.zeros((50, 50), np.float32)], patch=40.0)
    with pytest.raises(FileNotFoundError):
        DnCNNPatches(tmp_path / "missing")


def test_dncnn_patches_in_colour(tmp_path):
    """channels=3 (a colour DnCNN's training patches): [3, p, p], each channel the
    patch of that channel alone as a gray image (resized and re-quantised on its
    own), the flip/rotation the same for the three; a gray file is replicated,
    with a warning; a gray array or another count is refused."""
    rgb = _rand_u8((50, 46, 3))
    Image.fromarray(rgb).save(tmp_path / "c.png")
    ds = DnCNNPatches(tmp_path, scales=(1, 0.9), augment=False, channels=3)
    gray = [DnCNNPatches([np.ascontiguousarray(rgb[..., c])], scales=(1, 0.9), augment=False)
            for c in range(3)]
    assert len(ds) == len(gray[0]) > 1
    for n in (0, len(ds) - 1):  # the last: a 0.9-scaled patch
        assert ds[n].shape == (3, 40, 40)
        assert torch.equal(ds[n], torch.cat([g[n] for g in gray]))
    aug = DnCNNPatches([rgb], scales=(1,), augment=True, channels=3)
    torch.manual_seed(0)
    x = aug[1]
    torch.manual_seed(0)
    one = DnCNNPatches([np.ascontiguousarray(rgb[..., 2])], scales=(1,), augment=True)[1]
    assert torch.equal(x[2:], one)  # the same mode drawn: the same flip/rotation
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    with pytest.warns(UserWarning, match="gray images are replicated to RGB"):
        both = DnCNNPatches(tmp_path, scales=(1,), augment=False, channels=3)
    g = both[len(both) - 1]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    with pytest.raises(ValueError, match="H x W x 3 RGB array"):
        DnCNNPatches([rgb[..., 0]], channels=3)
    with pytest.raises(ValueError, match="channels must be 1 .gray. or 3"):
        DnCNNPatches([rgb[..., 0]], channels=2)


def test_dncnn_patches_name_the_images_too_small_for_a_patch(tmp_path):
    """Images that give no patch at any scale are named in a warning (they were
    dropped silently: a folder of mostly small images trained on the few others);
    a folder where every image fits says nothing."""
    import warnings
    for i, side in enumerate((30, 30, 48)):
        Image.fromarray(np.full((side, side), 100 + i, np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.warns(UserWarning, match=r"2 of 3 images are too small for a 40 x 40 patch") as rec:
        ds = DnCNNPatches(tmp_path, augment=False)
    assert "0.png (30x30)" in str(rec[0].message) and "2.png" not in str(rec[0].message)
    assert all(float(ds[n].mean()) == pytest.approx(102 / 255) for n in range(len(ds)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DnCNNPatches(tmp_path, patch=24, augment=False)

def test_dncnn_patches_from_train400_files():
    files = list_images(_need(DATA / "train400"))[:3]
    ds = DnCNNPatches(files)
    assert len(ds) == 3 * 596
    x = ds[len(ds) - 1]
    assert x.shape == (1, 40, 40) and 0 <= x.min() and x.max() <= 1


# ----------------------------------------------------------------------------- dehazing pairs

def _make_sots(root, scenes=("10", "11", "12"), ks=(1, 4), size=(12, 16)):
    for s in scenes:
        _save(root / "gt" / f"{s}.png", _rand_u8((*size, 3), seed=int(s)))
        for k in ks:
            _save(root / "hazy" / f"{s}_{k}.png", _rand_u8((*size, 3), seed=100 * int(s) + k))


def test_dehaze_pairs_gt_layout(tmp_path):
    _make_sots(tmp_path)
    ds = DehazePairs(tmp_path)
    assert len(ds) == 6 and ds.scenes == ["10", "11", "12"]
    hazy, clean = ds[0]
    assert hazy.shape == clean.shape == (3, 12, 16) and hazy.dtype == torch.float32
    assert ds.pairs[0][0].name == "10_1.png" and ds.pairs[0][1].name == "10.png"
    assert torch.equal(clean, torch.from_numpy(load_image(tmp_path / "gt" / "10.png")).permute(2, 0, 1))
    train, val = ds.split([12])
    assert len(train) == 4 and len(val) == 2 and val.scenes == ["12"] and train.scenes == ["10", "11"]
    assert ds.subset("11").scenes == ["11"]
    with pytest.raises(ValueError, match="unknown scene"):
        ds.split(["99"])


def test_dehaze_pairs_clear_layout(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / "clear" / f"{name}.png", _rand_u8((10, 10, 3)))
        _save(tmp_path / "hazy" / f"{name}.jpg", _rand_u8((10, 10, 3)))
    ds = DehazePairs(tmp_path)
    assert ds.scenes == ["a", "b"] and len(ds) == 2
    h, c = ds[1]
    assert h.shape == c.shape == (3, 10, 10)


def test_dehaze_pairs_mismatches(tmp_path):
    _make_sots(tmp_path / "missing")
    _save(tmp_path / "missing" / "hazy" / "13_1.png", _rand_u8((12, 16, 3)))
    with pytest.raises(ValueError, match="no clean image.*13_1.png"):
        DehazePairs(tmp_path / "missing")
    _make_sots(tmp_path / "size")
    _save(tmp_path / "size" / "gt" / "11.png", _rand_u8((12, 15, 3)))
    with pytest.raises(ValueError, match="differ in size.*11_1.png"):
        DehazePairs(tmp_path / "size")
    _make_sots(tmp_path / "both")
    (tmp_path / "both" / "clear").mkdir()
    with pytest.raises(ValueError, match="both"):
        DehazePairs(tmp_path / "both")
    with pytest.raises(FileNotFoundError):
        DehazePairs(tmp_path / "nowhere")
    (tmp_path / "nohazy" / "gt").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="hazy"):
        DehazePairs(tmp_path / "nohazy")


def test_dehaze_pairs_sots():
    ds = DehazePairs(_need(DATA / "sots_train"))
    assert len(ds) == 100 and len(ds.scenes) == 25 and ds.scenes[0] == "1400"
    train, val = ds.split(["1420", "1421", "1422", "1423", "1424"])
    assert len(train) == 80 and len(val) == 20
    assert not set(train.scenes) & set(val.scenes)


# ----------------------------------------------------------------------------- synthetic haze

def test_synthesize_haze_formula_and_ranges():
    rng = np.random.default_rng(0)
    clean = rng.random((20, 24, 3), dtype=np.float32)
    depth = rng.random((20, 24)) * 7 + 3
    for seed in range(10):
        s = synthesize_haze(clean, depth=depth, rng=seed)
        assert s.beta in HAZE_BETAS and 0.6 <= s.A <= 1.0
        assert s.depth.min() == 0 and s.depth.max() == pytest.approx(1)
        assert np.exp(-s.beta) - 1e-6 <= s.transmission.min() and s.transmission.max() <= 1
        assert 0 <= s.hazy.min() and s.hazy.max() <= 1 and s.hazy.dtype == np.float32
        t = s.transmission[..., None]
        np.testing.assert_allclose(s.hazy, clean * t + s.A * (1 - t), atol=1e-6)
    again = synthesize_haze(clean, depth=depth, rng=3)
    assert np.array_equal(again.hazy, synthesize_haze(clean, depth=depth, rng=3).hazy)
    zero = synthesize_haze(clean, depth=depth, beta=0.0, A=0.8)  # no scattering: no haze
    np.testing.assert_allclose(zero.hazy, clean)
    per_ch = synthesize_haze(clean, depth=depth, beta=0.8, A=[0.7, 0.8, 0.9])
    far = np.unravel_index(np.argmax(depth), depth.shape)
    t_far = np.exp(-0.8)  # d = 1 at the deepest pixel
    np.testing.assert_allclose(per_ch.hazy[far], clean[far] * t_far + np.array([0.7, 0.8, 0.9]) * (1 - t_far), atol=1e-6)


def test_depth_proxy_is_smooth_and_normalised():
    rng = np.random.default_rng(0)
    clean = rng.random((64, 80, 3), dtype=np.float32)
    d = depth_proxy(clean)
    assert d.shape == (64, 80) and d.min() == 0 and d.max() == pytest.approx(1)
    assert d[:8].mean() > d[-8:].mean()  # top farther
    assert np.abs(np.diff(d, axis=1)).max() < 0.1  # smooth despite a noise image
    s = synthesize_haze(clean, rng=0)
    assert 0 <= s.hazy.min() and s.hazy.max() <= 1
    gray = synthesize_haze(clean[..., 0], beta=1.0, A=0.9)
    assert gray.hazy.shape == (64, 80)


def test_synthesize_haze_checks():
    clean = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="depth"):
        synthesize_haze(clean, depth=np.ones((8, 9)))
    with pytest.raises(ValueError, match="NaN or inf"):
        synthesize_haze(clean, depth=np.full((8, 8), np.inf))
    with pytest.raises(ValueError, match="A must"):
        synthesize_haze(clean, A=1.5)
    with pytest.raises(ValueError, match="beta"):
        synthesize_haze(clean, beta=-1)
    with pytest.raises(TypeError):
        synthesize_haze(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError):
        synthesize_haze(clean, rng="seed")
    with pytest.raises(ValueError):
        synthesize_haze(np.zeros((8, 8, 4), np.float32))


def test_synthesize_haze_with_a_constant_depth_is_uniform_haze():
    clean = np.random.default_rng(0).random((8, 9, 3)).astype(np.float32)
    s = synthesize_haze(clean, depth=np.full((8, 9), 5.0), beta=1.0, A=0.8)
    np.testing.assert_allclose(s.transmission, np.exp(-1.0), rtol=1e-6)
    np.testing.assert_allclose(s.hazy, clean * np.exp(-1.0) + 0.8 * (1 - np.exp(-1.0)), rtol=1e-5)


def test_synthesize_haze_of_a_one_channel_image():
    clean = np.random.default_rng(0).random((16, 12, 1)).astype(np.float32)
    a = synthesize_haze(clean, beta=1.0, A=0.8)
    b = synthesize_haze(clean[..., 0], beta=1.0, A=0.8)
    np.testing.assert_array_equal(np.squeeze(np.asarray(a.hazy)), np.asarray(b.hazy))


def _write_png16(path, a, colour_type):
    """A 16-bit PNG of ``colour_type`` (0 gray, 2 RGB, 4 gray+alpha, 6 RGBA) from
    uint16 [H, W, channels], written by hand: Pillow cannot write these."""
    import struct
    import zlib
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n"
                           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_sixteen_bit_pngs(tmp_path):
    """16-bit gray keeps 16 bits (also as training patches); gray+alpha is still a
    gray image; 16-bit colour says it is read at 8 bits (Pillow's limit)."""
    rng = np.random.default_rng(0)
    g = rng.integers(0, 65536, (50, 47, 2)).astype(np.uint16)
    gray = load_image(_write_png16(tmp_path / "g.png", g[..., :1], 0))
    np.testing.assert_allclose(gray, g[..., 0] / 65535, atol=1e-7)
    with pytest.warns(UserWarning, match="8-bit precision"):
        la = load_image(_write_png16(tmp_path / "la.png", g, 4))
    assert la.shape == (50, 47)
    np.testing.assert_allclose(la, g[..., 0] / 65535, atol=1 / 255)
    with pytest.warns(UserWarning, match="16-bit PNG with colour"):
        assert load_image(_write_png16(tmp_path / "rgb.png", rng.integers(
            0, 65536, (5, 6, 3)).astype(np.uint16), 2)).shape == (5, 6, 3)
    patches = DnCNNPatches([tmp_path / "g.png"], scales=(1,), augment=False)
    np.testing.assert_allclose(patches[0][0].numpy(), gray[:40, :40], atol=1e-6)


def test_motorcycle_haze():
    s = motorcycle_haze()
    assert s.hazy.shape == s.clean.shape == (500, 741, 3)
    assert np.isfinite(s.depth).all() and s.depth.min() == 0 and s.depth.max() == pytest.approx(1)
    assert 0 <= s.hazy.min() and s.hazy.max() <= 1
    assert s.beta in HAZE_BETAS and 0.6 <= s.A <= 1.0
    again = motorcycle_haze()
    assert np.array_equal(s.hazy, again.hazy) and s.beta == again.beta and s.A == again.A
    from skimage.data import stereo_motorcycle
    disp = stereo_motorcycle()[2]
    valid = np.isfinite(disp) & (disp > 0)
    assert (~valid).any()  # occlusions exist and were filled
    # larger disparity = nearer = less haze
    near, far = disp >= np.quantile(disp[valid], 0.9), valid & (disp <= np.quantile(disp[valid], 0.1))
    assert s.transmission[near & valid].mean() > s.transmission[far].mean()


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG with an EXIF orientation tag is read as it is displayed
    (restored outputs are written without the tag); the header size agrees."""
    from spikingir.data import _image_size
    a = np.zeros((20, 30, 3), np.uint8)
    a[:5, :, 0] = 255  # a red band along the stored top edge
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: the band on the right
    img.save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    img.save(tmp_path / "plain.jpg", quality=95)
    turned = load_image(tmp_path / "turned.jpg")
    assert turned.shape == (30, 20, 3) and _image_size(tmp_path / "turned.jpg") == (30, 20)
    assert turned[:, -4:, 0].mean() > 0.8 and turned[:, :4, 0].mean() < 0.2
    assert load_image(tmp_path / "plain.jpg").shape == (20, 30, 3)
