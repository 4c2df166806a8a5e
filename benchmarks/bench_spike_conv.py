"""spike_conv2d: every available backend against F.conv2d, side by side, on random
spike maps at several firing rates and (optionally) on real spike maps of a
converted DnCNN.

    python benchmarks/bench_spike_conv.py                      # CPU, 2 threads
    python benchmarks/bench_spike_conv.py --dncnn              # + real DnCNN spike maps
    python benchmarks/bench_spike_conv.py --markdown-append benchmarks/RESULTS.md
    python benchmarks/bench_spike_conv.py --device cuda --shape 80 64 128 128

Columns: ms of one forward call (CPU: the minimum over interleaved repeats, as
the machine may be shared, each after an untimed call of the same column; GPU: triton.testing.do_bench median); ``x`` is
F.conv2d fp32 ms / backend ms. ``occupancy``: fraction of (output tile 8x16,
tap, 32-channel group) K-blocks that hold a spike, a measure of how clustered the
spikes are (an earlier Triton kernel skipped the empty ones; today's forward
reads every block, its default tiles are 16x16 by 64 channels). GPU runs add cuDNN fp32 (TF32 off), TF32 and
bf16 channels-last columns. ``max err``: the largest |backend - float64 conv|
over the row, relative to max |float64 conv|. ``<backend> masks``: the same
spikes given as ``SpikeMasks`` (1 bit per spike, channels last: what the
neurons emit with ``emit="masks"``; packed outside the timing).

Real spike maps (``--dncnn``): the official DnCNN-S sigma=25 weights
(../shared/weights/dncnn_s25_official.pt) in a plain nn.Sequential of 17 convs,
ReLUs replaced by IF neurons (spikingir.ops.if_multistep, soft reset, T=10)
with thresholds = the 99.9th percentile of each ReLU's activations on the Set12
images (96x96 centre crops, noise sigma 25, numpy seed 0); the first conv's
output is the constant input current of every step. The spikes entering
layers 2, 9 and 16 (64 -> 64 3x3) are benchmarked.
"""
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

from spikingir import ops
from spikingir.bench.neuron import (cli_module, command, command_note, environment,
                                    markdown_header, timed_backends)
from spikingir.ops import backends

RATES = (0.01, 0.05, 0.10, 0.20, 0.50)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def block_occupancy(s, k=3, stride=1, padding=1):
    if not backends.HAS_TRITON:
        return None
    from spikingir.kernels.spike_conv import occupancy_map, padded_spikes
    Ho = (s.shape[2] + 2 * padding - k) // stride + 1
    Wo = (s.shape[3] + 2 * padding - k) // stride + 1
    s8 = padded_spikes(s, padding, 32)
    return occupancy_map(s8, k, k, stride, Ho, Wo, 32).float().mean().item()


