"""The ``spikingir`` command (also ``python -m spikingir``).

One ``_cmd_<name>(args)`` per command, registered in :func:`_build_parser`;
to add one (train-ann, evaluate, restore, demo, ...), add its subparser there
with ``set_defaults(func=_cmd_<name>)``. A command returns the exit status.
Bad arguments exit with status 2 and one line on stderr (argparse).
"""
import argparse
import json
import sys


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


# --------------------------------------------------------------------------
# spikingir bench neuron
# --------------------------------------------------------------------------

def _add_bench_neuron(bench_sub):
    from spikingir.bench import neuron as bn  # light: torch is imported anyway

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
    import torch

    from spikingir.bench import neuron as bn

    if args.device == "cuda" and not torch.cuda.is_available():
        args._parser.error("--device cuda: no CUDA device is available "
                           f"(torch {torch.__version__})")
    Ts, Ns = args.T, args.N
    if args.quick:
        Ts = Ts or list(bn.QUICK_T)
        Ns = Ns or list(bn.QUICK_N[args.device])
    rows = bn.run(args.device, Ts=Ts, Ns=Ns, modes=args.modes, threads=args.threads,
                  min_time=args.min_time, skip=tuple(args.skip),
                  progress=lambda s: print(f"[bench neuron] {s}", file=sys.stderr, flush=True))
    env = bn.environment(args.device, args.threads)
    print(bn.markdown_header(env))
    print(bn.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------

def _build_parser():
    parser = argparse.ArgumentParser(
        prog="spikingir",
        description="SpikingIR: spiking neural networks for image restoration, fused neuron kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks of the ops (timing tables)",
                           description="Benchmarks of spikingir's ops.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="OP")
    _add_bench_neuron(bench_sub)

    # Later: sub.add_parser("train-ann"), ("evaluate"), ("restore"), ("demo"), each with
    # set_defaults(func=_cmd_<name>).
    return parser


def main(argv=None):
    """Entry point of the ``spikingir`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
