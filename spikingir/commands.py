"""Restoration commands of the ``spikingir`` CLI: evaluate, restore, finetune, demo.

Errors a user can cause (missing or unreadable files, an RGB image for a
grayscale model or a gray one for a colour model, unknown sigma, T < 1, a
checkpoint of another model, an empty or mismatched data folder) print one line
on stderr and exit with status 2; outputs are written only after everything
succeeded, each atomically.
"""
import argparse
import os
import sys
import time

from spikingir.cli import (_kept, _nonneg_float, _nonneg_int, _number_in, _positive_int,
                           _unit_float, check_distinct, check_output_folder, check_outputs)
from spikingir.tiling import DEFAULT_TILE


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def _guard(func):
    def run(args):
        try:
            return func(args)
        except (UserError, FileNotFoundError, NotADirectoryError, ValueError, OSError) as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"spikingir {args.command}: error: {msg}", file=sys.stderr)
            return 2
        except FloatingPointError as err:  # training diverged: not bad input, no traceback
            print(f"spikingir {args.command}: {err}; try lower learning rates", file=sys.stderr)
            return 1
    return run


def _offset_percentile(text):
    """--offset-percentile: auto, none, or a percentile in [0, 100)."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    return _number_in(text, float, 0.0, "auto, none or a percentile in [0, 100)", maximum=100.0,
                      open_maximum=True)


#: Smallest --tile: each tile also computes the receptive radius around it (17
#: pixels for DnCNN), so tiny tiles multiply the work (a 4-pixel tile: ~100x).
MIN_TILE = 64


def _tile_size(text):
    """--tile: 0 (the whole image at once) or a tile size >= MIN_TILE."""
    value = _nonneg_int(text)
    if 0 < value < MIN_TILE:
        raise argparse.ArgumentTypeError(f"expected 0 or a tile size >= {MIN_TILE}, got {value}")
    return value


def _percentile(text):
    """--percentile: the threshold percentile, in (0, 100]."""
    return _number_in(text, float, 0.0, "a percentile in (0, 100]", maximum=100.0, open_minimum=True)


def _sigma_of(args):
    from spikingir.pipeline import check_sigma
    if args.task != "denoise":
        if getattr(args, "sigma", None) is not None:  # as train-ann: not silently ignored
            raise UserError("--sigma applies to --task denoise only")
        return None
    if args.sigma is None:
        raise UserError("--sigma is required for --task denoise (15, 25 or 50)")
    sigma = check_sigma(args.sigma)
    ann = getattr(args, "ann_weights", None)
    if ann is not None:  # the metadata train-ann writes next to its weights
        import json
        from pathlib import Path
        side = Path(ann).with_suffix(".json")
        try:
            trained = json.loads(side.read_text()).get("sigma") if side.is_file() else None
        except (OSError, ValueError, AttributeError):
            trained = None
        _note_sigma(args, ann, trained, sigma, "trained")
    return sigma


def _note_sigma(args, path, trained, sigma, verb):
    """A note on stderr when the weights at ``path`` were ``verb`` (trained,
    fine-tuned) at another noise level than the ``sigma`` they are used at."""
    if sigma is not None and isinstance(trained, (int, float)) and float(trained) != sigma:
        print(f"spikingir {args.command}: note: {path} was {verb} at sigma {trained:g}, "
              f"used here at sigma {sigma:g}", file=sys.stderr)


def _note_snn_source(args, path, snn, sigma, ann, consequence):
    """Notes on stderr about the SNN file at ``path``: fine-tuned at another sigma
    than ``sigma``; converted from another ANN than ``ann`` (``consequence``: what
    that means for this command); or, for a user's file (--snn-weights), recording
    no source ANN, so that the check could not be made. ``ann`` None: no ANN check."""
    from spikingir.pipeline import ann_fingerprint
    _note_sigma(args, path, snn.meta.get("sigma"), sigma, "fine-tuned")
    if ann is None:
        return
    source = snn.meta.get("ann_fingerprint")
    compared = getattr(args, "ann_weights", None) or "the shipped ANN"
    if source is not None and source != ann_fingerprint(ann):
        print(f"spikingir {args.command}: note: {path} was converted from another ANN than "
              f"{compared}: {consequence}", file=sys.stderr)
    elif source is None and getattr(args, "snn_weights", None):
        # a user's file without the record (the shipped pairs are documented in
        # spikingir/weights/README.md): say the check could not be made
        print(f"spikingir {args.command}: note: {path} does not record the ANN it was "
              f"converted from (files written by `spikingir convert` and `finetune` do): "
              f"cannot check that it is a conversion of {compared}", file=sys.stderr)


def _device(args):
    """--device as a torch.device (argparse allowed cpu or cuda), or a one-line
    error when there is no GPU; called first, before any work."""
    import torch

    from spikingir.cli import cuda_missing
    if cuda_missing(args.device):
        raise UserError(cuda_missing(args.device))
    return torch.device(args.device)


def _add_model_args(p, snn_weights=True):
    """--task, --sigma and the weights files, shared by evaluate/restore/finetune."""
    p.add_argument("--task", choices=["denoise", "dehaze"], required=True,
                   help="denoise (DnCNN: the shipped ones grayscale; a model of yours of 3 "
                        "input channels takes RGB images) or dehaze (AOD-Net, RGB)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise level (denoise): 15, 25 or 50 (restore: estimated from the image "
                        "when omitted, and the nearest model used)")
    p.add_argument("--ann-weights", default=None, help="ANN state dict (default: the shipped one)")
    p.add_argument("--ann-module", default=None, metavar="FILE.py:FUNCTION",
                   help="your own network: FUNCTION() in FILE.py returns it (an nn.Sequential "
                        "conv chain, optionally in spikingir.models.Residual, or any CNN to_snn "
                        "converts through torch.fx: skips, concatenations, average pooling, "
                        "nearest upsampling) and --ann-weights is loaded into it (runs that "
                        "file's code)")
    if snn_weights:
        p.add_argument("--snn-weights", default=None,
                       help="SNN file from `spikingir convert` or `finetune` (default: the shipped "
                            "fine-tuned SNN of the shipped ANN; a conversion of the ANN instead "
                            "with --ann-weights or any conversion option, e.g. --neuron if, "
                            "calibrated on the built-in photos; `spikingir convert` calibrates "
                            "on training images)")


def _layer_calibration(args):
    """--layer-calibration as to_snn's argument (None for none; auto: weights for
    denoising, with a DnCNN, a conv chain or another CNN of the graph conversion,
    none for dehazing); bias or weights refused for dehazing."""
    if args.layer_calibration == "auto":
        return "weights" if args.task == "denoise" else None
    if args.layer_calibration == "none":
        return None
    if args.task != "denoise":
        raise UserError("--layer-calibration: for denoising (DnCNN) only; a converted AOD-Net "
                        "already matches its ANN")
    return args.layer_calibration


def _convert(ann, calib, timesteps, args, layers=True):
    """to_snn with the conversion options; ``layers=False`` skips --layer-calibration
    (a resumed fine-tuning run: its checkpoint replaces every weight)."""
    from spikingir.convert import to_snn
    return to_snn(ann, calib, timesteps, neuron=args.neuron, percentile=args.percentile,
                  per_channel=not args.per_layer, v0=args.v0, recycling=not args.no_recycling,
                  backend=args.backend, offset_percentile=args.offset_percentile,
                  layer_calibration=_layer_calibration(args) if layers else None)


def _warn_amp(args, device):
    """The one-line warning for --amp on a CPU that emulates bf16 (inference)."""
    from spikingir.train import amp_hint
    note = amp_hint(device, args.amp, training=False)
    if note:
        print(note, file=sys.stderr, flush=True)


def _add_amp_arg(p, what):
    p.add_argument("--amp", action="store_true",
                   help=f"run {what} in bf16 mixed precision (autocast, channels-last): on an "
                        "H100 the DnCNN SNN ran 2.9x faster than the exact default at the same "
                        "PSNR; not bit-exact; slower on CPUs without AVX512-BF16/AMX")


def _add_step_chunk_arg(p):
    p.add_argument("--step-chunk", type=_positive_int, default=None, metavar="N",
                   help="run each SNN layer's T steps in chunks of N (its conv's currents N "
                        "steps at a time; the spikes handed on stay 1-bit masks): memory hardly "
                        "grows with T (the DnCNN SNN at 1000x1000, T=10: 1.2 GiB with N=1, 3.2 "
                        "all at once). The same output: bit for bit for the "
                        "denoising SNNs on the CPU, up to float32 rounding otherwise (default: "
                        "all T at once)")


def _add_colour_arg(p, what):
    p.add_argument("--colour", "--color", choices=["per-channel"], default=None, dest="colour",
                   help=f"per-channel: {what}. Default: a grayscale model refuses an RGB image "
                        "(a colour model, of 3 input channels, takes it as it is). Alpha is "
                        "dropped; a 16-bit colour PNG is read at 8 bits (Pillow's limit)")


def _colour_of(args):
    """--colour, refused for dehazing (AOD-Net takes RGB as it is), before any work."""
    if args.colour and args.task != "denoise":
        raise UserError(f"--colour {args.colour} applies to --task denoise only: the dehazing "
                        "model (AOD-Net) restores RGB images as they are")
    return args.colour


def _denoise_channels(args, *nets):
    """The image channels of the denoising model, read from the networks before any
    image is (and before a conversion): 1 (grayscale: an RGB image needs --colour
    per-channel) or 3 (a colour model: RGB images as they are, --colour refused).
    ``nets``: (name, network) pairs that must agree, e.g. the --snn-weights SNN and
    the ANN it is compared with; network None: a shipped one (grayscale). Another
    count, or networks that disagree, are one-line errors. None for dehazing
    (AOD-Net takes RGB images, a gray one replicated)."""
    from spikingir.pipeline import input_channels
    if args.task != "denoise":
        return None
    counts = []
    for name, net in nets:
        # None: no conv reads the image directly; the task's (gray), as --ann-module's probe
        channels = 1 if net is None else input_channels(net) or 1
        if channels not in (1, 3):
            raise UserError(f"{name}: a denoising model of {channels} input channels; images "
                            "have 1 (gray) or 3 (RGB)")
        counts.append((name, channels))
    (first, channels), *rest = counts
    for name, other in rest:
        if other != channels:
            raise UserError(f"{first} takes {channels} image channel(s), {name} {other} (pass "
                            f"{_own_ann_options(nets[0][1])} with the SNN's own ANN)")
    colour = getattr(args, "colour", None)
    if colour and channels != 1:
        raise UserError(f"--colour {colour} runs a grayscale model on each RGB channel; this "
                        f"one takes {channels} channels (a colour model: RGB images go in as "
                        "they are, without --colour)")
    return channels


def _own_ann_options(snn):
    """The options that give ``snn``'s own ANN, for hints: --ann-weights, after the
    --ann-module that its file records (a network of the user's: its weights alone
    are no DnCNN checkpoint)."""
    module = getattr(snn, "meta", None) and snn.meta.get("ann_module")
    return f"--ann-module {module} --ann-weights" if module else "--ann-weights"


def _ann_name(args):
    """How messages name the ANN: its file, or the shipped one."""
    return args.ann_weights or "the shipped ANN"


def _calib_channels(task, ann):
    """The image channels to calibrate ``ann``'s conversion on: a denoising model's
    own (1 where no conv reads the image); 1 for dehazing (its inputs are RGB anyway)."""
    from spikingir.pipeline import input_channels
    return (input_channels(ann) or 1) if task == "denoise" else 1


def _add_conversion_args(p):
    p.add_argument("--neuron", choices=["mprn", "if"], default=CONVERSION_DEFAULTS["neuron"],
                   help="spiking neuron: mprn (membrane potential reuse, default) or if")
    p.add_argument("--percentile", type=_percentile, default=CONVERSION_DEFAULTS["percentile"],
                   help="thresholds: this percentile of each channel's (layer's) ReLU activations "
                        "on the calibration images (default 99.9). Lower values trade energy for "
                        "PSNR: with the weights calibration, 99 measured -0.19 dB loss at T=10 for "
                        "+0.12 of the ANN's energy (official DnCNN s25, Set12), behind 99.9 with "
                        "more timesteps at equal energy")
    p.add_argument("--per-layer", action="store_true",
                   help="one threshold per layer (default: per channel; measured on DnCNN s25, "
                        "T=10: per-channel loses 3.14 dB before fine-tuning, per-layer 4.44)")
    p.add_argument("--v0", choices=["half", "zero"], default=CONVERSION_DEFAULTS["v0"],
                   help="initial membrane potential (default half: theta/2)")
    p.add_argument("--no-recycling", action="store_true",
                   help="read out without membrane-potential recycling (the residual potential term)")
    p.add_argument("--offset-percentile", type=_offset_percentile,
                   default=CONVERSION_DEFAULTS["offset_percentile"], metavar="Q",
                   help="AOD-Net: code each channel less its DC offset, the Q-th percentile of its "
                        "activations; auto (default): 1 for AOD-Net, none for DnCNN. Measured "
                        "before fine-tuning at T=10: 17.65 -> 18.69 dB, SSIM 0.709 -> 0.803, "
                        "energy 1.09 -> 0.77 of the ANN")
    p.add_argument("--layer-calibration", choices=["auto", "none", "bias", "weights"],
                   default=CONVERSION_DEFAULTS["layer_calibration"],
                   help="DnCNN: after conversion, calibrate layer by layer on the calibration "
                        "images so each spiking layer reproduces its ANN activation: bias "
                        "(per-channel bias correction) or weights (least-squares weights, then "
                        "bias; spikingir.convert.calibrate_layers); auto (default): weights for "
                        "denoising (DnCNN, conv chains, networks with skips from --ann-module), "
                        "none for AOD-Net. Measured on the official s25 weights, T=10, "
                        "Set12 crops (before the read-out clamp of 2026-11-29): loss 3.17 dB "
                        "converted, 1.47 with weights (81 s on 2 "
                        "cores); after 147 fine-tuning steps 1.56 from none, 1.14 from weights")
    p.add_argument("--backend", default="auto",
                   help="backend of the neurons and of spike_conv2d (auto, cpp, cuda, triton, torch)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")


#: The conversion options' defaults (_add_conversion_args): any other value asks for
#: a conversion, so the shipped fine-tuned SNN is not used in its place.
CONVERSION_DEFAULTS = {"neuron": "mprn", "percentile": 99.9, "per_layer": False, "v0": "half",
                       "no_recycling": False, "offset_percentile": "auto",
                       "layer_calibration": "auto"}


def _conversion_options_given(args):
    """The conversion options (as ``--name``) set to other values than their defaults."""
    return ["--" + name.replace("_", "-") for name, default in CONVERSION_DEFAULTS.items()
            if getattr(args, name, default) != default]


def _load_converted(path, task, args):
    """An SNN file (``--snn-weights`` or the shipped one): it is converted already, so
    of the conversion options only --no-recycling applies (recycling can be
    dropped); the others given are named as ignored."""
    from spikingir.pipeline import load_snn
    snn = load_snn(path, backend=args.backend, task=task)
    if args.no_recycling:
        snn.recycling = False
    ignored = [o for o in _conversion_options_given(args) if o != "--no-recycling"]
    if ignored:
        print(f"spikingir {args.command}: note: {', '.join(ignored)} ignored: {path} is an SNN "
              "converted already", file=sys.stderr)
    return snn


def _get_snn(task, sigma, ann, timesteps, args, ann_given, loaded=None):
    """``--snn-weights`` (``loaded``: that file, loaded already); else the shipped
    fine-tuned SNN when it applies (the shipped ANN and no conversion option
    given); else a fresh conversion of ``ann`` with the conversion options."""
    from spikingir.pipeline import calibration_inputs, for_inference
    from spikingir.weights import SNN_FILES, WEIGHTS_DIR

    path = getattr(args, "snn_weights", None)
    if path is None and not ann_given and not _conversion_options_given(args):
        name = SNN_FILES.get((task, sigma))
        if name and (WEIGHTS_DIR / name).exists():
            path = WEIGHTS_DIR / name
    if path is not None:
        snn = loaded if loaded is not None else _load_converted(path, task, args)
        _note_snn_source(args, path, snn, sigma, ann, "the PSNR loss and conversion rate compare "
                         f"different networks (pass {_own_ann_options(snn)} with the SNN's own "
                         "ANN)")
        snn.timesteps = timesteps
        origin = f"SNN weights {path}"
    else:
        calib = calibration_inputs(task, sigma, channels=_calib_channels(task, ann))
        snn = _convert(ann, calib, timesteps, args)
        method = _layer_calibration(args)
        layers = "" if method is None else f", layer calibration: {method}"
        origin = (f"converted ANN ({args.neuron}, p{args.percentile:g}, v0={args.v0}{layers}, "
                  f"calibrated on {len(calib)} built-in images, not fine-tuned)")
    snn.step_chunk = getattr(args, "step_chunk", None)  # restore and evaluate's --step-chunk
    return for_inference(snn, args.backend), origin


def _set_threads(args):
    import torch
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


# ------------------------------------------------------------------ evaluate

def _cmd_evaluate(args):
    from spikingir.atomic import atomic_paths
    from spikingir.evaluate import evaluate, markdown_table, report_json, write_figures
    from spikingir.pipeline import dehaze_samples, denoise_samples, load_ann

    device = _device(args)
    _set_threads(args)
    _warn_amp(args, device)
    sigma = _sigma_of(args)
    colour = _colour_of(args)
    if args.task == "denoise" and args.scenes is not None:  # as train-ann's --val-scenes
        raise UserError("--scenes applies to --task dehaze only")
    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None:  # before the evaluation, which can take long
            check_outputs(path, option=option)
    if args.figures is not None:
        check_output_folder(args.figures, "--figures")
    check_distinct(("--json", args.json), ("--markdown", args.markdown), ("--figures", args.figures))
    # the networks before the images: a colour model takes them in RGB
    ann = load_ann(args.task, sigma, args.ann_weights, args.ann_module)
    loaded = _load_converted(args.snn_weights, args.task, args) if args.snn_weights else None
    channels = _denoise_channels(args, *([(args.snn_weights, loaded)] if loaded else []),
                                 (_ann_name(args), ann))
    if args.task == "denoise":
        samples = denoise_samples(sigma, args.data, args.limit, args.crop, colour, channels)
    else:
        samples = dehaze_samples(args.data, args.limit, args.crop, args.scenes)
    if args.figures is not None:  # one figure per image name
        names = [s.name for s in samples]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise UserError(f"two images are named {dup} (other extensions): their --figures "
                            "would overwrite each other")
    snn, origin = _get_snn(args.task, sigma, ann, max(args.timesteps), args,
                           args.ann_weights is not None, loaded)
    # in colour per channel: the inputs are batches of the three channels
    in_colour = sum(s.inputs.shape[0] > 1 for s in samples)
    shown = (f" ({in_colour} in colour, each channel on its own)" if colour else
             " (in RGB: a colour model)" if channels == 3 else "")
    print(f"# {args.task}: {len(samples)} images{shown}; SNN: {origin}", flush=True)
    outputs = {} if args.figures else None
    report = evaluate(args.task, ann, snn, samples, args.timesteps, sigma, outputs, device=device,
                      amp=args.amp)
    if colour:
        report.update(colour=colour, colour_images=in_colour)
    table = markdown_table(report)
    print(table)
    # All outputs or none: the report files are renamed into place only after the
    # figures (the writer most likely to fail) are.
    texts = [(p, t) for p, t in ((args.json, report_json(report) if args.json else None),
                                 (args.markdown, table)) if p]
    with atomic_paths(*[p for p, _ in texts]) as temps:
        for tmp, (_, text) in zip(temps, texts):
            with open(tmp, "w") as f:
                f.write(text)
        if args.figures:
            write_figures(args.figures, report, samples, outputs,
                          "noisy" if args.task == "denoise" else "hazy")
    return 0


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="ANN vs SNN: PSNR/SSIM, conversion rate, firing, energy",
                       description="Evaluates the ANN and its SNN at each T. By default the shipped "
                                   "weights and the built-in images.")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="image folder (denoise) or hazy/ + gt/ folder (dehaze)")
    p.add_argument("--scenes", nargs="+", default=None, help="dehaze: scene ids to evaluate")
    p.add_argument("--timesteps", type=_positive_int, nargs="+", default=[5, 10],
                   help="the T to evaluate the SNN at (default 5 10)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N images only")
    p.add_argument("--crop", type=_positive_int, default=None, help="center crops of N x N pixels")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="write the paper-style table (Markdown)")
    p.add_argument("--figures", default=None, help="folder for side-by-side PNGs and PSNR-vs-T")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda")
    _add_colour_arg(p, "evaluate RGB images in RGB, the grayscale model denoising each channel "
                       "on its own (the three as one batch): noise sigma/255 x randn(H, W, 3) at "
                       "numpy seed 0, PSNR over all the channels' pixels, SSIM the channels' "
                       "mean, the energy the whole image's; gray images stay gray")
    _add_step_chunk_arg(p)
    _add_amp_arg(p, "both networks")
    _add_conversion_args(p)
    p.set_defaults(func=_guard(_cmd_evaluate))


# ------------------------------------------------------------------ restore

def _restore_jobs(inputs, output):
    """(input, output, PIL format) triples: one file to the file ``output``, or several files
    and/or folders (their images) into the folder ``output`` under their own
    names. Checked before any work: inputs exist, output names are distinct and
    writable image types (and, in ``_cmd_restore``, that every input reads as an
    image the task takes). Each output is written whole (atomically) once its image
    is done."""
    from pathlib import Path

    from spikingir.data import list_images

    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += list_images(path)
        elif not path.exists():
            raise UserError(f"no such image file: {name}")
        else:
            files.append(path)
    # "-o out/" names a folder even before it exists
    to_folder = (len(inputs) > 1 or Path(inputs[0]).is_dir() or os.path.isdir(output)
                 or output.endswith(("/", os.sep)))
    outs = [Path(output) / f.name for f in files] if to_folder else [Path(output)]
    if len(set(outs)) < len(outs):
        dup = next(o for o in outs if outs.count(o) > 1)
        raise UserError(f"two inputs would both be written to {dup} (same file name)")
    if to_folder:
        check_output_folder(output, "-o")
    else:
        check_outputs(output, option="-o")
    return [(f, o, _image_format(str(o))) for f, o in zip(files, outs)]


def _cmd_restore(args):
    import io

    from PIL import Image

    from spikingir.data import _header, estimate_noise_sigma, is_16bit_gray, load_image
    from spikingir.atomic import write_atomic
    from spikingir.metrics import to_uint8, to_uint16
    from spikingir.pipeline import GRAY_FOR_RGB, RGB_FOR_GRAY, load_ann, nearest_sigma, restore

    device = _device(args)
    _set_threads(args)
    _warn_amp(args, device)
    blind = args.task == "denoise" and args.sigma is None
    sigma = None if blind else _sigma_of(args)
    colour = _colour_of(args)
    jobs = _restore_jobs(args.images, args.output)  # before any work
    # The network before the images, once: a colour model takes RGB ones. A file
    # (--snn-weights, --ann-weights, --ann-module) serves every noise level; the
    # shipped models (one per level, loaded below) are grayscale.
    loaded = _load_converted(args.snn_weights, args.task, args) if args.snn_weights else None
    own_ann = (load_ann(args.task, sigma, args.ann_weights, args.ann_module)
               if not args.snn_weights and (args.ann_weights or args.ann_module) else None)
    channels = _denoise_channels(args, (args.snn_weights, loaded) if loaded else
                                 (_ann_name(args), own_ann))
    untiled = _untileable(loaded if loaded is not None else own_ann)

    def read(src):
        img = load_image(src)
        if channels == 1 and img.ndim == 3 and not colour:
            raise UserError(f"{src}: {RGB_FOR_GRAY}")
        if channels == 3 and img.ndim == 2:
            raise UserError(f"{src}: {GRAY_FOR_RGB}")
        if untiled and 0 < args.tile < max(img.shape[:2]):  # restore's ValueError, in CLI terms
            raise UserError(f"{src}: a {img.shape[0]}x{img.shape[1]} image is larger than --tile "
                            f"{args.tile}, and this network cannot run in tiles ({untiled}): "
                            "pass --tile 0 to restore it whole (--step-chunk 1 bounds the memory)")
        if blind and min(img.shape[:2]) < 2:
            raise UserError(f"{src}: a {img.shape[0]}x{img.shape[1]} image is too small to "
                            "estimate its noise level; pass --sigma")
        return img

    if len(jobs) > 1:  # a bad file anywhere in the list stops the run before any output
        for src, _, _ in jobs:
            read(src)
    # the output folder is made by the first write: a failure before it leaves nothing
    nets = {}  # one network per noise level
    for src, dst, fmt in jobs:
        img = read(src)
        if _header(src)[0] in ("RGBA", "RGBa", "LA", "La", "PA"):  # load_image drops alpha
            print(f"spikingir restore: note: {src}: its alpha channel is dropped (the output "
                  "has none)", file=sys.stderr)
        level = sigma
        if blind:  # no --sigma: the shipped model nearest to the image's estimated noise
            estimate = estimate_noise_sigma(img)
            level = nearest_sigma(estimate)
            # with --snn-weights that file runs whatever the estimate (_get_snn notes a
            # sigma it was not fine-tuned at); else the nearest shipped model
            chosen = "" if args.snn_weights else f": the sigma {level} model (--sigma chooses)"
            print(f"{src}: estimated noise sigma {estimate:.1f}{chosen}")
        if level not in nets:
            ann = own_ann if own_ann is not None or args.snn_weights else load_ann(args.task, level)
            snn, origin = _get_snn(args.task, level, ann, args.timesteps, args,
                                   args.ann_weights is not None, loaded)
            nets[level] = snn.to(device), origin
        snn, origin = nets[level]
        # gray -> RGB for AOD-Net; --colour per-channel: an RGB image's channels as 3 gray ones
        out = restore(img, snn, tile=args.tile, amp=args.amp, colour=colour)
        if out.ndim == 3 and out.shape[2] != 3:  # an own network (--ann-module) of other width
            raise UserError(f"the network returns {out.shape[2]} channels; restore writes images "
                            "of 1 (gray) or 3 (RGB)")
        # a 16-bit gray input keeps its 16 bits where the format can hold them
        deep = out.ndim == 2 and fmt in ("PNG", "TIFF") and is_16bit_gray(src)
        buf = io.BytesIO()
        Image.fromarray(to_uint16(out) if deep else to_uint8(out)).save(buf, format=fmt)
        write_atomic(dst, buf.getvalue())
        how = ", each RGB channel on its own" if colour and img.ndim == 3 else ""
        print(f"wrote {dst} ({args.task}{how}, T={args.timesteps}; {origin})")
    return 0


def _untileable(net):
    """Why ``net`` (an SNN, a user's ANN, or None: a shipped DnCNN) cannot restore an
    image in tiles, or None: it changes scale inside (pooling, upsampling, a transposed
    or strided conv), so it has no receptive radius (spikingir.tiling.receptive_radius)
    and restore refuses to tile it. A user's ANN of the graph conversion is read
    through its traced form, where functional pooling shows."""
    from spikingir.convert import _graph_net, _is_chain
    from spikingir.models import AODNet
    from spikingir.models.spiking import SpikingAODNet, SpikingChain
    from spikingir.tiling import receptive_radius
    if net is None:
        return None
    if not isinstance(net, (AODNet, SpikingChain, SpikingAODNet)) and not _is_chain(net) and \
            not hasattr(net, "program"):  # an ANN to_snn reads through torch.fx
        net = _graph_net(net)
    try:
        receptive_radius(net)
    except ValueError:
        return "it changes scale inside: pooling, upsampling, a transposed or strided conv"
    return None


def _image_format(path):
    """PIL's format name for writing ``path``, from its extension (none: PNG);
    a UserError for an extension PIL cannot write."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return "PNG"
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{path}: cannot write images of type {ext!r} (use .png, .jpg, .bmp or .tif)")
    return fmt


def _add_restore(sub):
    p = sub.add_parser("restore", help="restore images with the SNN",
                       description="Denoises or dehazes each IMAGE with the spiking network.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image file(s), or folders of images")
    p.add_argument("-o", "--output", required=True,
                   help="output image file; a folder for several inputs or a folder input "
                        "(each image keeps its name); 8-bit, or 16-bit when a 16-bit gray input "
                        "is denoised into a PNG or TIFF (dehazing writes 8-bit RGB)")
    _add_model_args(p)
    p.add_argument("--timesteps", type=_positive_int, default=10, help="T (default 10)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda")
    p.add_argument("--tile", type=_tile_size, default=DEFAULT_TILE,
                   help=f"restore in tiles of N x N pixels (plus the network's receptive radius "
                        f"around each, so the result is the whole image's: for the denoising SNN "
                        f"on the CPU bit for bit, otherwise up to float32 rounding) to bound memory: the "
                        f"DnCNN SNN holds ~3 GB per megapixel per layer at T=10 (default "
                        f"{DEFAULT_TILE}; 0: the whole image at once)")
    _add_colour_arg(p, "denoise an RGB image into an 8-bit RGB image, the grayscale model on "
                       "each channel on its own (the three as one batch: 3x the memory of a gray "
                       "image; --tile bounds it)")
    _add_step_chunk_arg(p)
    _add_amp_arg(p, "the SNN")
    _add_conversion_args(p)
    p.set_defaults(func=_guard(_cmd_restore))


# ------------------------------------------------------------------ convert

def _data_dir(args, name):
    """--data, else the default folder ``name`` of ../shared/data (None when absent);
    a --data that is not a directory is a UserError."""
    from spikingir.train import default_data_dir
    data = args.data or default_data_dir(name)
    if data is not None and not os.path.isdir(data):
        raise UserError(f"--data: no such directory: {data}")
    return data


def _convert_ann(args, sigma, timesteps, ann=None, layers=True):
    """The ANN (``ann`` when the caller loaded it already, else --ann-weights or the
    shipped one) converted with the conversion options, its thresholds calibrated
    on 8 degraded images of --data (default the task's training data in
    ../shared/data, else built-in photos). Returns the SNN (its ``meta`` holds
    the ANN's fingerprint) and where the calibration images came from."""
    from spikingir.pipeline import calibration_inputs, load_ann

    _layer_calibration(args)  # refused before any loading
    if ann is None:
        ann = load_ann(args.task, sigma, args.ann_weights, args.ann_module)
    _denoise_channels(args, (_ann_name(args), ann))  # 1 or 3
    calib_dir = _data_dir(args, "train400" if args.task == "denoise" else "sots_train")
    calib = calibration_inputs(args.task, sigma, data=calib_dir,
                               channels=_calib_channels(args.task, ann))
    source = f"{len(calib)} images of {calib_dir}" if calib_dir else f"{len(calib)} built-in photos"
    return _convert(ann, calib, timesteps, args, layers), source


def _cmd_convert(args):
    from spikingir.pipeline import save_snn

    _set_threads(args)
    sigma = _sigma_of(args)
    check_outputs(args.out)
    snn, source = _convert_ann(args, sigma, args.timesteps)
    method = _layer_calibration(args)
    meta = {"task": args.task, "sigma": sigma, "steps": 0, "timesteps": args.timesteps,
            "init": "conversion", "ann": str(args.ann_weights or "shipped"),
            "ann_module": args.ann_module,
            "ann_fingerprint": snn.meta["ann_fingerprint"], "calibration": source,
            "percentile": args.percentile, "offset_percentile": args.offset_percentile,
            "layer_calibration": method}
    if "calibrated_layers" in snn.meta:  # a graph SNN: what each conv got (calibrate_layers)
        meta["calibrated_layers"] = snn.meta["calibrated_layers"]
    save_snn(snn.eval(), args.out, meta)
    kind = "per-layer" if args.per_layer else "per-channel"
    layers = "" if method is None else f" and layer calibration ({method})"
    print(f"wrote {args.out}: {args.neuron.upper()} SNN, T={args.timesteps}, {kind} thresholds "
          f"(p{args.percentile:g}){layers}, calibrated on {source}, not fine-tuned")
    return 0


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert an ANN into an SNN file (no fine-tuning)",
                       description="Folds BN, calibrates the thresholds, swaps the ReLUs for fused "
                                   "neurons and writes the SNN, which `spikingir evaluate`, `restore` "
                                   "and `finetune` take with --snn-weights.")
    _add_model_args(p, snn_weights=False)
    p.add_argument("--timesteps", type=_positive_int, default=10, help="T (default 10; evaluate and "
                   "restore can run the file at another T)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="calibration data: denoise, a folder of clean images (8 are taken, noise "
                        "added); dehaze, a paired hazy/gt folder (8 hazy images of its training "
                        "scenes). Default: ../shared/data's training set when present, else "
                        "built-in photos")
    p.add_argument("--out", required=True, help="where to write the SNN")
    _add_conversion_args(p)
    p.set_defaults(func=_guard(_cmd_convert))


# ------------------------------------------------------------------ finetune

def _cmd_finetune(args):
    import torch

    from spikingir.finetune import DEFAULT_PATCH, finetune_snn, timesteps_record
    from spikingir.models import conv_chain
    from spikingir.models.graph import SpikingGraph, graph_net
    from spikingir.pipeline import load_ann, save_snn

    device = _device(args)
    _set_threads(args)
    sigma = _sigma_of(args)
    if args.task == "dehaze" and args.val_crop is not None:  # as train-ann: not silently ignored
        raise UserError("--val-crop applies to --task denoise only")
    if args.resume and args.checkpoint is None:
        raise UserError("--resume needs --checkpoint PATH (the run to continue)")
    if args.energy_target > 0 and args.energy_weight == 0:  # before the conversion's minutes
        raise UserError("--energy-target is a budget for the energy term: it needs --energy-weight > 0")
    calibration = _layer_calibration(args)  # refuses a dehazing one before any ANN loads
    check_outputs(args.out, args.checkpoint, args.resume)
    check_distinct(("--out", args.out), ("--checkpoint", args.checkpoint))
    ann = (load_ann(args.task, sigma, args.ann_weights, args.ann_module)
           if args.distill > 0 or not args.snn_weights else None)
    teacher = ann if args.distill > 0 else None
    if args.snn_weights:  # continue from a fine-tuned SNN: no conversion
        snn = _load_converted(args.snn_weights, args.task, args)  # finetune_snn sets its T
        if teacher is not None:  # the teacher takes the SNN's inputs
            _denoise_channels(args, (args.snn_weights, snn), (_ann_name(args), teacher))
        _note_snn_source(args, args.snn_weights, snn, sigma, teacher,
                         "--distill trains it towards the latter")
    else:
        # the teacher, when distilling, is this same ANN (to_snn converts a copy of it);
        # resuming, the checkpoint replaces every weight: no layer calibration to redo
        resuming = args.resume and os.path.exists(args.checkpoint)
        snn, _ = _convert_ann(args, sigma, max(args.timesteps), ann=ann, layers=not resuming)
        if args.freeze_mapper and calibration == "weights" and not resuming:
            # layer calibration refits the mapper too; the ablation keeps the ANN's output conv
            # (a graph SNN's read-out convs: the ANN's, by node name)
            if isinstance(snn, SpikingGraph):
                ann_layers, mapper = graph_net(ann).layers, {id(m) for m in snn.mapper}
                for name, conv in snn.layers.items():
                    if id(conv) in mapper:
                        conv.load_state_dict(ann_layers[name].state_dict())
            else:
                snn.mapper.conv.load_state_dict(conv_chain(ann).convs()[-1].state_dict())
    fingerprint = snn.meta.get("ann_fingerprint")  # the ANN it came from, when recorded
    source_module = snn.meta.get("ann_module")
    t0 = time.time()
    try:
        res = finetune_snn(snn, args.task, sigma=sigma, data=args.data, val_data=args.val_data,
                           steps=args.steps, batch_size=args.batch_size, patch=args.patch_size,
                           lr_weights=args.lr_weights,
                           lr_neurons=args.lr_neurons, device=device, seed=args.seed,
                           checkpoint=args.checkpoint, resume=args.resume,
                           **({} if args.val_crop is None else {"val_crop": args.val_crop}),
                           time_limit=args.time_limit, train_mapper=not args.freeze_mapper,
                           energy_weight=args.energy_weight, energy_target=args.energy_target,
                           amp=args.amp, val_every=args.val_every,
                           warmup=args.warmup, timesteps=args.timesteps, ssim_weight=args.ssim_weight,
                           teacher=teacher, distill=args.distill, log_every=args.log_every,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"spikingir finetune: interrupted; {_kept(args.checkpoint)}", file=sys.stderr)
        return 130
    snn = snn.cpu()
    meta = {"task": args.task, "sigma": sigma, "steps": res.step, "batch_size": args.batch_size,
            "patch_size": args.patch_size or DEFAULT_PATCH[args.task],
            "timesteps": timesteps_record(args.timesteps), "device": args.device,
            "train_mapper": not args.freeze_mapper, "energy_weight": args.energy_weight,
            "energy_target": args.energy_target,
            "ssim_weight": args.ssim_weight, "recycling": snn.recycling, "amp": args.amp,
            "distill": args.distill,
            "warmup": args.warmup, "init": str(args.snn_weights or "conversion"),
            "layer_calibration": None if args.snn_weights else calibration,
            # a continued SNN keeps the record of the network it was converted from
            "ann_fingerprint": fingerprint, "ann_module": args.ann_module or source_module,
            "wall_s": round(time.time() - t0, 1), "torch": str(torch.__version__)}
    if res.history:
        last = res.history[-1]  # the last validation (a time limit may stop the run after it)
        meta.update({f"val_{k}": v for k, v in last.items() if isinstance(v, (int, float, str))})
    save_snn(snn, args.out, meta)
    print(f"wrote {args.out} (fine-tuned {res.step} steps)")
    return 0


def _add_finetune(sub):
    p = sub.add_parser("finetune", help="convert an ANN and fine-tune the SNN with surrogate gradients",
                       description="Converts the ANN (shipped or --ann-weights), then trains thresholds, "
                                   "beta, mapper and weights through the fused neuron ops (BPTT).")
    _add_model_args(p, snn_weights=False)
    p.add_argument("--snn-weights", default=None,
                   help="start from this fine-tuned SNN (from `spikingir finetune`) instead of "
                        "converting the ANN; the conversion options are then ignored, except "
                        "--no-recycling, which turns the SNN's recycling off")
    p.add_argument("--timesteps", type=_positive_int, nargs="+", default=[10],
                   help="T to train at (default 10); several, e.g. `5 10`: each batch at one of "
                        "them drawn at random, for one SNN good at each; the SNN keeps the largest")
    p.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default 200; "
                   "the learning rates follow a cosine over them)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="patches per step (default 8)")
    p.add_argument("--patch-size", type=_positive_int, default=None, metavar="N",
                   help="training patches of N x N pixels (default: denoise 40, the DnCNN "
                        "patches; dehaze 160)")
    p.add_argument("--lr-weights", type=_nonneg_float, default=2e-5,
                   help="Adam learning rate of the conv weights and the mapper (default 2e-5)")
    p.add_argument("--lr-neurons", type=_nonneg_float, default=1e-3,
                   help="Adam learning rate of the thresholds and beta (default 1e-3)")
    p.add_argument("--data", default=None, help="training data (default ../shared/data/...)")
    p.add_argument("--val-data", default=None, help="validation images (default ../shared/data/set12; "
                   "dehaze: held-out scenes of --data)")
    p.add_argument("--val-crop", type=_positive_int, default=None, metavar="N",
                   help="denoise: validate on N x N centre crops (default 64; dehaze validates "
                        "on the whole held-out images)")
    p.add_argument("--val-every", type=_positive_int, default=None, metavar="STEPS",
                   help="validate (and checkpoint) every STEPS steps (default: at the end)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seeds the patches, the noise and the T drawn")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="resumable training checkpoint, written at each validation (default: none)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists "
                   "(without it, an existing checkpoint is refused rather than overwritten)")
    p.add_argument("--time-limit", type=_nonneg_float, default=None, metavar="SECONDS",
                   help="stop after this long, write the SNN and the checkpoint (--resume continues)")
    p.add_argument("--out", required=True, help="where to write the fine-tuned SNN")
    p.add_argument("--freeze-mapper", action="store_true",
                   help="keep the pixel mapper = the ANN's output conv (ablation; with "
                        "--snn-weights, the file's mapper)")
    p.add_argument("--energy-weight", type=_nonneg_float, default=0.0,
                   help="add this x the estimated SOP part of the SNN/ANN energy ratio to the MSE "
                        "loss: trades PSNR for fewer spikes (default 0: off)")
    p.add_argument("--energy-target", type=_nonneg_float, default=0.0, metavar="RATIO",
                   help="with --energy-weight: penalise only the energy ratio above RATIO (a "
                        "budget, e.g. 0.45: an SNN under it trains on the MSE alone; default 0)")
    p.add_argument("--ssim-weight", type=_nonneg_float, default=0.0,
                   help="add this x (1 - SSIM) of the outputs to the MSE loss (default 0: off)")
    p.add_argument("--distill", type=_unit_float, default=0.0, metavar="W",
                   help="train towards W x the ANN's output + (1 - W) x the clean image "
                        "(knowledge distillation from --ann-weights, default the shipped ANN; "
                        "default 0: the clean image)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast + channels_last (GPU, or a CPU with AVX512-BF16/AMX; "
                        "without them bf16 is emulated: a step measured 9x slower than float32 on "
                        "an AVX2-only CPU, and the run warns); neuron potentials and gradients stay "
                        "float32")
    p.add_argument("--warmup", type=_nonneg_int, default=0, metavar="STEPS",
                   help="ramp the learning rates up linearly over STEPS steps (default 0); for "
                        "continuing a fine-tuned SNN (--snn-weights), whose own schedule ended low")
    p.add_argument("--log-every", type=_nonneg_int, default=10, metavar="STEPS",
                   help="a progress line (or bar refresh) every STEPS steps (default 10; 0: none)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a tqdm bar")
    _add_conversion_args(p)
    p.set_defaults(func=_guard(_cmd_finetune))