@contextlib.contextmanager
def cudnn_tf32(on):
    """cuDNN convolutions with TF32 on or off inside the block."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def columns(device):
    """name -> f(s, w, b) for everything timed on this device."""
    cols = {}
    if device == "cpu":
        cols["F.conv2d"] = lambda s, w, b: F.conv2d(s, w, b, 1, 1)
    else:
        def cudnn(tf32):
            def f(s, w, b):
                with cudnn_tf32(tf32):
                    return F.conv2d(s, w, b, 1, 1)
            return f
        cols["F.conv2d"] = cudnn(False)  # cuDNN fp32, TF32 off
        cols["cudnn tf32"] = cudnn(True)
        cols["cudnn bf16 cl"] = lambda s, w, b: F.conv2d(s, w, b, 1, 1)  # inputs converted below
    for be in timed_backends(device, "spike_conv2d"):  # torch is the F.conv2d column
        cols[be] = (lambda be: lambda s, w, b: ops.spike_conv2d(s, w, b, 1, 1, validate=False,
                                                                backend=be))(be)
        if be == "cpp":
            cols["cpp+validate"] = lambda s, w, b: ops.spike_conv2d(s, w, b, 1, 1, backend="cpp")
        # the same spikes as channel masks (what the neurons hand over with emit="masks")
        cols[f"{be} masks"] = cols[be]
    return cols


def time_cpu(cols, inputs, repeats):
    """Minimum ms of each column over `repeats` rounds (interleaved across columns,
    so load drifts hit every column alike). Each timed call follows an untimed
    call of the same column: right after oneDNN, OpenMP's spinning threads slow
    the next parallel region down (up to 2x on a loaded 2-core machine)."""
    best = {k: float("inf") for k in cols}
    for _ in range(repeats):
        for k, f in cols.items():
            f(*inputs[k])
            t0 = time.perf_counter()
            f(*inputs[k])
            best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    return best


def time_cuda(cols, inputs):
    import triton.testing
    return {k: triton.testing.do_bench(lambda f=f, a=inputs[k]: f(*a), return_mode="median")
            for k, f in cols.items()}  # the default is the mean (triton >= 3.x)


def bench_one(name, s, w, b, device, repeats):
    cols = columns(device)
    masks = ops.SpikeMasks.from_dense(s)
    inputs = {k: (masks if k.endswith(" masks") else s, w, b) for k in cols}
    if "cudnn bf16 cl" in inputs:
        cl = torch.channels_last
        inputs["cudnn bf16 cl"] = (s.bfloat16().to(memory_format=cl), w.bfloat16().to(
            memory_format=cl), b.bfloat16())
    ms = time_cpu(cols, inputs, repeats) if device == "cpu" else time_cuda(cols, inputs)
    ref = F.conv2d(s.double(), w.double(), b.double(), 1, 1)
    scale = ref.abs().max().item()
    err = 0.0
    for k in cols:
        if k in ("F.conv2d", "cudnn tf32", "cudnn bf16 cl"):
            continue
        err = max(err, (cols[k](*inputs[k]).double() - ref).abs().max().item() / scale)
    return dict(input=name, rate=s.float().mean().item(), occupancy=block_occupancy(s), ms=ms,
                err=err)


#: What --dncnn reads (not shipped: ../shared beside the checkout, DESIGN.md section 5).
DNCNN_FILES = (os.path.join(SHARED, "weights", "dncnn_s25_official.pt"),
               os.path.join(SHARED, "data", "set12"))


def dncnn_spike_maps(device, T=10, layers=(2, 9, 16)):
    """{layer: spikes [T * B, 64, 96, 96]} entering DnCNN conv `layer` (1-based)."""
    import numpy as np
    from spikingir.data import add_gaussian_noise, list_images, load_image
    sd = torch.load(DNCNN_FILES[0], map_location="cpu", weights_only=True)
    convs = []
    for i in range(17):
        w, bb = sd[f"dncnn.{2 * i}.weight"], sd[f"dncnn.{2 * i}.bias"]
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(bb)
        convs.append(conv.to(device))
    imgs = []
    for path in list_images(DNCNN_FILES[1]):
        clean = load_image(path, gray=True)
        h, w_ = clean.shape
        crop = clean[(h - 96) // 2:(h - 96) // 2 + 96, (w_ - 96) // 2:(w_ - 96) // 2 + 96]
        imgs.append(torch.from_numpy(np.asarray(add_gaussian_noise(crop, 25, seed=0),
                                                dtype=np.float32)))
    x = torch.stack(imgs)[:, None].to(device)
    with torch.no_grad():
        thetas, h = [], x
        for conv in convs[:16]:  # ANN: thresholds from the ReLU activations
            h = torch.relu(conv(h))
            thetas.append(torch.quantile(h.flatten()[::7].double(), 0.999).item())
        x = x[:2]  # two images, T steps each -> N = 2 T spike maps
        cur = convs[0](x).unsqueeze(0).expand(T, *convs[0](x).shape)
        maps = {}
        for i in range(16):
            s, _ = ops.if_multistep(cur.contiguous(), thetas[i], scale_output=False,
                                    backend="cpp" if device == "cpu" else "torch")
            if i + 2 in layers:
                maps[i + 2] = s.flatten(0, 1).contiguous()
            if i < 15:  # theta folded into the next layer: y = theta * s
                cur = (convs[i + 1](s.flatten(0, 1)) - convs[i + 1].bias[:, None, None]) * \
                    thetas[i] + convs[i + 1].bias[:, None, None]
                cur = cur.unflatten(0, (T, 2))
    return maps, convs


#: Launch configurations --triton-sweep times (overrides of the default, first row):
#: float spikes (DEFAULT_CONFIG) and SpikeMasks (MASKS_CONFIG).
#: ``b_kmajor``: K-major weight planes (kernels/spike_conv.quantize_weight), the
#: default since the H200 sweep of 2026-11-28; the N-major rows keep that comparison.
#: ``unpack32`` (masks): 32-bit unpacking, not yet timed.
SWEEP = {"float": [dict(), dict(b_kmajor=False), dict(b_kmajor=False, num_stages=3),
                   dict(tile=(8, 16), num_warps=4), dict(tile=(8, 32)), dict(num_stages=3),
                   dict(num_stages=4), dict(block_k=32), dict(tile=(16, 32)),
                   dict(block_n=32), dict(block_n=32, num_stages=3)],
         "masks": [dict(), dict(unpack32=True), dict(b_kmajor=False), dict(num_stages=3),
                   dict(unpack32=True, num_stages=3),
                   dict(block_k=32, tile=(8, 16), num_warps=4),  # the default until 2026-11-28
                   dict(block_k=32, tile=(8, 16), num_warps=4, unpack32=True),
                   dict(tile=(8, 16), num_warps=4), dict(tile=(8, 16), num_warps=4, unpack32=True),
                   dict(tile=(8, 32)), dict(block_n=32)]}


def triton_sweep(shape, w, b, g):
    """ms of the Triton forward under launch configurations (random 10 % spikes,
    the dense path that DENSE_RATE["triton"][0] = -1 selects), from float spikes and
    from SpikeMasks; the first row of each is the launcher's default."""
    import triton.testing
    from spikingir.kernels import spike_conv as K
    s = (torch.rand(*shape, generator=g) < 0.10).float().cuda()
    masks = ops.SpikeMasks.from_dense(s)
    run = {"float": lambda cfg: K.spike_conv2d_fwd_triton(s, w, b, 1, 1, -1.0, False, False,
                                                          config=cfg)[0],
           "masks": lambda cfg: K.spike_conv2d_fwd_masks_triton(
               masks.bits, masks.channels, w, b, 1, 1, -1.0, config=cfg)}
    base = {"float": K.DEFAULT_CONFIG, "masks": K.MASKS_CONFIG}
    ref = None
    lines = ["", "", f"Triton launch configurations, random {shape} at 10 % (ms, do_bench median):",
             "", "| input | config | ms | same result |", "|---|---|---|---|"]
    for kind, configs in SWEEP.items():
        for cfg in configs:
            full = K.launch_config(base[kind], cfg, shape[1])
            try:
                f = lambda: run[kind](cfg)  # noqa: E731
                out = f()
                ms = triton.testing.do_bench(f, return_mode="median")
                ref = out if ref is None else ref
                lines.append(f"| {kind} | {full} | {ms:.3f} | {bool(torch.equal(out, ref))} |")
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is a result too
                lines.append(f"| {kind} | {full} | failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:80]} | - |")
            print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def profile_calls(shape, rate, w, b, dev, g, calls=20):
    """Prints, per fused backend and input form, the host ms to issue one call (no
    synchronisation) and the ms until the result is ready: equal means the host
    (the launcher's torch ops, the launch itself) bounds the call, not the kernel;
    then the profiler's ops of ``calls`` calls, by self device (else CPU) time."""
    from torch.profiler import ProfilerActivity, profile
    s = (torch.rand(*shape, generator=g) < rate).float().to(dev)
    inputs = {"float": s, "masks": ops.SpikeMasks.from_dense(s)}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"{shape} at {rate:.0%}, {dev}: host ms to issue a call / ms until done, "
          f"mean of {calls}")
    for be in timed_backends(dev, "spike_conv2d"):
        for form, x in inputs.items():
            f = lambda: ops.spike_conv2d(x, w, b, 1, 1, validate=False, backend=be)  # noqa: E731
            with torch.no_grad():
                for _ in range(3):
                    f()
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    f()
                t1 = time.perf_counter()
                sync()
                t2 = time.perf_counter()
                with profile(activities=acts) as prof:
                    for _ in range(calls):
                        f()
                    sync()
            print(f"\n== {be} from {form}: host {(t1 - t0) / calls * 1e3:.3f} ms, "
                  f"done {(t2 - t0) / calls * 1e3:.3f} ms")
            print(prof.key_averages().table(sort_by=sort, row_limit=14))
    return 0


