"""Conversion ablation on DnCNN (DESIGN.md section 5): IF vs MPRN, v0, recycling,
per-layer vs per-channel thresholds, before/after fine-tuning, over T.

    python benchmarks/ablation.py --ann-weights ../shared/weights/dncnn_s25_official.pt \
        [--finetuned [LABEL=]SNN.pt ...] [--crop 96] [--limit 12] [--T 2 4 5 8 10 15] [--markdown-append PATH]

Set12 center crops, noise by the DnCNN protocol (sigma 25); thresholds
calibrated on 8 Train400 images. Prints PSNR and PSNR loss for each
configuration and T. A script, not a test.
"""
import argparse
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
    from spikingir.pipeline import calibration_inputs, denoise_samples, load_ann, load_snn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ann-weights", default=os.path.join(SHARED, "weights", "dncnn_s25_official.pt"))
    p.add_argument("--finetuned", nargs="+", default=[], metavar="[LABEL=]PATH",
                   help="fine-tuned SNNs of the same ANN (spikingir finetune), each a row")
    p.add_argument("--data", default=os.path.join(SHARED, "data", "set12"))
    p.add_argument("--calib", default=os.path.join(SHARED, "data", "train400"))
    p.add_argument("--sigma", type=float, default=25)
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--T", type=int, nargs="+", default=[2, 4, 5, 8, 10, 15])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--markdown-append", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = denoise_samples(args.sigma, args.data, args.limit, args.crop)
    ann = load_ann("denoise", args.sigma, args.ann_weights)
    calib = calibration_inputs("denoise", args.sigma, data=args.calib)

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
    for item in args.finetuned:
        label, _, path = item.rpartition("=")
        snn = load_snn(path)
        rows.append((f"fine-tuned{': ' + label if label else ''} ({os.path.basename(path)}, "
                     f"T={snn.timesteps})", [_at(snn, T, mean_psnr) for T in args.T]))
        print(f"{rows[-1][0]}: " + ", ".join(f"T={T} {v:.2f}" for T, v in zip(args.T, rows[-1][1])))
    table = [f"ANN PSNR {ann_psnr:.2f} dB ({os.path.basename(args.ann_weights)}, sigma {args.sigma:g}, "
             f"{len(samples)} Set12 center crops {args.crop}x{args.crop}); cells: SNN PSNR (loss)", "",
             "| configuration | " + " | ".join(f"T={T}" for T in args.T) + " |",
             "|---|" + "---:|" * len(args.T)]
    for name, vals in rows:
        table.append(f"| {name} | " + " | ".join(f"{v:.2f} ({ann_psnr - v:.2f})" for v in vals) + " |")
    text = "\n".join(table)
    print(text)
    print(f"({time.time() - t0:.0f} s)")
    if args.markdown_append:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown_append, "a") as f:
            f.write(f"\n## Conversion ablation (`benchmarks/ablation.py`), CPU, commit {commit}, {date}\n\n"
                    + text + "\n")
    return 0


def _at(snn, T, measure):
    snn.timesteps = T
    return measure(snn)


if __name__ == "__main__":
    sys.exit(main())
