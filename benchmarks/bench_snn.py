"""End to end: the shipped DnCNN SNN (sigma=25, MPRN, T=10 + reuse step) against
its ANN on one noisy image, forward only (inference, no grad).

    python benchmarks/bench_snn.py --device cuda                 # 1 x 1 x 321 x 481
    python benchmarks/bench_snn.py --device cpu --shape 1 1 96 96
    python benchmarks/bench_snn.py --train --device cuda --shape 32 1 40 40   # a training step

Columns (ms of one forward; GPU: triton.testing.do_bench median; CPU: minimum
of --repeats calls after one untimed call):
- ``ANN fp32``: DnCNN with cuDNN fp32 (TF32 off); ``ANN tf32``; ``ANN bf16 cl``
  (bf16 autocast, channels-last) on the GPU.
- ``SNN dense``: the SNN as shipped: fused neurons, hidden convs by F.conv2d on
  ``theta * s`` (fp32, TF32 off); the first conv runs once, not T times.
- ``SNN spike <backend>``: the same SNN with ``use_spike_conv(backend=...,
  masks=False)``: hidden convs by ``spike_conv2d`` on the binary float spikes,
  theta folded into the weights.
- ``SNN spike <backend> masks``: the same, the neurons handing the spikes to
  ``spike_conv2d`` as channel bit masks (``emit="masks"``, the default).
- ``SNN spike auto (restore default)``: ``use_spike_conv(backend="auto")``, what
  ``spikingir restore`` and ``evaluate`` run (ops.backends.AUTO_OVERRIDE).
- ``SNN dense bf16 cl`` (GPU): the shipped SNN under ``torch.autocast(bfloat16)``
  with channels-last weights and input: not exact (weights and currents rounded
  to bf16), the fast setting for inference; PSNR says what it costs.
- ``<column>, CUDA graph`` (GPU; ANN fp32, the restore default and SNN dense bf16
  cl): that column's forward captured once in a CUDA graph (``torch.cuda.graph``)
  and replayed: the same kernels without the host's work per op (an SNN at T=10
  issues hundreds of small launches; the gap to the uncaptured column is what
  host overhead costs). A capture that fails (e.g. a host synchronisation in
  the forward) is reported in the table.
``ratio``: column ms / ANN fp32 ms. ``PSNR``: of the output against the clean
image (dB). The spike-conv columns are not bitwise equal to ``SNN dense``: a
float32 rounding difference in one conv can flip one spike, and the flip spreads
through later layers and steps (measured on CPU, 160x160 crops: max |diff| ~0.25
between F.conv2d on theta*s and F.conv2d with theta folded into the weights, both
fp32, with PSNR equal within 0.03 dB); PSNR is the meaningful comparison.
"""
import contextlib
import os
import sys
import time

import numpy as np
import torch

from spikingir.bench.neuron import (cli_module, command, command_note, environment,
                                    markdown_header, timed_backends)
from spikingir.data import add_gaussian_noise
from spikingir.metrics import psnr
from spikingir.pipeline import load_snn
from spikingir.weights import WEIGHTS_DIR, load_shipped_ann


