"""Multistep IF neuron: every implementation side by side, in one run.

Columns (backends), each timed on the same input ``x = randn(T, N) * 0.5 + 0.3``
(float32, theta = 1.0 scalar, sigmoid surrogate with alpha = 4):

=============  ===============================================================
naive          the per-step PyTorch loop a user writes (:func:`naive_if`),
               autograd through a surrogate-gradient ``autograd.Function``
compile        ``torch.compile`` of that loop (a note instead when it fails)
torch          spikingir's reference backend (``if_multistep(backend="torch")``)
cpp/cuda/...   every fused backend in ``available_backends(device)``
<b> masks      the same backend with ``emit="masks"`` (forward only): x seen as
               ``[T, 1, C, 1, N / C]``, the spikes written as channel bit
               masks (1 bit per spike instead of a float32 y)
spikingjelly   SpikingJelly's multistep ``IFNode`` (cupy backend on CUDA when
               available, else torch), only when spikingjelly is importable
               (not a dependency: SpikingJelly 2.0 requires torchvision and
               torchaudio, which pip would resolve against your torch;
               ``pip install --no-deps spikingjelly "loguru>=0.7,<1"`` is
               what its neuron needs)
=============  ===============================================================

Modes: ``fwd`` (inference forward, x needs no grad) and ``fwdbwd`` (forward,
then ``torch.autograd.backward([y], [g])`` with a fixed random g; x needs grad,
theta does not).

Timing: on the CPU ``time.perf_counter`` after a warmup, median over repeats
(at least 3, more until ``min_time`` seconds per column or 100), the columns
of one (mode, T, N) timed round-robin so that load from other processes
falls on all of them alike; on
CUDA ``triton.testing.do_bench`` (median) when triton imports, else CUDA
events. ``GB/s`` divides the byte floor of the op by the time: fp32, 8 B per
neuron-step forward (read x, write y) and 24 B forward + backward (also write
and read one saved value, read grad_y, write grad_x). On CUDA ``floor%`` is
``floor_ms / ms`` with ``floor_ms = bytes / 3.0e12 B/s`` (assumed achievable
HBM bandwidth of an H100 SXM, 3.35 TB/s nominal); on the CPU only GB/s is shown.
``maxdiff`` is max |y - y_naive| (and, in fwdbwd, max |grad_x - grad_x_naive|):
every column computes the same thing, so it is ~0 (a flipped spike shows as 1).
"""
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

from spikingir.bench.neuron_args import (DEFAULT_N, DEFAULT_T, MODES, QUICK_N, QUICK_T,  # noqa: F401
                                         SKIPPABLE)
from spikingir.ops import SpikeMasks, backends, if_multistep

MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward"}
#: Byte floor per neuron-step, fp32 (see the module docstring).
BYTES_PER_NEURON_STEP = {"fwd": 8, "fwdbwd": 24}
#: Assumed achievable GPU memory bandwidth for the floor (H100 SXM: 3.35 TB/s nominal).
GPU_PEAK_BYTES_PER_S = 3.0e12
THETA = 1.0
ALPHA = 4.0


# --------------------------------------------------------------------------
# The naive loop: what a user writes without spikingir.
# --------------------------------------------------------------------------

class SigmoidSpike(torch.autograd.Function):
    """Heaviside forward, sigmoid surrogate gradient ``a sig(a u) (1 - sig(a u))``."""

    @staticmethod
    def forward(ctx, u, alpha):
        ctx.save_for_backward(u)
        ctx.alpha = alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        (u,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * u)
        return grad_s * ctx.alpha * sig * (1 - sig), None


def naive_if(x_seq, theta=THETA, alpha=ALPHA):
    """IF neuron with soft reset, one PyTorch op at a time. Returns (y_seq, v_final)."""
    v = torch.zeros_like(x_seq[0])
    ys = []
    for t in range(x_seq.shape[0]):
        h = v + x_seq[t]
        s = SigmoidSpike.apply(h - theta, alpha)
        v = h - theta * s
        ys.append(theta * s)
    return torch.stack(ys), v


# --------------------------------------------------------------------------
# Columns.
# --------------------------------------------------------------------------

def _has_spikingjelly():
    try:
        from spikingjelly.activation_based import neuron, surrogate  # noqa: F401
    except Exception:  # ImportError, or a broken install (cupy, ...)
        return False
    return True


