"""Multistep IF neuron: naive PyTorch loop, torch.compile, reference and every
fused backend side by side (library: spikingir/bench/neuron.py).

    python benchmarks/bench_neuron.py                       # CPU, default sizes
    python benchmarks/bench_neuron.py --threads 2 --markdown-append benchmarks/RESULTS.md
    python benchmarks/bench_neuron.py --device cuda --json out/bench_neuron.json

``--markdown-append`` adds a section naming device, commit, date, torch version,
thread count and the command line to a results file (benchmarks/RESULTS.md feeds
the README).
"""
import sys

from spikingir.bench import neuron as bn


def main(argv=None):
    cli = bn.cli_module()  # the spikingir command's parser and argument types
    p = cli._Parser(description=__doc__.splitlines()[0])  # usage errors: one line, exit 2
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--T", type=int, nargs="+", help=f"default {bn.DEFAULT_T}")
    p.add_argument("--N", type=int, nargs="+", help=f"default {bn.DEFAULT_N}")
    p.add_argument("--modes", nargs="+", choices=bn.MODES, default=list(bn.MODES))
    p.add_argument("--threads", type=cli._positive_int, help="torch.set_num_threads (CPU)")
    p.add_argument("--skip", nargs="+", choices=bn.SKIPPABLE, default=[])
    p.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    p.add_argument("--markdown-append", metavar="PATH",
                   help="append a Markdown section with the results to PATH")
    p.add_argument("--note", default="", help="a line added under the Markdown header")
    args = p.parse_args(argv)
    if cli.cuda_missing(args.device):
        p.error(cli.cuda_missing(args.device))
    if args.json:
        bn.check_json_path(args.json, p.error)

    try:
        rows = bn.run(args.device, Ts=args.T, Ns=args.N, modes=args.modes, threads=args.threads,
                      skip=tuple(args.skip),
                      progress=lambda s: print(f"[bench_neuron] {s}", file=sys.stderr, flush=True))
    except ValueError as exc:
        p.error(str(exc))
    env = bn.environment(args.device, args.threads, bn.command(__file__, argv))
    if args.json:  # first: the numbers survive a failure below
        bn.write_json(args.json, env, rows)
    header = bn.markdown_header(env)
    print(header)
    print(bn.command_note(env))
    print(bn.format_table(rows))
    if args.markdown_append:
        section = bn.to_markdown(rows, "neuron — " + header)
        head, rest = section.split("\n", 1)
        note = f"{args.note}\n\n" if args.note else ""
        section = f"{head}\n\n{note}`{bn.command_note(env)}`\n{rest}"
        with open(args.markdown_append, "a") as f:
            f.write("\n" + section)
        print(f"appended to {args.markdown_append}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
