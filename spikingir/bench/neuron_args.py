"""The choices and defaults of ``spikingir bench neuron`` (spikingir.bench.neuron
re-exports them), in a module without torch: the ``spikingir`` parser is built
for every command, and importing torch for these names made ``spikingir --help``
(and every usage error) take 4 s of CPU instead of 0.15 s (2-core VM)."""

MODES = ("fwd", "fwdbwd")
DEFAULT_T = (4, 10, 32)
DEFAULT_N = {"cpu": (100_000, 1_000_000), "cuda": (1_000_000, 8_000_000)}
QUICK_T = (10,)
QUICK_N = {"cpu": (100_000, 1_000_000), "cuda": (1_000_000, 8_000_000)}
#: Columns that ``skip`` may leave out (the naive loop is the baseline of every ratio).
SKIPPABLE = ("compile", "torch", "cpp", "cuda", "triton", "spikingjelly")
