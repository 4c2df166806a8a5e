"""Your own CNN through the method: a denoiser that is not DnCNN (an
nn.Sequential conv chain with mixed kernels, BatchNorm and a 1x1 layer, in
spikingir.models.Residual), trained here on Train400, converted with to_snn
(thresholds only, then with the layer calibration) and evaluated against its
ANN on Set12 full images: PSNR, SSIM, loss, energy per T; with
--finetune-steps N the layer-calibrated SNN is then fine-tuned (surrogate
gradients, T=5 and 10, distilled from the ANN) and evaluated again.

    python benchmarks/convert_chain.py [--steps 1500] [--width 48] [--T 4 10]
        [--threads 1] [--amp] [--json OUT.json] [--save-ann ANN.pt]
        [--ann ANN.pt (skip training)] [--finetune-steps N [--only-finetuned]]

A script, not a test; needs ../shared/data (train400, set12).
"""
import json
import os
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def chain_denoiser(width=48, middle=6):
    """5x5 in, ``middle`` 3x3 conv-BN-ReLU blocks, a 1x1 mix, 3x3 out; x - body(x)."""
    from spikingir.models import Residual
    layers = [nn.Conv2d(1, width, 5, padding=2), nn.ReLU(inplace=True)]
    for _ in range(middle):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, 1, 3, padding=1)]
    return Residual(nn.Sequential(*layers))


def main(argv=None):
    from spikingir.convert import to_snn
    from spikingir.data import DnCNNPatches, noisy
    from spikingir.evaluate import evaluate
    from spikingir.finetune import finetune_snn
    from spikingir.pipeline import calibration_inputs, denoise_samples
    from spikingir.train import denoise_validator, fit

    from spikingir.bench.neuron import cli_module
    cli = cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--data", default=os.path.join(SHARED, "data", "train400"))
    p.add_argument("--val-data", default=os.path.join(SHARED, "data", "set12"))
    p.add_argument("--sigma", type=float, default=25)
    p.add_argument("--steps", type=cli._positive_int, default=1500)
    p.add_argument("--batch-size", type=cli._positive_int, default=32)
    p.add_argument("--width", type=cli._positive_int, default=48)
    p.add_argument("--T", type=cli._positive_int, nargs="+", default=[4, 10])
    p.add_argument("--threads", type=cli._positive_int, default=1)
    p.add_argument("--amp", action="store_true", help="train the ANN in bf16 autocast")
    p.add_argument("--limit", type=cli._positive_int, default=None, help="evaluate on the first N images")
    p.add_argument("--json", default=None)
    p.add_argument("--save-ann", default=None, help="write the trained ANN's state dict here")
    p.add_argument("--ann", default=None, help="a state dict of this chain: skip the training")
    p.add_argument("--finetune-steps", type=cli._nonneg_int, default=0)
    p.add_argument("--only-finetuned", action="store_true",
                   help="with --finetune-steps: skip the rows before fine-tuning")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ann = chain_denoiser(args.width)
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
                  progress=False, amp=args.amp)
        train_s = time.time() - t0
        print(f"trained {args.steps} steps of batch {args.batch_size} in {train_s:.0f} s; "
              f"last validation {res.last_val}")
    ann.eval()
    if args.save_ann:
        torch.save(ann.state_dict(), args.save_ann)

    calib = calibration_inputs("denoise", args.sigma, data=args.data)
    samples = denoise_samples(args.sigma, args.val_data, limit=args.limit)
    rows = {}
    # (row name, to_snn's layer_calibration, fine-tuning steps)
    variants = [("thresholds only", None, 0), ("layer calibration", "weights", 0)]
    if args.finetune_steps:
        tuned = (f"layer calibration + {args.finetune_steps} fine-tuning steps", "weights",
                 args.finetune_steps)
        variants = [tuned] if args.only_finetuned else variants + [tuned]
    for name, layers, steps in variants:
        t0 = time.time()
        snn = to_snn(ann, calib, max(args.T), per_channel=True, v0="half", layer_calibration=layers)
        if steps:
            finetune_snn(snn, "denoise", sigma=args.sigma, data=args.data, val_data=args.val_data,
                         steps=steps, batch_size=8, timesteps=[5, 10], amp=args.amp,
                         teacher=ann, distill=1.0, val_every=max(1, steps // 2),
                         log_every=max(1, steps // 10), progress=False)
            snn.timesteps = max(args.T)
            snn.eval()
        conv_s = time.time() - t0
        rep = evaluate("denoise", ann, snn, samples, args.T, sigma=args.sigma)
        rows[name] = {"convert_s": conv_s, "report": rep}
        a = rep["ann"]
        print(f"\n{name} ({conv_s:.0f} s): ANN {a['psnr']:.2f} dB / {a['ssim']:.4f}")
        for r in rep["snn"]:
            print(f"  T={r['timesteps']}: {r['psnr']:.2f} dB / {r['ssim']:.4f} (loss "
                  f"{r['psnr_loss']:.2f}), energy {r['energy_mj'] / a['energy_mj']:.3f} of the ANN, "
                  f"firing {r['firing_rate']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "train_s": train_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