def _spikingjelly_column(device):
    """(callable x -> (y, v), backend name) for SpikingJelly's multistep IFNode."""
    from spikingjelly.activation_based import neuron, surrogate

    node = neuron.IFNode(step_mode="m", v_threshold=THETA, v_reset=None, detach_reset=False,
                         surrogate_function=surrogate.Sigmoid(alpha=ALPHA))
    sj_backend = "torch"
    # SpikingJelly <= 0.0.0.0.14 has a fused CuPy kernel ("cupy" backend); 2.x
    # dropped the attribute and runs a PyTorch loop.
    if torch.device(device).type == "cuda" and "cupy" in getattr(node, "supported_backends", ()):
        import numpy as np
        if not hasattr(np, "int"):
            # SpikingJelly 0.0.0.0.14's CuPy launcher still names np.int (removed in
            # numpy 1.24): on an H100 with numpy 2 its kernel failed with that alone.
            np.int = int
        try:
            node.backend = "cupy"
            node.to(device)
            node(torch.zeros(2, 64, device=device))  # compiles the CuPy kernel; may fail
            node.reset()
            sj_backend = "cupy"
        except Exception as exc:  # noqa: BLE001 - report and time the torch backend instead
            print(f"[bench_neuron] SpikingJelly cupy backend failed ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); timing its torch backend")
            node.reset()
    if hasattr(node, "backend"):
        node.backend = sj_backend
    node.to(device)

    def fn(x):
        node.reset()
        y = node(x)
        return y, node.v

    return fn, sj_backend


def timed_backends(device, op):
    """The fused backends of ``op`` a benchmark times on ``device``: not the
    reference (the baseline column) nor Triton on CPU tensors (the interpreter)."""
    return [b for b in backends.available_backends(device, op=op)
            if b != "torch" and not (b == "triton" and torch.device(device).type == "cpu")]


def columns(device, skip=()):
    """[(name, callable or None, note)] in table order; callable is None for a
    column that is reported but not timed (the note says why)."""
    cols = [("naive", naive_if, "")]
    if "compile" not in skip:
        cols.append(("compile", "compile", ""))  # built per cell, see _compiled
    cols.append(("torch", lambda x: if_multistep(x, THETA, alpha=ALPHA, backend="torch"), ""))
    for b in backends.available_backends(device):
        if b == "torch" or b in skip:
            continue
        if b == "triton" and backends.TRITON_INTERPRET:
            cols.append((b, None, "skipped: TRITON_INTERPRET=1 runs the interpreter"))
            continue
        cols.append((b, (lambda bb: lambda x: if_multistep(x, THETA, alpha=ALPHA,
                                                           backend=bb))(b), ""))
        cols.append((f"{b} masks", (lambda bb: lambda x: if_multistep(
            _as_conv_input(x), THETA, backend=bb, emit="masks"))(b), ""))
    if "spikingjelly" not in skip and _has_spikingjelly():
        fn, sj_backend = _spikingjelly_column(device)
        cols.append(("spikingjelly", fn, f"IFNode backend={sj_backend}"))
    return [c for c in cols if c[0] not in skip]


def _as_conv_input(x):
    """[T, N] -> [T, 1, C, 1, N / C] (C = 64, 32 or 1: the first that divides N):
    the neurons seen as C channels of one image, the shape emit="masks" takes."""
    T, N = x.shape
    C = next(c for c in (64, 32, 1) if N % c == 0)
    return x.view(T, 1, C, 1, N // C)


def _compiled():
    # A fresh dynamo cache per cell: compiled frames of naive_if would otherwise
    # pile up across shapes and hit the recompile limit (a silent fall back to eager).
    torch._dynamo.reset()
    return torch.compile(naive_if, dynamic=False)


# --------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------

def _time_cpu(steps, min_time, min_reps=3, max_reps=100, warm=None):
    """Median ms of each callable, timed round-robin (one call of each per round)
    so that load from other processes falls on every column alike. Rounds go on
    until ``min_reps`` and then until ``min_time`` s per callable or ``max_reps``.
    Each callable gets one warmup call unless ``warm[i]`` says it needs none."""
    for i, fn in enumerate(steps):
        if not (warm and warm[i]):
            fn()
    times = [[] for _ in steps]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (rounds < max_reps
                                and time.perf_counter() - start < min_time * len(steps)):
        for fn, ts in zip(steps, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        rounds += 1
    return [(statistics.median(ts) * 1e3, len(ts)) for ts in times]


def _time_cuda(fn):
    try:
        import triton.testing

        # do_bench clears the L2 cache before each call and reports the median.
        # do_bench does not say how many calls it timed: reps stays None ("-").
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")), None
    except ImportError:
        pass
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), len(times)


def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _cpu_busy_seconds():
    """(seconds of CPU time used by every process, by this one) so far; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy_ticks = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy_ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system


class _OtherLoad:
    """Average number of cores used by *other* processes over a ``with`` block:
    a busy machine makes CPU timings noisy (OpenMP barriers wait for descheduled
    threads), and the table says so."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), _cpu_busy_seconds()
        self.cores = None
        return self

    def __exit__(self, *exc):
        c1, wall = _cpu_busy_seconds(), time.perf_counter() - self.t0
        if self.c0 is not None and c1 is not None and wall > 0:
            self.cores = max(0.0, ((c1[0] - self.c0[0]) - (c1[1] - self.c0[1])) / wall)
        return False


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------

def _check_args(device, Ts, Ns, modes):
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__})")
    for name, values in (("T", Ts), ("N", Ns)):
        if not values or any(int(v) != v or v < 1 for v in values):
            raise ValueError(f"{name}: expected positive integers, got {list(values)}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes: expected some of {MODES}, got {list(modes)}")
    return dev