def bench_backward(name, s, w, device, repeats):
    """ms of the weight gradient alone (what training adds per spiking conv beyond
    the dense grad_s): the library's dense one (oneDNN / cuDNN fp32, TF32 on the GPU)
    against each fused backend's backward op from the bit-packed spikes (grad_s and
    grad_bias not asked for). ``triton dense``: the Triton backward's dense path
    (cuDNN of the unpacked spikes, dense_rate < 0, under torch's settings: TF32 by
    default); ``triton ieee``: its kernel with exact float32 FMAs instead of three
    TF32 passes."""
    from spikingir.ops.registry import fused_forward, fused_op
    from spikingir.ops.spike_conv import dense_rates
    N, _, H, W = s.shape
    go = torch.randn(N, w.shape[0], H, W, generator=torch.Generator().manual_seed(3)).to(device)

    def dense(tf32=False):
        def f():
            with cudnn_tf32(tf32):
                return torch.nn.grad.conv2d_weight(s, w.shape, go, 1, 1)
        return f

    cols = {"F.conv2d": dense()}
    if device == "cuda":
        cols["cudnn tf32"] = dense(True)
    for be in timed_backends(device, "spike_conv2d"):
        packed = fused_forward("spike_conv2d", be)(s, w, None, 1, 1, -1.0, False, True)[1]
        rates = [("", dense_rates(be, w.shape[1], w.shape[0])[1])]
        if be == "triton":
            rates.append((" dense", -1.0))
        for suffix, rate in rates:
            cols[be + suffix] = (lambda be, rate, packed: lambda: fused_op("spike_conv2d_bwd", be)(
                go, packed, w, H, W, 1, 1, rate, False, True, False)[1])(be, rate, packed)
        if be == "triton":  # the kernel with exact float32 FMAs instead of tf32x3
            from spikingir.kernels.spike_conv import spike_conv2d_grad_weight_triton
            cols["triton ieee"] = (lambda packed: lambda: spike_conv2d_grad_weight_triton(
                go, packed, w.shape, H, W, 1, 1, config=dict(precision="ieee")))(packed)
    inputs = {k: () for k in cols}
    ms = time_cpu(cols, inputs, repeats) if device == "cpu" else time_cuda(cols, inputs)
    ref = torch.nn.grad.conv2d_weight(s.double(), w.shape, go.double(), 1, 1)
    scale = ref.abs().max().item()
    err = max([(cols[k]().double() - ref).abs().max().item() / scale for k in cols
               if k not in ("F.conv2d", "cudnn tf32")] + [0.0])
    return dict(input=name, rate=s.float().mean().item(), occupancy=None, ms=ms, err=err)


