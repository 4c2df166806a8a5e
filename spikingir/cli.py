"""The ``spikingir`` command (also ``python -m spikingir``).

One ``_cmd_<name>(args)`` per command, registered in :func:`_build_parser`;
to add one (train-ann, evaluate, restore, demo, ...), add its subparser there
with ``set_defaults(func=_cmd_<name>)``. A command returns the exit status.
Bad arguments exit with status 2 and one line on stderr (argparse).

Torch's CPU allocator is asked for transparent huge pages on allocations of
2 MB and more (``THP_MEM_ALLOC_ENABLE=1``, unless the variable is set already),
before torch is imported: an SNN on the CPU allocates a fresh ``T x`` activation
tensor per layer and otherwise pays most of it in 4 KB page faults (measured on
the 2-core VM, DnCNN SNN T=10 on 160x160 with cpp spike_conv2d: 1734 -> 1057 ms;
benchmarks/RESULTS.md). Memory use is unchanged apart from 2 MB alignment.
``THP_MEM_ALLOC_ENABLE=0 spikingir ...`` turns it off.
"""
import argparse
import math
import os
import sys
import warnings

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before any torch import: read once


def _number_in(text, kind, minimum, what, maximum=None, *, open_minimum=False, open_maximum=False):
    """argparse type: ``kind(text)`` (int or float) that is >= ``minimum`` (and
    <= ``maximum`` when given; > and < with ``open_minimum``/``open_maximum``)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    # a NaN fails every comparison; inf would pass one (a loss or learning rate of inf
    # only fails after the run has started)
    ok = (value > minimum if open_minimum else value >= minimum) and math.isfinite(value)
    if maximum is not None:
        ok = ok and (value < maximum if open_maximum else value <= maximum)
    if not ok:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text):
    return _number_in(text, int, 1, "a positive integer")


def _nonneg_int(text):
    return _number_in(text, int, 0, "an integer >= 0")


def _nonneg_float(text):
    return _number_in(text, float, 0.0, "a finite number >= 0")


def _positive_float(text):
    return _number_in(text, float, 0.0, "a finite number > 0", open_minimum=True)


def _unit_float(text):
    return _number_in(text, float, 0.0, "a number in [0, 1]", maximum=1.0)


# --------------------------------------------------------------------------
# spikingir bench neuron
# --------------------------------------------------------------------------

def _add_bench_neuron(bench_sub):
    from spikingir.bench import neuron_args as bn  # no torch: --help stays fast

    p = bench_sub.add_parser(
        "neuron", help="time the multistep IF neuron: naive loop, torch.compile, every backend",
        description="Times the multistep IF neuron side by side: the naive PyTorch loop, "
                    "torch.compile of it, the reference backend and every fused backend "
                    "(and SpikingJelly's IFNode when installed); prints one table block per "
                    "(mode, T, N).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--T", type=_positive_int, nargs="+", metavar="T",
                   help=f"time steps (default {' '.join(map(str, bn.DEFAULT_T))})")
    p.add_argument("--N", type=_positive_int, nargs="+", metavar="N",
                   help="neurons per step (default: CPU "
                        f"{' '.join(map(str, bn.DEFAULT_N['cpu']))}, CUDA "
                        f"{' '.join(map(str, bn.DEFAULT_N['cuda']))})")
    p.add_argument("--modes", nargs="+", choices=bn.MODES, default=list(bn.MODES),
                   help="fwd: forward; fwdbwd: forward + backward (default: both)")
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads (CPU)")
    p.add_argument("--skip", nargs="+", default=[], choices=bn.SKIPPABLE, metavar="COLUMN",
                   help=f"columns to leave out, of: {' '.join(bn.SKIPPABLE)}")
    p.add_argument("--json", metavar="PATH", help="also write the rows and environment as JSON")
    p.add_argument("--quick", action="store_true",
                   help="T=10 and the default N only (CPU 100k and 1M)")
    # Seconds to keep repeating a CPU timing (at least 3 repeats); tests set 0.
    p.add_argument("--min-time", type=_nonneg_float, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_bench_neuron, _parser=p)


def _cmd_bench_neuron(args):
    from spikingir.bench import neuron as bn

    if cuda_missing(args.device):
        args._parser.error(cuda_missing(args.device))
    if args.json:
        bn.check_json_path(args.json, args._parser.error)
    Ts, Ns = args.T, args.N
    if args.quick:
        Ts = Ts or list(bn.QUICK_T)
        Ns = Ns or list(bn.QUICK_N[args.device])
    rows = bn.run(args.device, Ts=Ts, Ns=Ns, modes=args.modes, threads=args.threads,
                  min_time=args.min_time, skip=tuple(args.skip),
                  progress=lambda s: print(f"[bench neuron] {s}", file=sys.stderr, flush=True))
    env = bn.environment(args.device, args.threads)
    print(bn.markdown_header(env))
    print(bn.command_note(env))
    print(bn.format_table(rows))
    if args.json:
        bn.write_json(args.json, env, rows)
    return 0


# --------------------------------------------------------------------------
# spikingir train-ann
# --------------------------------------------------------------------------

TRAIN_SIGMAS = (15, 25, 50)


def _add_train_ann(sub):
    p = sub.add_parser(
        "train-ann", help="train the ANN (DnCNN-S denoiser or AOD-Net dehazer)",
        description="Trains DnCNN-S (--task denoise, Train400 patches with fresh Gaussian noise, "
                    "validated on Set12) or AOD-Net (--task dehaze, paired hazy/clean folders, "
                    "validated on held-out scenes), with resumable checkpoints. Writes a plain "
                    "state dict (DnCNN: BN folded, loads into DnCNN(batchnorm=False)) and a JSON "
                    "sidecar with the metadata. Data default to ../shared/data.")
    p.add_argument("--task", choices=("denoise", "dehaze"), required=True)
    p.add_argument("--sigma", type=float, help=f"noise level for --task denoise, one of "
                   f"{', '.join(map(str, TRAIN_SIGMAS))} (default 25)")
    p.add_argument("--data", metavar="DIR", help="training data: Train400-like folder of grayscale "
                   "images (denoise) or DIR/hazy + DIR/gt|clear (dehaze); default ../shared/data/"
                   "train400 or sots_train")
    p.add_argument("--val-data", metavar="DIR", help="validation data: Set12-like folder (denoise; "
                   "default ../shared/data/set12) or a paired folder (dehaze; default: the scenes "
                   "--val-scenes of --data, held out of training)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="denoise: 1 (default) trains a grayscale DnCNN; 3 a colour one "
                        "(image_channels=3) on RGB patches, noise drawn per channel, validated in "
                        "RGB: pass colour --data and --val-data (gray images are replicated to "
                        "RGB, with a warning)")
    p.add_argument("--val-scenes", nargs="+", metavar="ID",
                   help="dehaze: scene ids of --data held out for validation (default: 1420 ... "
                        "1424 where --data has them all, as sots_train; else its last tenth)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int,
                        help="passes over the training set (default: denoise 20; dehaze 100 of 10 "
                             "passes over the pairs each)")
    length.add_argument("--steps", type=_positive_int, help="optimizer steps in total")
    p.add_argument("--batch-size", type=_positive_int,
                   help="default: denoise 128 patches of 40x40; dehaze 16 crops")
    p.add_argument("--crop", type=_positive_int, default=128, help="dehaze: training crop size (default 128)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate, decayed along a cosine "
                   "to 1%% (default 1e-3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="PATH", help="weights file (default ./dncnn_s<sigma>.pt or "
                   "./aodnet.pt); the metadata go to PATH with suffix .json")
    p.add_argument("--checkpoint", metavar="PATH", help="training checkpoint (default: OUT + '.ckpt')")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    p.add_argument("--init", metavar="PATH", help="start from these weights instead of a random "
                   "initialisation: a train-ann checkpoint or a state dict of the training form "
                   "(DnCNN with BN), e.g. another sigma's checkpoint; give another --seed than that run's "
                   "to draw other patches")
    p.add_argument("--threads", type=_positive_int, help="torch.set_num_threads (CPU)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--val-crop", type=_positive_int, metavar="N",
                   help="denoise: validate on N x N center crops (faster on a CPU; default: full images)")
    p.add_argument("--val-every", type=_positive_int, metavar="STEPS",
                   help="validate (and checkpoint) every STEPS steps (default: every epoch)")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="STEPS",
                   help="checkpoint every STEPS steps (default: --val-every, else 500)")
    p.add_argument("--time-limit", type=_nonneg_float, metavar="SECONDS",
                   help="stop after this long, write the weights and the checkpoint (--resume continues)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast + channels_last (GPU, or a CPU with AVX512-BF16/AMX)")
    p.add_argument("--log-every", type=_nonneg_int, default=50, metavar="STEPS")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a tqdm bar")
    p.set_defaults(func=_cmd_train_ann, _parser=p)


def cuda_missing(device):
    """The one-line error for ``--device cuda`` without a usable GPU, else None."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        return f"--device cuda: no CUDA device is available (torch {torch.__version__})"
    return None


