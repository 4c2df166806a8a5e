"""Your own CNN with skip connections through the method: a small residual-block
denoiser (EDSR-style blocks ``h + conv(ReLU(conv(h)))``, written as a plain
nn.Module with functional ReLUs, and a global skip ``x - body(x)``), trained
here on Train400, converted with to_snn's graph path (torch.fx;
spikingir.models.graph) and evaluated against its ANN on Set12 crops: PSNR,
SSIM, loss and the SNN/ANN energy ratio per T. With --layer-calibration M, the
per-channel conversion is also calibrated layer by layer
(spikingir.convert.calibrate_layers, method M) at each T and evaluated at that
T (its wall time printed); with --finetune-steps N, the SNN calibrated at the
largest T is then fine-tuned N steps (surrogate gradients at the T given,
distilled from the ANN) and evaluated again.

    python benchmarks/convert_graph.py [--steps 400] [--width 32] [--blocks 3] [--T 4 10]
        [--threads 1] [--limit 4] [--crop 128] [--json OUT.json]
        [--save-ann ANN.pt] [--ann ANN.pt (skip training)]
        [--layer-calibration {bias,weights} [--finetune-steps N]]

A script, not a test; needs ../shared/data (train400, set12).
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


class ResBlockDenoiser(nn.Module):
    """3x3 head, ``blocks`` residual blocks (conv-ReLU-conv added to their input,
    then ReLU), 3x3 tail; output ``x - tail(h)`` (the noise is predicted)."""

    def __init__(self, width=32, blocks=3):
        super().__init__()
        self.head = nn.Conv2d(1, width, 3, padding=1)
        self.a = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks))
        self.b = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(blocks))
        self.tail = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.head(x))
        for a, b in zip(self.a, self.b):
            h = F.relu(h + b(F.relu(a(h))))
        return x - self.tail(h)


def _print_row(name, rep, seconds):
    a = rep["ann"]
    print(f"\n{name} ({seconds}): ANN {a['psnr']:.2f} dB / {a['ssim']:.4f}")
    for r in rep["snn"]:
        print(f"  T={r['timesteps']}: {r['psnr']:.2f} dB / {r['ssim']:.4f} (loss "
              f"{r['psnr_loss']:.2f}), energy {r['energy_mj'] / a['energy_mj']:.3f} of the ANN, "
              f"firing {r['firing_rate']:.3f}")


def main(argv=None):
    from spikingir.convert import calibrate_layers, to_snn
    from spikingir.finetune import finetune_snn
    from spikingir.data import DnCNNPatches, noisy
    from spikingir.evaluate import evaluate
    from spikingir.pipeline import calibration_inputs, denoise_samples
    from spikingir.train import denoise_validator, fit

    from spikingir.bench.neuron import cli_module
    cli = cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--data", default=os.path.join(SHARED, "data", "train400"))
    p.add_argument("--val-data", default=os.path.join(SHARED, "data", "set12"))
    p.add_argument("--sigma", type=float, default=25)
    p.add_argument("--steps", type=cli._positive_int, default=400)
    p.add_argument("--batch-size", type=cli._positive_int, default=16)
    p.add_argument("--width", type=cli._positive_int, default=32)
    p.add_argument("--blocks", type=cli._positive_int, default=3)
    p.add_argument("--T", type=cli._positive_int, nargs="+", default=[4, 10])
    p.add_argument("--threads", type=cli._positive_int, default=1)
    p.add_argument("--limit", type=cli._positive_int, default=4,
                   help="evaluate on the first N images")
    p.add_argument("--crop", type=cli._positive_int, default=128,
                   help="centre crops of this side")
    p.add_argument("--json", default=None)
    p.add_argument("--save-ann", default=None, help="write the trained ANN's state dict here")
    p.add_argument("--ann", default=None, help="a state dict of this network: skip the training")
    p.add_argument("--layer-calibration", choices=["bias", "weights"], default=None,
                   help="add rows calibrated layer by layer with this method, one per T")
    p.add_argument("--finetune-steps", type=cli._nonneg_int, default=0,
                   help="with --layer-calibration: fine-tune the SNN calibrated at the largest T")
    args = p.parse_args(argv)
    if args.finetune_steps and not args.layer_calibration:
        p.error("--finetune-steps needs --layer-calibration (it starts from the calibrated SNN)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ann = ResBlockDenoiser(args.width, args.blocks)
    train_s = 0.0
    if args.ann:
        ann.load_state_dict(torch.load(args.ann, weights_only=True))
    else:
        loader = torch.utils.data.DataLoader(DnCNNPatches(args.data), batch_size=args.batch_size,
                                             shuffle=True, drop_last=True)
        t0 = time.time()
        res = fit(ann, loader, lambda b, dev: (noisy(b.to(dev), args.sigma), b.to(dev)),
                  denoise_validator(args.val_data, args.sigma, crop=64), steps=args.steps, lr=1e-3,
                  val_every=max(1, args.steps // 3), log_every=max(1, args.steps // 10),
                  progress=False)
        train_s = time.time() - t0
        print(f"trained {args.steps} steps of batch {args.batch_size} in {train_s:.0f} s; "
              f"last validation {res.last_val}")
    ann.eval()
    if args.save_ann:
        torch.save(ann.state_dict(), args.save_ann)

    calib = calibration_inputs("denoise", args.sigma, data=args.data)
    samples = denoise_samples(args.sigma, args.val_data, limit=args.limit, crop=args.crop)
    rows = {}
    # (row name, to_snn options): the plain conversion, and the options the
    # `spikingir convert` command uses (per-channel thresholds, v0 = theta / 2)
    for name, kw in (("plain (per layer, v0 0)", {}),
                     ("per channel, v0 theta/2", dict(per_channel=True, v0="half"))):
        t0 = time.time()
        snn = to_snn(ann, calib, max(args.T), **kw)
        conv_s = time.time() - t0
        t0 = time.time()
        rep = evaluate("denoise", ann, snn, samples, args.T, sigma=args.sigma)
        eval_s = time.time() - t0
        rows[name] = {"convert_s": conv_s, "eval_s": eval_s, "report": rep}
        _print_row(name, rep, f"convert {conv_s:.1f} s, evaluate {eval_s:.0f} s")
    snn = None
    for T in args.T if args.layer_calibration else []:  # calibrated at the T it runs at
        name = f"per channel, v0 theta/2, layer calibration ({args.layer_calibration}) at T={T}"
        t0 = time.time()
        snn = to_snn(ann, calib, T, per_channel=True, v0="half")
        conv_s = time.time() - t0
        t0 = time.time()
        calibrate_layers(snn, ann, calib, method=args.layer_calibration)
        calib_s = time.time() - t0
        rep = evaluate("denoise", ann, snn, samples, [T], sigma=args.sigma)
        rows[name] = {"convert_s": conv_s, "calibrate_s": calib_s, "report": rep,
                      "calibrated_layers": snn.meta["calibrated_layers"]}
        _print_row(name, rep, f"convert {conv_s:.1f} s, calibrate {calib_s:.1f} s")
    if args.finetune_steps:  # from the SNN calibrated at the largest T
        name = f"{name} + {args.finetune_steps} fine-tuning steps"
        t0 = time.time()
        finetune_snn(snn, "denoise", sigma=args.sigma, data=args.data, val_data=args.val_data,
                     steps=args.finetune_steps, batch_size=8, timesteps=args.T, teacher=ann,
                     distill=1.0, val_every=args.finetune_steps,
                     log_every=max(1, args.finetune_steps // 10), progress=False)
        tune_s = time.time() - t0
        snn.timesteps = max(args.T)
        rep = evaluate("denoise", ann, snn.eval(), samples, args.T, sigma=args.sigma)
        rows[name] = {"finetune_s": tune_s, "report": rep}
        _print_row(name, rep, f"fine-tune {tune_s:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "train_s": train_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