def run(device="cpu", Ts=None, Ns=None, modes=MODES, threads=None, min_time=0.5, skip=(),
        progress=None):
    """Times every column for every (mode, T, N); returns one dict per row.

    Row keys: device, backend, mode, T, N, ms (None when not timed), reps,
    speedup (naive ms / ms), gbps (byte floor / time), floor_frac (GPU only:
    floor_ms / ms), maxdiff (vs the naive loop), note, other_load (cores used
    by other processes while the cell ran; None when unknown). ``skip`` names columns
    to leave out; ``progress`` (a callable taking a str) hears about each cell.
    """
    Ts = list(Ts or DEFAULT_T)
    Ns = list(Ns or DEFAULT_N.get(torch.device(device).type, DEFAULT_N["cpu"]))
    dev = _check_args(device, Ts, Ns, list(modes))
    bad = [s for s in skip if s not in SKIPPABLE]
    if bad:
        raise ValueError(f"skip: expected some of {SKIPPABLE}, got {bad}")
    if threads is not None:
        torch.set_num_threads(int(threads))
    on_gpu = dev.type == "cuda"
    cols = columns(dev, skip)
    rows = []
    for mode in modes:
        for T in Ts:
            for N in Ns:
                if progress:
                    progress(f"{mode} T={T} N={N}")
                with _OtherLoad() as load:
                    cell = _run_cell(dev, mode, T, N, cols, on_gpu, min_time)
                for row in cell:
                    row["other_load"] = load.cores
                rows += cell
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()
    return rows


def _run_cell(dev, mode, T, N, cols, on_gpu, min_time):
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, N, generator=gen, device=dev) * 0.5 + 0.3
    g = torch.randn(T, N, generator=gen, device=dev)
    backward = mode == "fwdbwd"
    x.requires_grad_(backward)
    nbytes = BYTES_PER_NEURON_STEP[mode] * T * N
    ref = None  # (y, grad_x) of the naive loop
    rows, timed = [], []  # every row; (row, step) of the columns that ran
    for name, fn, note in cols:
        row = dict(device=str(dev), backend=name, mode=mode, T=T, N=N, ms=None, reps=0,
                   speedup=None, gbps=None, floor_frac=None, maxdiff=None, note=note)
        rows.append(row)
        if backward and name.endswith(" masks"):
            row["note"] = "inference only (emit='masks')"
            continue
        if fn is None:
            continue
        if fn == "compile":
            fn = _compiled()

        def step(fn=fn):
            if backward:
                x.grad = None
                y, _ = fn(x)
                torch.autograd.backward([y], [g])
            else:
                y, _ = fn(x)
            return y

        try:
            t0 = time.perf_counter()
            y = step()  # first call: compiles, checks, warms up
            first_s = time.perf_counter() - t0
            y = y.to_dense().reshape(T, N) if isinstance(y, SpikeMasks) else y.detach()
        except Exception as exc:  # compile without a C compiler, a missing cupy, ...
            row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            if name == "naive":
                raise
            continue
        got = (y, x.grad.detach().clone() if backward else None)
        if ref is None:
            ref = got
        diff = _max_diff(got[0], ref[0])
        if backward:
            diff = max(diff, _max_diff(got[1], ref[1]))
        row["maxdiff"] = diff
        del y, got
        # A call of over a second warms up enough (not so a compiling one).
        timed.append((row, step, first_s > 1.0 and name != "compile"))
    if on_gpu:
        results = [_time_cuda(step) for _, step, _ in timed]
    else:
        results = _time_cpu([step for _, step, _ in timed], min_time,
                            warm=[w for _, _, w in timed])
    for (row, _, _), (ms, reps) in zip(timed, results):
        row["ms"], row["reps"] = ms, reps
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if on_gpu:
            row["floor_frac"] = nbytes / GPU_PEAK_BYTES_PER_S * 1e3 / ms
    naive_ms = rows[0]["ms"]
    for row in rows:
        if row["ms"]:
            row["speedup"] = naive_ms / row["ms"]
    return rows