# ------------------------------------------------------------------ demo

def _cmd_demo(args):
    from spikingir.atomic import write_atomic
    from spikingir.evaluate import evaluate, markdown_table, write_figures, write_json
    from spikingir.pipeline import dehaze_samples, denoise_samples, load_ann

    _set_threads(args)
    check_output_folder(args.out, "--out")  # before the evaluation, not after it
    t0 = time.time()
    results = []
    for task, sigma in (("denoise", 25), ("dehaze", None)):
        samples = denoise_samples(sigma, crop=args.crop) if task == "denoise" else dehaze_samples()
        ann = load_ann(task, sigma)
        # the conversion options read the task; layer calibration is DnCNN's (the
        # dehazing half would refuse it after the denoising table): AOD-Net runs
        # without it, saying so
        task_args = argparse.Namespace(**{**vars(args), "task": task})
        if task == "dehaze" and args.layer_calibration in ("bias", "weights"):
            print("spikingir demo: note: --layer-calibration applies to the DnCNN half only",
                  file=sys.stderr)
            task_args.layer_calibration = "auto"
        snn, origin = _get_snn(task, sigma, ann, max(args.timesteps), task_args, False)
        outputs = {}
        report = evaluate(task, ann, snn, samples, args.timesteps, sigma, outputs)
        title = (f"{'Denoising (DnCNN, sigma=25)' if task == 'denoise' else 'Dehazing (AOD-Net)'}"
                 f" on {len(samples)} built-in image(s); SNN: {origin}")
        table = markdown_table(report, title)
        print(table, flush=True)
        results.append((task, report, table, samples, outputs))
    for task, report, table, samples, outputs in results:
        write_json(os.path.join(args.out, f"{task}.json"), report)
        write_atomic(os.path.join(args.out, f"{task}.md"), table)
        write_figures(args.out, report, samples, outputs, "noisy" if task == "denoise" else "hazy")
    print(f"figures and tables in {args.out}/ ({time.time() - t0:.0f} s)")
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="the main job: ANN vs SNN on built-in photos, both tasks",
                       description="Evaluates the shipped DnCNN (sigma=25) and AOD-Net against their "
                                   "shipped fine-tuned SNNs (or, given a conversion option, fresh "
                                   "conversions of the ANNs with it) on scikit-image's bundled "
                                   "photos; prints the tables, writes figures.")
    p.add_argument("--timesteps", type=_positive_int, nargs="+", default=[4, 10],
                   help="the T to evaluate the SNNs at (default 4 10)")
    p.add_argument("--crop", type=_positive_int, default=160,
                   help="denoising crops (N x N; default 160)")
    p.add_argument("--out", default="spikingir-demo",
                   help="folder for the tables and figures (default spikingir-demo)")
    _add_conversion_args(p)
    p.set_defaults(func=_guard(_cmd_demo))


