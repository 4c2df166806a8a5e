"""The neuron benchmark runs end to end on a tiny config and prints every column.
No timing is asserted (timing never lives in a pass/fail test)."""
import math
import re

import pytest

from spikingir import cli
from spikingir.ops import backends


def _row(out, backend):
    # The line of a backend in the printed table: "name  ms  speedup  GB/s  maxdiff  reps".
    m = re.search(rf"^{backend}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\d+)", out, re.MULTILINE)
    assert m, f"no {backend!r} row in the table:\n{out}"
    return [float(v) for v in m.groups()]


@pytest.mark.skipif(not backends.HAS_CPP_OPS, reason="spikingir._C is not built")
def test_bench_neuron_cli_tiny(capsys):
    rc = cli.main(["bench", "neuron", "--T", "2", "--N", "1000", "--modes", "fwd", "fwdbwd",
                   "--skip", "compile", "--min-time", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "T=2  N=1,000" in out
    assert "\ncommand: " in out  # the run's configuration, under the header
    for backend in ("naive", "torch", "cpp", "cpp masks"):  # the first (forward) block
        ms, speedup, gbps, maxdiff, reps = _row(out, backend)
        assert all(math.isfinite(v) for v in (ms, speedup, gbps, maxdiff)), out
        assert ms > 0 and reps >= 3
        assert maxdiff < 1e-4  # every column computes the same neuron as the naive loop


def test_bench_neuron_cli_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "neuron", "--T", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_bench_neuron_json_path_checked_before_the_run(tmp_path, capsys):
    """An unwritable --json failed with a traceback after the whole benchmark."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "neuron", "--T", "2", "--N", "100", "--json", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--json" in err and "is a directory" in err and "[bench neuron]" not in err


def test_tables_of_gpu_rows():
    """GPU rows come from triton's do_bench, which reports no repeat count
    (reps None); both tables print them (a GPU run once crashed here)."""
    from spikingir.bench import neuron as bn
    rows = []
    for name, ms in (("naive", 2.0), ("cuda", 0.5), ("spikingjelly", None)):
        rows.append(dict(device="cuda:0", backend=name, mode="fwd", T=10, N=8_000_000, ms=ms,
                         reps=None, speedup=None if ms is None else 2.0 / ms,
                         gbps=None if ms is None else 640 / ms, floor_frac=None if ms is None else
                         0.2133 / ms, maxdiff=0.0, note="" if ms else "failed: RuntimeError"))
    table = bn.format_table(rows)
    assert re.search(r"^cuda\s+0\.500\s+4\.00\s+1280\.0\s+42\.7\s+0e\+00\s+-$", table, re.M), table
    assert re.search(r"^spikingjelly\s+-\s+-", table, re.M), table
    md = bn.to_markdown(rows, "neuron — test")
    assert "| forward | 10 | 8000000 | cuda | 0.500 | 4.00 | 1280.0 | 42.7 |" in md.replace(",", ""), md


def _bench_spike_conv():
    return _bench_script("bench_spike_conv")


def _bench_script(name):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    if not path.is_file():  # tests copied away from a checkout (or an sdist)
        pytest.skip(f"{path} not present: benchmarks/ ships in a checkout and the sdist only")
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(not backends.HAS_CPP_OPS, reason="spikingir._C is not built")
def test_bench_spike_conv_tiny_with_backward(capsys):
    """benchmarks/bench_spike_conv.py end to end on a tiny input: the forward table
    and the weight-gradient table, each with a row whose backends agree with the
    float64 reference (the last column)."""
    import torch
    bench = _bench_spike_conv()
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--shape", "2", "16", "12", "12", "--rates", "0.2", "--backward",
                         "--threads", "1", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0
    forward, backward = out.split("Weight gradient alone")
    for table, cols in ((forward, ("F.conv2d ms", "cpp ms", "cpp masks ms")),
                        (backward, ("F.conv2d ms", "cpp ms"))):
        head = next(line for line in table.splitlines() if line.startswith("| input"))
        assert all(c in head for c in cols), head
        row = next(line for line in table.splitlines() if line.startswith("| random"))
        assert float(row.strip(" |").split("|")[-1]) < 1e-5, row


_NO_GPU = "no CUDA device" if not backends.torch.cuda.is_available() else None


@pytest.mark.parametrize("script, argv, message", [
    ("bench_spike_conv", ["--rates", "0.1", "-0.1"], "--rates: expected a number in [0, 1], got -0.1"),
    ("bench_spike_conv", ["--threads", "0"], "--threads: expected a positive integer, got 0"),
    ("bench_spike_conv", ["--repeats", "0"], "--repeats: expected a positive integer, got 0"),
    ("bench_spike_conv", ["--shape", "1", "0", "8", "8"], "--shape: expected a positive integer"),
    ("bench_spike_conv", ["--once", "1.5"], "--once: expected a number in [0, 1]"),
    ("bench_spike_conv", ["--device", "cuda"], _NO_GPU),
    ("bench_spike_conv", ["--triton-sweep"], "--triton-sweep times the Triton kernels on a GPU"),
    ("bench_snn", ["--threads", "-1"], "--threads: expected a positive integer, got -1"),
    ("bench_snn", ["--shape", "1", "1", "0", "16"], "--shape: expected a positive integer, got 0"),
    ("bench_snn", ["--repeats", "0"], "--repeats: expected a positive integer, got 0"),
    ("bench_snn", ["--snn-weights", "missing.pt"], "--snn-weights missing.pt: no such file"),
    ("bench_snn", ["--triton-config", "{bad"], "--triton-config"),
    ("bench_snn", ["--triton-config", '{"bogus": 1}'], "--triton-config"),
    ("bench_snn", ["--triton-config", "{}"], "--triton-config"),
    ("bench_snn", ["--device", "cuda"], _NO_GPU),
    ("bench_neuron", ["--threads", "0"], "--threads: expected a positive integer, got 0"),
    ("bench_neuron", ["--T", "0"], "T: expected positive integers, got [0]"),
    ("bench_neuron", ["--device", "cuda"], _NO_GPU),
    ("ablation", ["--threads", "-1"], "--threads: expected a positive integer, got -1"),
    ("ablation", ["--T", "2", "0"], "--T: expected a positive integer, got 0"),
    ("convert_chain", ["--threads", "0"], "--threads: expected a positive integer, got 0"),
    ("convert_graph", ["--T", "4", "0"], "--T: expected a positive integer, got 0"),
    ("convert_graph", ["--threads", "0"], "--threads: expected a positive integer, got 0"),
    ("convert_graph", ["--finetune-steps", "5"], "--finetune-steps needs --layer-calibration"),
    ("layer_calibration", ["--probe-T", "0"], "--probe-T: expected a positive integer, got 0"),
])
def test_bench_scripts_refuse_bad_arguments_in_one_line(script, argv, message, capsys):
    """A bad argument is one line and exit status 2 before any work: the threads,
    repeats, shapes, negative firing rates and `--device cuda` on a machine without a
    GPU failed with tracebacks (a zero thread count from torch.set_num_threads), or
    ran and printed nonsense (0 repeats: inf ms; a rate of -0.1: a 0 % row); in the
    accuracy scripts --T 0 failed with a traceback after loading the data."""
    if message is None:
        pytest.skip("a GPU is present: --device cuda is no error here")
    with pytest.raises(SystemExit) as exc:
        _bench_script(script).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_bench_spike_conv_dncnn_checks_its_files_first(tmp_path, monkeypatch, capsys):
    """--dncnn without the official weights and Set12 (not shipped) failed with a
    FileNotFoundError after timing the random rows; now one line before them."""
    bench = _bench_spike_conv()
    monkeypatch.setattr(bench, "DNCNN_FILES", (str(tmp_path / "w.pt"), str(tmp_path / "set12")))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--dncnn", "--shape", "1", "8", "8", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--dncnn reads" in err and "w.pt" in err and "| random" not in err, err


def test_bench_json_does_not_switch_huge_pages_on():
    """bench_neuron.py --json imported spikingir.cli, which sets THP_MEM_ALLOC_ENABLE=1
    for the command: after torch's import, before its first allocation, so that run
    had huge pages and the same run without --json had none."""
    import os
    import subprocess
    import sys
    code = ("import os; import torch; from spikingir.bench import neuron as bn; "
            "bn.check_json_path('x.json', print); bn.cli_module(); "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.split() == ["None"], out.stdout


def test_environment_names_what_the_numbers_depend_on():
    """Each table's header names the CPU kernels' instruction set (AVX-512, AVX2 or
    generic paths differ in speed) and Triton's version on a GPU, and the run's
    command line (its exact configuration) is recorded and printed."""
    from spikingir.bench import neuron as bn
    env = bn.environment("cpu", 1, bn.command("benchmarks/bench_x.py", ["--threads", "1"]))
    assert env["command"] == "python benchmarks/bench_x.py --threads 1"
    assert bn.command_note(env) == "command: python benchmarks/bench_x.py --threads 1"
    assert env["triton"] == (backends.triton.__version__ if backends.HAS_TRITON else None)
    if backends.HAS_CPP_OPS:
        assert f"({backends._C.cpu_isa()} kernels), 1 thread(s)" in bn.markdown_header(env)
    gpu = dict(env, device="cuda:0", device_name="NVIDIA H200", triton="3.6.0")
    assert "torch" in bn.markdown_header(gpu) and bn.markdown_header(gpu).endswith("triton 3.6.0")


@pytest.mark.skipif("triton" not in backends.available_backends("cpu", op="spike_conv2d"),
                    reason="Triton interpreter not available")
def test_bench_spike_conv_backward_triton_columns(monkeypatch):
    """The weight-gradient table's Triton columns (timed on a GPU only) run under
    the interpreter and agree with the float64 weight gradient."""
    import torch
    bench = _bench_spike_conv()
    monkeypatch.setattr(bench, "timed_backends", lambda device, op: ["triton"])
    s = (torch.rand(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    w = torch.randn(16, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    row = bench.bench_backward("tiny", s, w, "cpu", 1)
    assert set(row["ms"]) == {"F.conv2d", "triton", "triton dense", "triton ieee"}
    assert row["err"] < 1e-5


def _ablation():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["denoise", "dehaze"])
def test_ablation_script_runs_end_to_end(task, tmp_path, capsys):
    """benchmarks/ablation.py on tiny data: every row printed (the dehazing table's
    heading named a constant that no longer existed, after all the evaluations)."""
    import numpy as np
    from PIL import Image

    from spikingir.weights import WEIGHTS_DIR
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    if task == "denoise":
        data.mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(data / f"{i}.png")
        extra = ["--ann-weights", str(WEIGHTS_DIR / "dncnn_s25.pt"), "--crop", "16"]
    else:
        (data / "hazy").mkdir(parents=True)
        (data / "gt").mkdir()
        for scene in range(3):
            clean = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(clean).save(data / "gt" / f"{scene}.png")
            Image.fromarray((clean // 2 + 100).astype(np.uint8)).save(data / "hazy" / f"{scene}_1.png")
        extra = []
    code = _ablation().main(["--task", task, "--data", str(data), "--calib", str(data), "--T", "2",
                             "--limit", "1", "--threads", "1", *extra])
    out = capsys.readouterr().out
    assert code in (0, None), out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 4, out