# --------------------------------------------------------------------------
# Environment and output.
# --------------------------------------------------------------------------

def _git(*args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device):
    """The GPU name, or the CPU model from /proc/cpuinfo."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command(script=None, argv=None):
    """The command line that made a table: ``python SCRIPT ARGV`` for a benchmark
    script's ``main(argv)`` (``argv`` None: this process's arguments), else this
    process's own (``spikingir`` for the console script and ``python -m spikingir``)."""
    if script is not None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        where = os.path.relpath(os.path.abspath(script), root)
        return shlex.join(["python", where, *(sys.argv[1:] if argv is None else argv)])
    args = list(sys.argv) or [""]
    if os.path.basename(args[0]) == "spikingir" or args[0].endswith(
            os.path.join("spikingir", "__main__.py")):
        args[0] = "spikingir"
    return shlex.join(args)


def environment(device, threads=None, command_line=None):
    """date, commit (``+dirty`` when the op code differs from it), device name,
    torch and Triton versions, the instruction set of the CPU kernels, thread
    count and the command line (``command_line``, default :func:`command`): what
    every results row is labelled with.
    ``SPIKINGIR_COMMIT`` overrides the commit (a copy of the tree whose ``.git``
    is stale, as on a lent GPU machine: benchmarks/gpu_check.sh sets it)."""
    commit = os.environ.get("SPIKINGIR_COMMIT")
    dirty = None
    if not commit:
        commit = _git("rev-parse", "--short", "HEAD") or "unknown"
        # Only changes to code that runs in the benchmarks make the numbers "dirty": the
        # ops, the scripts themselves and the networks bench_snn.py times (not RESULTS.md).
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "csrc", "kernels",
                     "spikingir/ops", "spikingir/bench", "setup.py", "benchmarks/*.py",
                     "spikingir/models", "spikingir/nn")
    if dirty:
        commit += "+dirty"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        device=str(torch.device(device)),
        device_name=device_name(device),
        torch=torch.__version__,
        triton=backends.triton.__version__ if backends.HAS_TRITON else None,
        # the CPU kernels pick AVX-512, AVX2 or generic paths at run time (SPIKINGIR_CPU_ISA
        # caps them), and their speed differs by the path (benchmarks/RESULTS.md)
        cpu_isa=backends._C.cpu_isa() if backends.HAS_CPP_OPS else None,
        threads=int(threads) if threads is not None else torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        # torch's CPU allocator with transparent huge pages (read at torch's first
        # allocation; the spikingir command turns it on): fewer page faults.
        huge_pages=os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1",
        command=command_line or command(),
    )


def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def _blocks(rows):
    keys = []
    for r in rows:
        k = (r["mode"], r["T"], r["N"])
        if k not in keys:
            keys.append(k)
    return [(k, [r for r in rows if (r["mode"], r["T"], r["N"]) == k]) for k in keys]


