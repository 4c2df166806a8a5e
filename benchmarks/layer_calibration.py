"""Layer-wise calibration after conversion (spikingir.convert.calibrate_layers):
PSNR loss of a converted DnCNN SNN before and after it, on Set12 centre crops.

    python benchmarks/layer_calibration.py [--ann-weights ../shared/weights/dncnn_s25_official.pt]
        [--method weights|bias] [--per-layer] [--percentile 99.9] [--floor 0.3] [--ridge 1e-3]
        [--T 10]

Thresholds calibrated on 8 noisy Train400 crops (as `spikingir convert`), the
layers calibrated on the same crops at --T; PSNR at T and T/2. With
``--mapper-probe SNN.pt`` it measures instead what a closed-form refit of a
fine-tuned SNN's pixel mapper gains: the mapper set to the ridge least-squares
fit of ``noisy - clean`` from its input rates on --probe-images Train400 crops at
each of --probe-T (benchmarks/RESULTS.md; `spikingir refit-mapper` writes such a
file). A script, not a test.
"""
import os
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def main(argv=None):
    from spikingir.convert import calibrate_layers, to_snn
    from spikingir.metrics import psnr
    from spikingir.pipeline import calibration_inputs, denoise_samples, load_ann, load_snn

    from spikingir.bench.neuron import cli_module
    cli = cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--ann-weights", default=os.path.join(SHARED, "weights", "dncnn_s25_official.pt"))
    p.add_argument("--sigma", type=float, default=25)
    p.add_argument("--method", choices=("weights", "bias"), default="weights")
    p.add_argument("--per-layer", action="store_true", help="one threshold per layer")
    p.add_argument("--percentile", type=float, default=99.9, help="to_snn's threshold percentile")
    p.add_argument("--floor", type=float, default=0.3, help="calibrate_layers' target_floor")
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--T", type=cli._positive_int, default=10)
    p.add_argument("--crop", type=cli._positive_int, default=96)
    p.add_argument("--mapper-probe", default=None, metavar="SNN.pt")
    p.add_argument("--probe-images", type=cli._positive_int, default=48)
    p.add_argument("--probe-T", type=cli._positive_int, nargs="+", default=[5, 10])
    p.add_argument("--threads", type=cli._positive_int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    samples = denoise_samples(args.sigma, os.path.join(SHARED, "data", "set12"), 12, args.crop)

    def mean_psnr(model, T):
        model.timesteps = T
        with torch.no_grad():
            return float(np.mean([psnr(s.clean, model(s.inputs)[0, 0].numpy()) for s in samples]))

    if args.mapper_probe:
        snn = load_snn(args.mapper_probe).eval()
        before = [mean_psnr(snn, T) for T in (10, 5)]
        _refit_mapper(snn, args)
        after = [mean_psnr(snn, T) for T in (10, 5)]
        print(f"{args.mapper_probe}: T=10 {before[0]:.3f} -> {after[0]:.3f}, "
              f"T=5 {before[1]:.3f} -> {after[1]:.3f} dB")
        return 0
    ann = load_ann("denoise", args.sigma, args.ann_weights)
    calib = calibration_inputs("denoise", args.sigma, data=os.path.join(SHARED, "data", "train400"))
    ann_psnr = float(np.mean([psnr(s.clean, ann(s.inputs)[0, 0].detach().numpy()) for s in samples]))
    snn = to_snn(ann, calib, args.T, per_channel=not args.per_layer, v0="half",
                 percentile=args.percentile)
    plain = [mean_psnr(snn, T) for T in (args.T, max(1, args.T // 2))]
    snn.timesteps = args.T
    t0 = time.time()
    calibrate_layers(snn, ann, calib, method=args.method, ridge=args.ridge, target_floor=args.floor)
    took = time.time() - t0
    cal = [mean_psnr(snn, T) for T in (args.T, max(1, args.T // 2))]
    print(f"ANN {ann_psnr:.3f} dB; {args.method}, p{args.percentile:g}, floor {args.floor:g}, "
          f"ridge {args.ridge:g}, "
          f"{'per-layer' if args.per_layer else 'per-channel'}: loss at T={args.T} "
          f"{ann_psnr - plain[0]:.3f} -> {ann_psnr - cal[0]:.3f} dB, at T={max(1, args.T // 2)} "
          f"{ann_psnr - plain[1]:.3f} -> {ann_psnr - cal[1]:.3f}; calibration {took:.0f} s")
    return 0


def _refit_mapper(snn, args):
    from spikingir.finetune import refit_mapper
    from spikingir.pipeline import denoise_pairs

    noisy, clean = denoise_pairs(args.sigma, os.path.join(SHARED, "data", "train400"), args.probe_images)
    refit_mapper(snn, noisy, clean, args.probe_T)


if __name__ == "__main__":
    raise SystemExit(main())