# ------------------------------------------------------------------ refit-mapper

def _cmd_refit_mapper(args):
    from spikingir.finetune import refit_mapper
    from spikingir.models.spiking import SpikingChain
    from spikingir.pipeline import denoise_pairs, load_snn, save_snn
    from spikingir.weights import WEIGHTS_DIR, snn_weights_name

    _set_threads(args)
    sigma = _sigma_of(args)
    check_outputs(args.out)
    path = args.snn_weights or WEIGHTS_DIR / snn_weights_name("denoise", sigma)
    snn = load_snn(path, task="denoise").eval()
    if not isinstance(snn, SpikingChain):  # refit_mapper's TypeError was a traceback
        raise UserError(f"{path}: refit-mapper fits the pixel mapper of a DnCNN or conv-chain SNN, "
                        f"got a {type(snn).__name__} (a network with skips: its read-out convs "
                        "are fine-tuned with spikingir finetune --snn-weights)")
    _note_sigma(args, path, snn.meta.get("sigma"), sigma, "fine-tuned")
    data = _data_dir(args, "train400")
    if data is None:
        raise UserError("no training data: pass --data DIR (clean images; ../shared/data/train400 "
                        "was not found)")
    channels = _denoise_channels(args, (path, snn))  # a colour SNN fits on RGB crops
    noisy, clean = denoise_pairs(sigma, data, args.images, args.crop, channels=channels)
    t0 = time.time()
    refit_mapper(snn, noisy, clean, args.timesteps)
    ts = sorted(set(args.timesteps))
    meta = dict(snn.meta, mapper_refit={"images": len(noisy), "crop": args.crop, "data": str(data),
                                        "timesteps": ts, "sigma": sigma, "from": str(path)})
    save_snn(snn, args.out, meta)
    print(f"wrote {args.out}: the pixel mapper of {path} fitted by least squares on "
          f"{len(noisy)} crops of {data} at T={','.join(map(str, ts))} "
          f"({time.time() - t0:.0f} s); nothing else changed")
    return 0


