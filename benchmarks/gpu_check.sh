#!/usr/bin/env bash
# One script for a lent GPU (DESIGN.md section 6): build the CUDA extension,
# run the GPU tests (+ compute-sanitizer memcheck on the CUDA neuron tests), run
# the GPU benchmarks, print a short table last. Target: under 8 minutes on an H100.
#   bash benchmarks/gpu_check.sh            (results also under $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/spikingir-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (SPIKINGIR_FORCE_CUDA=1, sm_90)"
t0=$(date +%s)
SPIKINGIR_FORCE_CUDA=1 SPIKINGIR_CUDA_ARCHS="90" MAX_JOBS=16 \
  python -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s"
python -c "from spikingir import ops; print('backends on cuda:', ops.available_backends('cuda'), ops.available_backends('cuda', 'spike_conv2d') if 'spike_conv2d' in ops.backends.OP_BACKENDS else '')"

step "GPU tests"
timeout 240 python -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1

step "compute-sanitizer memcheck (CUDA neuron tests, small shapes)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python -m pytest -q -x -m gpu tests/test_neuron.py -k "gpu_matches_reference and cuda and sigmoid" \
  2>&1 | tail -8 | tee "$OUT/memcheck.log" || status=1

step "benchmarks"
timeout 150 python benchmarks/bench_neuron.py --device cuda --json "$OUT/bench_neuron_gpu.json" \
  2>&1 | tee "$OUT/bench_neuron_gpu.txt" | tail -60 || status=1
if [ -f benchmarks/bench_spike_conv.py ]; then
  timeout 90 python benchmarks/bench_spike_conv.py --device cuda 2>&1 | tee "$OUT/bench_spike_conv_gpu.txt" | tail -30 || status=1
fi

step "summary (forward+backward, from $OUT/bench_neuron_gpu.json)"
python - "$OUT/bench_neuron_gpu.json" <<'PY' || true
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
print(f"{'mode':7} {'T':>3} {'N':>9} {'backend':12} {'ms':>9} {'x naive':>8} {'GB/s':>7} {'floor':>6}")
for r in rows:
    print(f"{r['mode']:7} {r['T']:>3} {r['N']:>9} {r['backend']:12} {fmt(r['ms'], '9.3f')} "
          f"{fmt(r['speedup'], '8.2f')} {fmt(r['gbps'], '7.0f')} {fmt(r['floor_frac'], '6.2f')}")
PY
exit $status