class _BadInput(ValueError):
    pass


def _check_train_args(args):
    from pathlib import Path

    if args.task == "denoise":
        sigma = 25.0 if args.sigma is None else args.sigma
        if sigma not in TRAIN_SIGMAS:
            raise _BadInput(f"--sigma {args.sigma:g} is not supported; use one of "
                            f"{', '.join(map(str, TRAIN_SIGMAS))}")
        args.sigma = int(sigma)
        if args.val_scenes:
            raise _BadInput("--val-scenes applies to --task dehaze only")
    elif args.channels is not None:
        raise _BadInput("--channels applies to --task denoise only (AOD-Net takes RGB)")
    else:
        if args.sigma is not None:
            raise _BadInput("--sigma applies to --task denoise only")
        if args.val_crop:
            raise _BadInput("--val-crop applies to --task denoise only")
        if args.val_scenes and args.val_data:
            raise _BadInput("give either --val-scenes (held out of --data) or --val-data, not both")
    if cuda_missing(args.device):
        raise _BadInput(cuda_missing(args.device))
    if not args.lr > 0:
        raise _BadInput(f"--lr must be > 0, got {args.lr}")
    if args.workers < 0:
        raise _BadInput(f"--workers must be >= 0, got {args.workers}")
    for name in ("data", "val_data"):
        d = getattr(args, name)
        if d is not None and not Path(d).is_dir():
            raise _BadInput(f"--{name.replace('_', '-')}: no such directory: {d}")
    if args.init is not None and not Path(args.init).is_file():
        raise _BadInput(f"--init: no such file: {args.init}")
    if args.out is None:
        args.out = f"dncnn_s{args.sigma}.pt" if args.task == "denoise" else "aodnet.pt"
    if Path(args.out).suffix == ".json":
        raise _BadInput(f"--out {args.out}: the weights need another suffix than .json (the metadata go there)")
    args.checkpoint = args.checkpoint or str(args.out) + ".ckpt"
    check_outputs(args.out, args.checkpoint, args.resume)
    side = str(Path(args.out).with_suffix(".json"))
    check_outputs(side, option="the metadata file (--out with .json)")
    check_distinct(("--out", args.out), ("the metadata file", side), ("--checkpoint", args.checkpoint))