def _image(shape):
    """(noisy, clean): scikit-image's camera tiled to ``shape``, noise sigma 25
    (numpy seed 0)."""
    from skimage import data
    cam = data.camera().astype(np.float32) / 255.0
    B, _, H, W = shape
    reps = (-(-H // cam.shape[0]), -(-W // cam.shape[1]))
    img = np.tile(cam, reps)[:H, :W]
    noisy = np.asarray(add_gaussian_noise(img, 25, seed=0), dtype=np.float32)
    return torch.from_numpy(noisy)[None, None].expand(B, 1, H, W).contiguous(), img


@contextlib.contextmanager
def _tf32(on):
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _graphed(f):
    """``f`` (no arguments, static shapes) captured in a CUDA graph after three
    warm-up calls on a side stream (the torch.cuda.graph recipe): returns
    ``(replay, output)``, ``replay()`` re-running the captured kernels into
    ``output``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    return graph.replay, out


def _time(f, device, repeats):
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(f, return_mode="median")
    f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def train_step_table(args):
    """``--train``: ms of one fine-tuning step of the SNN (``--shape`` B x 1 x H x W
    noisy patches, MSE to the clean ones, backward through the fused neurons,
    Adam), with the network in NCHW and in channels-last memory (``spikingir
    finetune`` trains channels-last on the CPU), fp32 (TF32 off on a GPU), and
    channels-last under bf16 autocast (``spikingir finetune --amp``; on a CPU
    without AVX512-BF16 or AMX that row is slow, not fast); then NCHW fp32 with
    the hidden convolutions on the spikes through each fused ``spike_conv2d``
    backend (forward and its backward: grad_s dense, grad_weight from the
    bit-packed spikes)."""
    dev = args.device
    x, clean = _image(args.shape)
    x = x.to(dev)
    target = torch.from_numpy(clean)[None, None].expand_as(x).to(dev)
    rows = []
    settings = [("contiguous_format", torch.contiguous_format, False),
                ("channels_last", torch.channels_last, False),
                ("channels_last bf16 autocast", torch.channels_last, True)]
    settings += [(f"contiguous_format, spike_conv2d {be}", torch.contiguous_format, False, be)
                 for be in timed_backends(dev, "spike_conv2d")]
    for name, layout, amp, *spike_backend in settings:
        snn = load_snn(args.snn_weights).to(dev).to(memory_format=layout).train()
        if spike_backend:
            snn.use_spike_conv(True, spike_backend[0], masks=False)
        opt = torch.optim.Adam(snn.parameters(), 1e-6)
        xl = x.contiguous(memory_format=layout)

        def step():
            with torch.autocast(dev, torch.bfloat16, enabled=amp):
                out = snn(xl)
            loss = torch.nn.functional.mse_loss(out.float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with _tf32(False):
            rows.append((name, _time(step, dev, args.repeats)))
    env = environment(dev, args.threads, args.command)
    lines = [f"Fine-tuning step of the SNN ({args.snn_weights.split('/')[-1]}), input "
             f"{args.shape}, Adam", "", "| layout | ms | x NCHW |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {rows[0][1] / ms:.2f} |" for name, ms in rows]
    header = markdown_header(env)
    print(header)
    print(command_note(env))
    print("\n".join(lines))
    if args.markdown_append:
        with open(args.markdown_append, "a") as f:
            f.write(f"\n## SNN fine-tuning step (`benchmarks/bench_snn.py --train`) — {header}\n\n"
                    f"`{command_note(env)}`\n\n" + "\n".join(lines) + "\n")
    return 0


def main(argv=None):
    cli = cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", type=cli._positive_int, nargs=4, default=[1, 1, 321, 481],
                   metavar=("B", "C", "H", "W"))
    p.add_argument("--threads", type=cli._positive_int, default=2)
    p.add_argument("--repeats", type=cli._positive_int, default=3)
    p.add_argument("--snn-weights", default=os.path.join(WEIGHTS_DIR, "snn_dncnn_s25.pt"),
                   help="SNN from `spikingir finetune` (default: the shipped DnCNN s25 SNN)")
    p.add_argument("--train", action="store_true",
                   help="time a fine-tuning step instead (see train_step_table)")
    p.add_argument("--markdown-append", metavar="PATH")
    p.add_argument("--triton-config", metavar="JSON", default=None,
                   help='launch options of the Triton spike_conv2d for this run, for both inputs '
                        '(float spikes and masks), e.g. \'{"b_kmajor": false}\', or per input, '
                        'e.g. \'{"masks": {"block_k": 64, "tile": [16, 16], "num_warps": 8}}\' '
                        '(see kernels/spike_conv.py DEFAULT_CONFIG; the same result bit for bit)')
    args = p.parse_args(argv)
    args.command = command(__file__, argv)  # what the table says it ran
    if cli.cuda_missing(args.device):
        p.error(cli.cuda_missing(args.device))
    if not os.path.isfile(args.snn_weights):
        p.error(f"--snn-weights {args.snn_weights}: no such file")
    torch.set_num_threads(args.threads)
    dev = args.device
    if args.triton_config:
        import json

        from spikingir.ops import backends
        if not backends.HAS_TRITON:
            p.error("--triton-config: triton is not installed")
        from spikingir.kernels import spike_conv as K
        try:
            cfg = json.loads(args.triton_config)
            if not isinstance(cfg, dict):
                raise ValueError(f"expected a JSON object, got {args.triton_config}")
            if not set(cfg) <= {"float", "masks"}:
                cfg = {"float": cfg, "masks": cfg}
            for kind, base in (("float", K.DEFAULT_CONFIG), ("masks", K.MASKS_CONFIG)):
                part = {k: tuple(v) if isinstance(v, list) else v
                        for k, v in cfg.get(kind, {}).items()}
                K.launch_config(base, part, 64)  # unknown options fail here, not mid-run
                base.update(part)
        except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            p.error(f"--triton-config: {str(exc).splitlines()[0]}")
        if dev != "cuda":  # the CPU runs no Triton kernel: the options would change nothing
            p.error("--triton-config sets the Triton kernels' launch on a GPU: it needs --device cuda")
    if args.train:
        return train_step_table(args)
    x, clean = _image(args.shape)
    x = x.to(dev)
    ann = load_shipped_ann("denoise", sigma=25).to(dev)
    snn = load_snn(args.snn_weights).to(dev)
    cols = {}
    with torch.no_grad():
        with _tf32(False):
            cols["ANN fp32"] = lambda: ann(x)
            ref = snn(x)
            snn.record_stats()(x)
            rate = snn.firing_rate()
            snn.record_stats(False)
        ms, quality = {}, {}

        def score(out):
            return psnr(clean, out[0, 0].clamp(0, 1).float().cpu().numpy())
        notes = {}

        def graph_column(name, f):
            """Times ``f`` captured in a CUDA graph (under the caller's settings),
            at once: the graph holds the module's tensors as they are now."""
            name = f"{name}, CUDA graph"
            try:
                replay, out = _graphed(f)
                replay()
                ms[name] = _time(replay, dev, args.repeats)
                quality[name] = score(out)
            except Exception as exc:  # noqa: BLE001 - a capture that fails is a result too
                notes[name] = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                print(notes[name], file=sys.stderr)
        with _tf32(False):
            ms["ANN fp32"] = _time(lambda: ann(x), dev, args.repeats)
            quality["ANN fp32"] = score(ann(x))
            if dev == "cuda":
                graph_column("ANN fp32", lambda: ann(x))
            ms["SNN dense"] = _time(lambda: snn(x), dev, args.repeats)
        if dev == "cuda":
            with _tf32(True):
                ms["ANN tf32"] = _time(lambda: ann(x), dev, args.repeats)
            cl = torch.channels_last
            ann_cl, x_cl = ann.to(memory_format=cl), x.to(memory_format=cl)
            with torch.autocast("cuda", torch.bfloat16):
                ms["ANN bf16 cl"] = _time(lambda: ann_cl(x_cl), dev, args.repeats)
        quality["SNN dense"] = score(ref)
        runs = [(f"SNN spike {be}" + (" masks" if masks else ""), be, masks)
                for be in timed_backends(dev, "spike_conv2d") for masks in (False, True)]
        # and what `spikingir restore` / `evaluate` run: backend "auto"
        runs.append(("SNN spike auto (restore default)", "auto", True))
        for name, be, masks in runs:
            snn.use_spike_conv(True, be, masks=masks)
            with _tf32(False):
                out = snn(x)
                ms[name] = _time(lambda: snn(x), dev, args.repeats)
                if dev == "cuda" and be == "auto":
                    graph_column(name, lambda: snn(x))
            quality[name] = score(out)
        snn.use_spike_conv(False)
        if dev == "cuda":
            # mixed precision: the SNN as shipped under bf16 autocast, channels-last
            # (spikes are exact in bf16, weights and currents are rounded)
            snn_cl = snn.to(memory_format=cl)
            with torch.autocast("cuda", torch.bfloat16):
                out = snn_cl(x_cl)
                ms["SNN dense bf16 cl"] = _time(lambda: snn_cl(x_cl), dev, args.repeats)
                graph_column("SNN dense bf16 cl", lambda: snn_cl(x_cl))
            quality["SNN dense bf16 cl"] = score(out)
    base = ms["ANN fp32"]
    env = environment(dev, args.threads, args.command)
    header = markdown_header(env)
    lines = [f"DnCNN SNN {os.path.basename(args.snn_weights)} (T={snn.timesteps}, "
             f"{snn.neuron_kind}) vs the shipped s25 ANN, input "
             f"{args.shape}, mean firing rate {100 * rate:.1f}%"
             + (f", Triton launch options {args.triton_config}" if args.triton_config else ""),
             "", "| column | ms | ratio to ANN fp32 | PSNR (dB) |", "|---|---|---|---|"]
    for k, v in ms.items():
        d = f"{quality[k]:.2f}" if k in quality else "-"
        lines.append(f"| {k} | {v:.2f} | {v / base:.2f} | {d} |")
    lines += [f"| {k} | {note} | - | - |" for k, note in notes.items()]
    table = "\n".join(lines)
    print(header)
    print(command_note(env))
    print(table)
    if args.markdown_append:
        with open(args.markdown_append, "a") as f:
            f.write(f"\n## SNN end to end (`benchmarks/bench_snn.py`) — {header}\n\n"
                    f"`{command_note(env)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