def format_table(rows):
    """A compact fixed-width table, one block per (mode, T, N)."""
    if not rows:
        return "(no rows)"
    gpu = any(r["device"].startswith("cuda") for r in rows)
    head = f"{'backend':<13}{'ms':>10}{'speedup':>9}{'GB/s':>8}"
    head += f"{'floor%':>8}" if gpu else ""
    head += f"{'maxdiff':>9}{'reps':>6}  note"
    out = []
    for (mode, T, N), block in _blocks(rows):
        floor_mb = BYTES_PER_NEURON_STEP[mode] * T * N / 1e6
        load = block[0].get("other_load")
        busy = f"  [busy: other processes used {load:.1f} cores]" if (load or 0) >= 0.2 else ""
        out.append(f"== {MODE_TITLES[mode]}  T={T}  N={N:,}  (byte floor {floor_mb:.1f} MB) =={busy}")
        out.append(head)
        for r in block:
            line = f"{r['backend']:<13}{_fmt(r['ms'], '.3f'):>10}{_fmt(r['speedup'], '.2f'):>9}"
            line += f"{_fmt(r['gbps'], '.1f'):>8}"
            if gpu:
                line += f"{_fmt(r['floor_frac'] and 100 * r['floor_frac'], '.1f'):>8}"
            line += f"{_fmt(r['maxdiff'], '.0e'):>9}{_fmt(r['reps'], 'd'):>6}  {r['note']}"
            out.append(line.rstrip())
        out.append("")
    legend = ("ms: median; speedup: naive ms / ms; GB/s: byte floor (fp32: 8 B per neuron-step "
              "fwd, 24 B fwd+bwd) / time")
    if gpu:
        legend += f"; floor%: (bytes / {GPU_PEAK_BYTES_PER_S / 1e12:.1f} TB/s) / time"
    legend += "; maxdiff: max |y - y_naive| (and grad_x)"
    out.append(legend)
    return "\n".join(out)


def to_markdown(rows, header):
    """A Markdown section: ``### header`` and one table of all rows."""
    gpu = any(r["device"].startswith("cuda") for r in rows)
    cols = ["mode", "T", "N", "backend", "ms", "speedup", "GB/s"]
    cols += ["% of floor"] if gpu else []
    cols += ["max diff", "note"]
    out = [f"### {header}", "", "| " + " | ".join(cols) + " |",
           "|" + "|".join("---" if c in ("mode", "backend", "note") else "---:" for c in cols)
           + "|"]
    for r in rows:
        cells = [MODE_TITLES[r["mode"]], str(r["T"]), f"{r['N']:,}", r["backend"],
                 _fmt(r["ms"], ".3f"), _fmt(r["speedup"], ".2f"), _fmt(r["gbps"], ".1f")]
        if gpu:
            cells.append(_fmt(r["floor_frac"] and 100 * r["floor_frac"], ".1f"))
        note = r["note"]
        if r.get("other_load") and r["other_load"] >= 0.2:
            note = f"busy: others used {r['other_load']:.1f} cores" + (f"; {note}" if note else "")
        cells += [_fmt(r["maxdiff"], ".0e"), note.replace("|", "/")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def cli_module():
    """``spikingir.cli`` (its argument types and output checks) for a benchmark
    script, without its import's side effect there: the module sets
    ``THP_MEM_ALLOC_ENABLE=1`` for the ``spikingir`` command, and torch, imported
    by the script already, reads the variable at its first allocation. So
    ``bench_neuron.py --json PATH`` ran with huge pages and the same run without
    ``--json`` without them (a 200 MB tensor: 188 MB in huge pages against none)."""
    before = os.environ.get("THP_MEM_ALLOC_ENABLE")
    from spikingir import cli
    if before is None:
        os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    return cli


def check_json_path(path, error):
    """``--json PATH`` checked before the benchmark, which takes minutes:
    ``error(message)`` (an argparse parser's ``error``) when it cannot be written."""
    try:
        cli_module().check_outputs(path, option="--json")
    except ValueError as exc:
        error(str(exc))


def write_json(path, env, rows):
    """The rows and their environment as JSON at ``path``, atomically (what
    ``--json`` writes, in the CLI and in benchmarks/bench_neuron.py)."""
    from spikingir.atomic import write_atomic
    write_atomic(path, json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


def markdown_header(env):
    """One line naming what produced the rows: device (on the CPU with the kernels'
    instruction set), threads, huge pages, commit, date, torch (and Triton on a GPU)."""
    where = env["device_name"]
    gpu = env["device"].startswith("cuda")
    if gpu:
        where += f" (floor at {GPU_PEAK_BYTES_PER_S / 1e12:.1f} TB/s assumed)"
    elif env.get("cpu_isa"):
        where += f" ({env['cpu_isa']} kernels)"
    pages = ", THP_MEM_ALLOC_ENABLE=1" if env.get("huge_pages") else ""
    triton = f", triton {env.get('triton') or '(none)'}" if gpu else ""
    return (f"{where}, {env['threads']} thread(s){pages} — commit {env['commit']}, "
            f"{env['date']}, torch {env['torch']}{triton}")


def command_note(env):
    """The line that says how the table was made (``env["command"]``), printed under
    the header: its options are the run's exact configuration."""
    return f"command: {env['command']}"