def _check_creatable(folder, target):
    """``folder`` exists as a writable folder, or its nearest existing ancestor is
    one (the writers create missing folders); else a one-line error about ``target``."""
    import os

    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise _BadInput(f"cannot write {target}: {folder} is not a writable folder")


def check_output_folder(path, option):
    """An output folder (``option`` names it in the message): a folder or nothing
    yet, in a writable place. Raises ValueError with a one-line message."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise _BadInput(f"{option} {path}: exists and is not a folder")
    _check_creatable(path.resolve(), path)


def check_outputs(out, checkpoint=None, resume=False, option="--out"):
    """Refuses, before any work, the output files that a long run (train-ann,
    finetune, evaluate) could otherwise only fail to write at its end: ``out``
    (the command's ``option``) a directory or in an unwritable place, the same
    for ``checkpoint``, and an existing ``checkpoint`` without ``resume`` (the
    run would overwrite it). Raises ValueError with a one-line message."""
    import os
    from pathlib import Path

    from spikingir.atomic import is_special

    if Path(out).is_dir():
        raise _BadInput(f"{option} {out} is a directory")
    for target in (out, checkpoint):
        if target is None:
            continue
        if is_special(target):  # a device, FIFO or /dev/stdout: written in place
            if not os.access(target, os.W_OK):
                raise _BadInput(f"cannot write {target}: permission denied")
            continue
        _check_creatable(Path(target).resolve().parent, target)  # a link: its target's
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise _BadInput(f"--checkpoint {checkpoint} is a directory")
    if checkpoint is not None and Path(checkpoint).exists() and not resume:
        raise _BadInput(f"checkpoint {checkpoint} exists: pass --resume to continue it, "
                        "or delete it to start over")


def check_distinct(*named):
    """``named``: ``(option, path)`` pairs (None paths skipped). Two outputs that
    are the same file (after resolving) would overwrite each other: a one-line
    error before any work."""
    from pathlib import Path

    seen = {}
    for option, path in named:
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise _BadInput(f"{seen[key]} and {option} both name {path}")
        seen[key] = option


def _kept(checkpoint):
    """What a stopped training run leaves: its checkpoint, if one was written yet."""
    import os

    if checkpoint and os.path.isfile(checkpoint):
        return f"checkpoint {checkpoint} (--resume continues)"
    return ("no checkpoint yet (stopped before the first)" if checkpoint
            else "nothing kept (--checkpoint PATH keeps a run's progress)")


def _cmd_train_ann(args):
    import os
    import shlex

    import torch

    from spikingir import train

    def fail(msg):
        print(f"spikingir train-ann: error: {msg}", file=sys.stderr)
        return 2

    try:
        _check_train_args(args)
    except _BadInput as err:
        return fail(err)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(data=args.data, val_data=args.val_data, steps=args.steps, epochs=args.epochs, lr=args.lr,
                  device=args.device, seed=args.seed, checkpoint=args.checkpoint, resume=args.resume,
                  val_every=args.val_every, checkpoint_every=args.checkpoint_every, amp=args.amp,
                  workers=args.workers, log_every=args.log_every, progress=not args.no_progress,
                  time_limit=args.time_limit, init=args.init)
    try:
        if args.task == "denoise":
            if args.steps is None and args.epochs is None:
                common["epochs"] = 20
            res = train.train_denoiser(args.sigma, batch_size=args.batch_size or 128, val_crop=args.val_crop,
                                       channels=args.channels or 1, **common)
        else:
            if args.steps is None and args.epochs is None:
                common["epochs"] = 100
            kw = {"val_scenes": args.val_scenes} if args.val_scenes else {}
            res = train.train_dehazer(batch_size=args.batch_size or 16, crop=args.crop, **kw, **common)
        meta = dict(res.meta)
        meta["command"] = "spikingir " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train-ann"] else None
        meta["threads"] = args.threads or torch.get_num_threads()
        train.save_weights(args.out, res.state_dict, meta)
    except KeyboardInterrupt:
        print(f"spikingir train-ann: interrupted; {_kept(args.checkpoint)}", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as err:
        return fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except FloatingPointError as err:  # diverged: not bad input, but no traceback either
        print(f"spikingir train-ann: {err}; try a lower --lr ({_kept(args.checkpoint)})", file=sys.stderr)
        return 1
    status = "finished" if res.fit.finished else f"stopped at step {res.fit.step} of {res.fit.total_steps}"
    full = "val_full_psnr" in meta
    figs = (f"validation{' (full images)' if full else ''} PSNR {meta['val_full_psnr' if full else 'val_psnr']:.2f} dB, "
            f"SSIM {meta['val_full_ssim' if full else 'val_ssim']:.4f}"
            if meta.get("val_psnr") is not None else "no validation")
    print(f"{args.out}: {status}, {figs} ({os.path.splitext(args.out)[0]}.json)")
    return 0


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------

def version_report():
    """``spikingir --version``: the versions, the compiled extension, and per
    device the backends that can run each op here (for bug reports: which
    kernels a run could use)."""
    import torch

    import spikingir
    from spikingir.ops import backends as b

    ext = ("spikingir._C with CUDA kernels" if b.HAS_CUDA_OPS else "spikingir._C (CPU kernels)"
           if b.HAS_CPP_OPS else f"spikingir._C failed to import ({b._CPP_ERROR})")
    if b.HAS_CPP_OPS:
        ext += f", CPU spike_conv2d on {b._C.cpu_isa()}"
    triton = f"triton {b.triton.__version__}" if b.HAS_TRITON else "no triton"
    lines = [f"spikingir {spikingir.__version__}, torch {torch.__version__}, {ext}, {triton}"]
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        for op in sorted(b.OP_BACKENDS):
            lines.append(f"  {device} {op}: {', '.join(b.available_backends(device, op))}")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        lines.append(f"  cuda: no CUDA device (torch is {built})")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it imports torch and the ops)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_report())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), as every other bad input:
    argparse's default prints the whole usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser():
    parser = _Parser(
        prog="spikingir",
        description="SpikingIR: spiking neural networks for image restoration, fused neuron kernels.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions and the backends available on this machine, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks of the ops (timing tables)",
                           description="Benchmarks of spikingir's ops.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="OP")
    _add_bench_neuron(bench_sub)
    _add_train_ann(sub)

    from spikingir.commands import add_commands  # evaluate, restore, finetune, demo
    add_commands(sub)
    return parser


def _warning_line(message, category, filename, lineno, line=None):
    """A warning as the CLI prints it: one line, ``spikingir: warning: ...`` (Python's
    default adds the file, line and source of the library call that warned, which
    tell a user of the command nothing)."""
    return f"spikingir: warning: {message}\n"


def main(argv=None):
    """Entry point of the ``spikingir`` console script; returns the exit status."""
    args = None
    formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        args = _build_parser().parse_args(argv)
        if os.environ.get("SPIKINGIR_KEEP_FREED_MEMORY", "0") == "1":
            from spikingir.allocator import keep_freed_memory
            keep_freed_memory()  # opt-in, see spikingir/allocator.py: faster, more memory
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which reports its checkpoint)
        cmd = getattr(args, "command", None)  # None: interrupted while parsing
        print(f"spikingir{' ' + cmd if cmd else ''}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read stdout has gone (`spikingir --help | head -1`): stop quietly, as
        # Unix tools do. stdout now points at /dev/null, so that the interpreter's last
        # flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
