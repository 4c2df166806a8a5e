"""The README's Python examples run as printed, in order, in one namespace (as a
user pasting them into one session would): a renamed function or a variable an
example never defines fails here rather than for the reader."""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WEIGHTS_README = ROOT / "spikingir" / "weights" / "README.md"


def python_blocks(path=README):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def on_this_machine(code):
    """A GPU example runs on the CPU here when there is no GPU: the same names,
    the same calls, only the device differs."""
    if torch.cuda.is_available():
        return code
    return code.replace(".cuda()", ".cpu()").replace('"cuda"', '"cpu"')


def test_readme_has_the_examples():
    blocks = python_blocks()
    assert len(blocks) >= 4, len(blocks)
    for code in blocks:
        compile(code, str(README), "exec")  # no syntax error in any of them


def test_readme_examples_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the restore example reads "noisy.png": a small noisy photo in its place
    rng = np.random.default_rng(0)
    clean = np.tile(np.linspace(0.2, 0.8, 48), (48, 1))
    noisy = np.clip(clean + 25 / 255 * rng.standard_normal(clean.shape), 0, 1)
    Image.fromarray((noisy * 255).round().astype(np.uint8)).save("noisy.png")
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(python_blocks()):
        exec(compile(on_this_machine(code), f"README.md python block {i + 1}", "exec"), namespace)
    # what the examples promise, checked on what they computed
    assert namespace["out"].shape == (48, 48)                    # restore(): H x W in, H x W out
    assert (tmp_path / "my_snn.pt").is_file()                    # the custom CNN's SNN, saved
    restored = namespace["restored"]
    assert restored.shape == (1, 1, 48, 48) and restored.dtype == torch.float32
    assert torch.isfinite(restored).all()
    assert "torch.Size([11, 2, 64, 32, 32])" in capsys.readouterr().out


def test_weights_readme_example_runs():
    namespace = {}
    for code in python_blocks(WEIGHTS_README):
        exec(compile(code, str(WEIGHTS_README), "exec"), namespace)
    assert not namespace["dncnn"].training and not namespace["aod"].training
    with torch.no_grad():
        assert namespace["dncnn"](torch.rand(1, 1, 24, 24)).shape == (1, 1, 24, 24)
        assert namespace["aod"](torch.rand(1, 3, 24, 24)).shape == (1, 3, 24, 24)