def _add_refit_mapper(sub):
    p = sub.add_parser("refit-mapper", help="set a denoising SNN's pixel mapper to its least-squares "
                                            "optimum (no gradient steps)",
                       description="The pixel mapper is linear in the last spiking layer's rates: "
                                   "this sets it to the ridge least-squares fit of the noise on "
                                   "noisy training crops (spikingir.finetune.refit_mapper). Measured "
                                   "on the shipped s25/s15 SNNs: Set12 T=10 +0.06/+0.13 dB, T=5 "
                                   "+0.24/+0.37 dB, same energy.")
    p.set_defaults(task="denoise")
    p.add_argument("--sigma", type=float, required=True, help="noise level: 15, 25 or 50")
    p.add_argument("--snn-weights", default=None,
                   help="SNN file (default: the shipped SNN of --sigma)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="clean training images (default ../shared/data/train400)")
    p.add_argument("--images", type=_positive_int, default=48, help="crops to fit on (default 48)")
    p.add_argument("--crop", type=_positive_int, default=128, help="crop size (default 128)")
    p.add_argument("--timesteps", type=_positive_int, nargs="+", default=[5, 10],
                   help="T to fit at, all in one fit (default 5 10)")
    p.add_argument("--out", required=True, help="where to write the SNN")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=_guard(_cmd_refit_mapper))


def add_commands(sub):
    """Registers the restoration commands on the CLI's subparsers."""
    _add_evaluate(sub)
    _add_restore(sub)
    _add_convert(sub)
    _add_finetune(sub)
    _add_refit_mapper(sub)
    _add_demo(sub)
