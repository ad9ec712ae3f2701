#!/usr/bin/env bash
# One GPU session (under 8 minutes on one GPU): the CUDA tests un-simulated,
# compute-sanitizer memcheck and racecheck over a subset, and the GPU benchmark.
# Writes gpu-session/session.json and gpu-session/summary.md.
#
#     bash bench/gpu_session.sh [output folder]
#
# Needs an NVIDIA GPU, torch with CUDA, numba-cuda[cu12] and, for the sanitizer
# steps, compute-sanitizer on PATH (skipped, and recorded so, without it).
set -u
OUT=${1:-gpu-session}
PY=${PYTHON:-python}
mkdir -p "$OUT"
unset NUMBA_ENABLE_CUDASIM
export FASTPOOL_TEST_CUDA=1

step() {  # step NAME TIMEOUT COMMAND...: runs it, keeping its log, status and time
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/steps.jsonl"
    echo "$name: rc=$rc in $((SECONDS - start)) s"
}

rm -f "$OUT/steps.jsonl"
$PY - <<'EOF' >"$OUT/device.log" 2>&1
from numba import cuda
d = cuda.get_current_device()
print(d.name, "cc", d.compute_capability)
EOF

# 1. The CUDA test suite on the GPU (FASTPOOL_TEST_CUDA=1, no simulator), ~2 min.
step tests 240 $PY -m pytest tests/cuda -q -x -p no:cacheprovider \
    --deselect tests/cuda/test_compiler.py

# 2. compute-sanitizer over a subset: every kernel once, forward and backward.
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        step "sanitizer-$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 99 \
            $PY -m pytest -q -x -p no:cacheprovider \
            tests/cuda/test_cuda.py::test_forward_matches_cpu \
            tests/cuda/test_cuda.py::test_sliding_max_backward_gathers_with_the_window \
            tests/cuda/test_cuda.py::test_strided_conv_matches_cpu \
            tests/cuda/test_cuda.py::test_max_backward_with_foreign_indices_scatters
    done
else
    echo '{"step": "sanitizer", "rc": null, "seconds": 0, "skipped": "compute-sanitizer not on PATH"}' >>"$OUT/steps.jsonl"
fi

# 3. The GPU benchmark (the quick suite, float32 and bfloat16), ~2 min.
step bench 200 $PY -m bench --backend cuda --dtype float32 --dtype bfloat16 \
    --json "$OUT/bench.json" --markdown "$OUT/bench.md"

$PY -m bench.gpu_summary "$OUT"