def fmt_table(rows, cols):
    head = ["input", "rate", "occupancy"] + [f"{c} ms" for c in cols] + \
        [f"{c} x" for c in cols if c != "F.conv2d"] + ["max err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = r["ms"]["F.conv2d"]
        occ = "-" if r["occupancy"] is None else f"{r['occupancy']:.2f}"
        cells = [r["input"], f"{100 * r['rate']:.1f}%", occ]
        cells += [f"{r['ms'][c]:.3g}" for c in cols]
        cells += [f"{base / r['ms'][c]:.2f}" for c in cols if c != "F.conv2d"]
        cells.append(f"{r['err']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    cli = cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", type=cli._positive_int, nargs=4, default=None,
                   metavar=("N", "C", "H", "W"),
                   help="input shape (default 16 64 96 96 on CPU, 80 64 128 128 on CUDA)")
    p.add_argument("--rates", type=cli._unit_float, nargs="+", default=list(RATES),
                   help="firing rates of the random spike maps, in [0, 1]")
    p.add_argument("--threads", type=cli._positive_int, default=2)
    p.add_argument("--repeats", type=cli._positive_int, default=5)
    p.add_argument("--dncnn", action="store_true", help="add real DnCNN spike maps")
    p.add_argument("--triton-sweep", action="store_true",
                   help="GPU: also time Triton launch configurations at 10%% firing")
    p.add_argument("--backward", action="store_true",
                   help="also time the weight gradient (each backend's backward op against "
                        "the dense one), a second table")
    p.add_argument("--markdown-append", metavar="PATH")
    p.add_argument("--note", default="")
    p.add_argument("--once", type=cli._unit_float, default=None, metavar="RATE",
                   help="for a profiler (ncu): one call of each fused backend from SpikeMasks "
                        "at this firing rate, after one warm-up call, and no timing")
    p.add_argument("--profile", type=cli._unit_float, default=None, metavar="RATE",
                   help="where a call's time goes: for each fused backend, from float spikes "
                        "and from SpikeMasks at this firing rate, the host time to issue a "
                        "call against the time until its result is ready, and the torch "
                        "profiler's op table (no comparison table)")
    args = p.parse_args(argv)
    if cli.cuda_missing(args.device):
        p.error(cli.cuda_missing(args.device))
    if args.triton_sweep and args.device != "cuda":
        p.error("--triton-sweep times the Triton kernels on a GPU: it needs --device cuda")
    missing = [f for f in DNCNN_FILES if not os.path.exists(f)] if args.dncnn else []
    if missing:  # checked now, not after the random rows have been timed
        p.error(f"--dncnn reads {' and '.join(missing)} (the official DnCNN-S weights and "
                "Set12, not shipped with spikingir), which are missing")
    torch.set_num_threads(args.threads)
    dev = args.device
    shape = args.shape or ([16, 64, 96, 96] if dev == "cpu" else [80, 64, 128, 128])
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, shape[1], 3, 3, generator=g) / (shape[1] * 9) ** 0.5).to(dev)
    b = torch.randn(64, generator=g).to(dev)
    if args.profile is not None:
        return profile_calls(shape, args.profile, w, b, dev, g)
    if args.once is not None:
        masks = ops.SpikeMasks.from_dense((torch.rand(*shape, generator=g) < args.once).float().to(dev))
        for be in timed_backends(dev, "spike_conv2d_masks"):
            with torch.no_grad():
                for _ in range(2):  # the warm-up compiles / the profiler's second launch
                    ops.spike_conv2d(masks, w, b, 1, 1, validate=False, backend=be)
            print(f"ran {be} from masks twice, {shape} at {args.once:.0%}", file=sys.stderr)
        return 0
    rows = []
    for rate in args.rates:
        s = (torch.rand(*shape, generator=g) < rate).float().to(dev)
        rows.append(bench_one(f"random {shape}", s, w, b, dev, args.repeats))
        print(fmt_table(rows[-1:], list(rows[-1]["ms"])).splitlines()[-1], file=sys.stderr)
    if args.dncnn:
        maps, convs = dncnn_spike_maps(dev)
        for layer, s in maps.items():
            conv = convs[layer - 1]
            rows.append(bench_one(f"DnCNN conv{layer} {list(s.shape)}", s, conv.weight.detach(),
                                  conv.bias.detach(), dev, args.repeats))
            print(fmt_table(rows[-1:], list(rows[-1]["ms"])).splitlines()[-1], file=sys.stderr)
    back = []
    if args.backward:
        inputs = [(f"random {shape}", (torch.rand(*shape, generator=g) < rate).float().to(dev), w)
                  for rate in args.rates]
        if args.dncnn:
            inputs += [(f"DnCNN conv{layer} {list(s.shape)}", s, convs[layer - 1].weight.detach())
                       for layer, s in maps.items()]
        try:  # never lose the forward table to the backward one
            for name, s, wl in inputs:
                back.append(bench_backward(name, s, wl, dev, args.repeats))
                print(fmt_table(back[-1:], list(back[-1]["ms"])).splitlines()[-1], file=sys.stderr)
        except Exception as exc:  # noqa: BLE001
            print(f"backward benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    sweep = ""
    if args.triton_sweep and dev == "cuda":
        try:  # never lose the main table to the sweep
            sweep = triton_sweep(shape, w, b, g)
        except Exception as exc:  # noqa: BLE001
            sweep = f"\n\nTriton sweep failed: {type(exc).__name__}: {exc}"
    env = environment(dev, args.threads, command(__file__, argv))
    header = markdown_header(env)
    if dev == "cpu":
        # Other processes skew the ratios (oneDNN slows down more than the event
        # kernel on a busy 2-core machine: 2.7-3.7x under load vs 1.6-2.2x quiet).
        load = os.getloadavg()[0]
        busy = load > args.threads + 0.5
        header += f", load average {load:.1f}" + (" — BUSY MACHINE: ratios unreliable" if busy else "")
    table = fmt_table(rows, list(rows[0]["ms"]))
    if back:
        table += ("\n\nWeight gradient alone (backward ops from the packed spikes; x = the "
                  "dense fp32 weight gradient's ms / column ms):\n\n"
                  + fmt_table(back, list(back[0]["ms"])))
    table += sweep
    print(header)
    print(command_note(env))
    print(table)
    if args.markdown_append:
        note = f"\n{args.note}\n" if args.note else ""
        note += f"\n`{command_note(env)}`\n"
        with open(args.markdown_append, "a") as f:
            f.write(f"\n## spike_conv2d (`benchmarks/bench_spike_conv.py`) — {header}\n{note}\n"
                    "Forward only, 64 -> 64 3x3, stride 1, padding 1, bias; ms = min over "
                    f"{args.repeats} interleaved repeats (each after an untimed call of the "
                    "same column); x = F.conv2d ms / column ms; "
                    "occupancy = non-empty (8x16 tile, tap, 32-channel) blocks; "
                    "`cpp` runs with validate=False (as behind a neuron), `cpp+validate` "
                    "with the binary check.\n\n" + table + "\n")
        print(f"appended to {args.markdown_append}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
