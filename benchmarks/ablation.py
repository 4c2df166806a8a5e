"""Conversion ablation (DESIGN.md section 5): IF vs MPRN, v0, recycling,
per-layer vs per-channel thresholds, DC offsets (AOD-Net), before/after
fine-tuning, over T.

    python benchmarks/ablation.py --ann-weights ../shared/weights/dncnn_s25_official.pt \
        [--finetuned [LABEL=]SNN.pt ...] [--crop 96] [--limit 12] [--T 2 4 5 8 10 15] [--markdown-append PATH]
    python benchmarks/ablation.py --task dehaze [--finetuned [LABEL=]SNN.pt ...] [--T ...]

Denoising: Set12 center crops, noise by the DnCNN protocol (sigma 25);
thresholds calibrated on 8 Train400 images; cells: PSNR (loss). Dehazing: the
shipped AOD-Net on the held-out SOTS scenes (full images), calibrated on 8 hazy
training images; cells: PSNR / SSIM / SNN-to-ANN energy. A script, not a test.
"""
import datetime
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def main(argv=None):
    from spikingir.convert import to_snn
    from spikingir.metrics import psnr
    from spikingir.pipeline import calibration_inputs, denoise_samples, load_ann

    from spikingir.bench.neuron import cli_module
    cli = cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--task", choices=("denoise", "dehaze"), default="denoise")
    p.add_argument("--ann-weights", default=None,
                   help="default: the official DnCNN-S s25 (denoise), the shipped AOD-Net (dehaze)")
    p.add_argument("--finetuned", nargs="+", default=[], metavar="[LABEL=]PATH",
                   help="fine-tuned SNNs of the same ANN (spikingir finetune), each a row")
    p.add_argument("--data", default=None, help="default: Set12 (denoise), SOTS (dehaze)")
    p.add_argument("--calib", default=None, help="default: Train400 (denoise), SOTS (dehaze)")
    p.add_argument("--sigma", type=float, default=25)
    p.add_argument("--crop", type=cli._positive_int, default=None, help="center crops (default 96 denoise, none dehaze)")
    p.add_argument("--limit", type=cli._positive_int, default=None, help="first N images (default 12 denoise, all dehaze)")
    p.add_argument("--T", type=cli._positive_int, nargs="+", default=[2, 4, 5, 8, 10, 15])
    p.add_argument("--threads", type=cli._positive_int, default=None)
    p.add_argument("--markdown-append", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "dehaze":
        return _dehaze(args)
    args.crop, args.limit = args.crop or 96, args.limit or 12
    args.ann_weights = args.ann_weights or os.path.join(SHARED, "weights", "dncnn_s25_official.pt")
    samples = denoise_samples(args.sigma, args.data or os.path.join(SHARED, "data", "set12"),
                              args.limit, args.crop)
    ann = load_ann("denoise", args.sigma, args.ann_weights)
    calib = calibration_inputs("denoise", args.sigma,
                               data=args.calib or os.path.join(SHARED, "data", "train400"))

    def mean_psnr(model):
        with torch.no_grad():
            return float(np.mean([psnr(s.clean, model(s.inputs)[0, 0].numpy()) for s in samples]))

    t0 = time.time()
    ann_psnr = mean_psnr(ann)
    configs = [
        ("IF, v0=0, p99.9 per layer (plain conversion)", dict(neuron="if", v0="zero", recycling=False)),
        ("IF, v0=theta/2", dict(neuron="if", v0="half", recycling=False)),
        ("IF, v0=theta/2, recycling", dict(neuron="if", v0="half")),
        ("MPRN, v0=theta/2, recycling", dict(neuron="mprn", v0="half")),
        ("MPRN, v0=theta/2, no recycling", dict(neuron="mprn", v0="half", recycling=False)),
        ("MPRN, v0=theta/2, recycling, per-channel", dict(neuron="mprn", v0="half", per_channel=True)),
    ]
    rows = []
    for name, kw in configs:
        snn = to_snn(ann, calib, max(args.T), **kw)
        rows.append((name, [_at(snn, T, mean_psnr) for T in args.T]))
        print(f"{name}: " + ", ".join(f"T={T} {v:.2f}" for T, v in zip(args.T, rows[-1][1])), flush=True)
    for name, snn in _finetuned(args.finetuned):
        rows.append((name, [_at(snn, T, mean_psnr) for T in args.T]))
        print(f"{rows[-1][0]}: " + ", ".join(f"T={T} {v:.2f}" for T, v in zip(args.T, rows[-1][1])))
    table = [f"ANN PSNR {ann_psnr:.2f} dB ({os.path.basename(args.ann_weights)}, sigma {args.sigma:g}, "
             f"{len(samples)} Set12 center crops {args.crop}x{args.crop}); cells: SNN PSNR (loss)", "",
             "| configuration | " + " | ".join(f"T={T}" for T in args.T) + " |",
             "|---|" + "---:|" * len(args.T)]
    for name, vals in rows:
        table.append(f"| {name} | " + " | ".join(f"{v:.2f} ({ann_psnr - v:.2f})" for v in vals) + " |")
    _report("\n".join(table), t0, args)
    return 0


def _finetuned(items):
    """``--finetuned [LABEL=]PATH`` items as (row name, loaded SNN)."""
    from spikingir.pipeline import load_snn
    out = []
    for item in items:
        label, _, path = item.rpartition("=")
        snn = load_snn(path)
        out.append((f"fine-tuned{': ' + label if label else ''} ({os.path.basename(path)}, "
                    f"T={snn.timesteps})", snn))
    return out


def _report(text, t0, args):
    print(text)
    print(f"({time.time() - t0:.0f} s)")
    if args.markdown_append:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown_append, "a") as f:
            f.write(f"\n## Conversion ablation (`benchmarks/ablation.py --task {args.task}`), CPU, "
                    f"commit {commit}, {date}\n\n" + text + "\n")


def _dehaze(args):
    """The AOD-Net rows: PSNR / SSIM / energy ratio per configuration and T."""
    from spikingir.convert import to_snn
    from spikingir.evaluate import evaluate
    from spikingir.pipeline import calibration_inputs, dehaze_samples, load_ann
    from spikingir.data import DehazePairs
    from spikingir.train import held_out_scenes

    data = args.data or os.path.join(SHARED, "data", "sots_train")
    scenes = held_out_scenes(DehazePairs(data))
    samples = dehaze_samples(data, args.limit, args.crop, scenes)
    ann = load_ann("dehaze", None, args.ann_weights)
    calib = calibration_inputs("dehaze", None, data=args.calib or data)
    t0 = time.time()
    common = dict(per_channel=True, v0="half")
    configs = [
        ("IF, v0=0, per layer, no offsets (plain conversion)",
         dict(neuron="if", v0="zero", recycling=False, offset_percentile=None)),
        ("MPRN, recycling, no offsets (the earlier default)", dict(neuron="mprn", offset_percentile=None, **common)),
        ("MPRN, no recycling, no offsets", dict(neuron="mprn", recycling=False, offset_percentile=None, **common)),
        ("MPRN, recycling, offsets p1", dict(neuron="mprn", offset_percentile=1.0, **common)),
        ("IF, no recycling, offsets p1", dict(neuron="if", recycling=False, offset_percentile=1.0, **common)),
        ("MPRN, no recycling, offsets p1 (the shipped SNN's conversion)",
         dict(neuron="mprn", recycling=False, offset_percentile=1.0, **common)),
    ]
    runs = [(name, to_snn(ann, calib, max(args.T), **kw)) for name, kw in configs]
    runs += _finetuned(args.finetuned)
    ann_row = None
    table = []
    for name, snn in runs:
        rep = evaluate("dehaze", ann, snn, samples, args.T, None, None)
        ann_row = rep["ann"]
        cells = [f"{r['psnr']:.2f} / {r['ssim']:.4f} / {r['energy_mj'] / ann_row['energy_mj']:.3f}"
                 for r in rep["snn"]]
        table.append(f"| {name} | " + " | ".join(cells) + " |")
        print(table[-1], flush=True)
    head = [f"ANN {ann_row['psnr']:.2f} dB / SSIM {ann_row['ssim']:.4f} (AOD-Net, {len(samples)} held-out "
            f"images, scenes {' '.join(map(str, scenes))} of {data}); cells: SNN PSNR / SSIM / energy "
            "SNN/ANN", "", "| configuration | " + " | ".join(f"T={T}" for T in args.T) + " |",
            "|---|" + "---:|" * len(args.T)]
    _report("\n".join(head + table), t0, args)
    return 0


def _at(snn, T, measure):
    snn.timesteps = T
    return measure(snn)


if __name__ == "__main__":
    sys.exit(main())
