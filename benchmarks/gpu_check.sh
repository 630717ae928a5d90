#!/usr/bin/env bash
# GPU check: build the package in place, run the CUDA tests, then benchmark on the GPU at large
# batch (per-view N up to 65536, float32 and bfloat16, D=128, K=64) against the eager and
# compiled reference, printing the table.
#
# For a GPU machine with torch preinstalled and no network or venv (torch 2.11, Python 3.12,
# nvcc 13.0); run from anywhere: `bash benchmarks/gpu_check.sh`. Each phase is bounded by
# `timeout` so the whole check stays under 8 minutes on an H200; a failed phase is reported and
# the next one still runs (a broken build still benchmarks the reference). Logs and results go to
# "${OUT:-benchmarks/results}". Exit status: 0 only if every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PATH="$CUDA_HOME/bin:$PATH"
# The in-place build is imported from the tree, ahead of any installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Per-phase limits (seconds); their sum plus start-up stays under 8 minutes.
BUILD_S="${BUILD_S:-150}"
TEST_S="${TEST_S:-90}"
BENCH_S="${BENCH_S:-210}"
SIZES="${SIZES:-4096,16384,32768,65536}"

failed=()
phase() { echo; echo "=== $1 ($(date +%T))"; }

phase "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'

phase "build (timeout ${BUILD_S}s)"
# In place: nothing is installed, and the extension lands next to the sources it belongs to.
if timeout "$BUILD_S" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    echo "built: $(ls icl_msr_kernels/_C*.so 2>/dev/null | tr '\n' ' ')"
else
    echo "BUILD FAILED (exit $?); last lines of $OUT/build.log:"; tail -n 30 "$OUT/build.log"
    failed+=(build)
fi
"$PY" -c 'import icl_msr_kernels as m; print("backends:", m.backend_status())'

phase "CUDA tests (timeout ${TEST_S}s)"
# Tests marked `cuda`; exit status 5 means none are collected yet, which is not a failure.
timeout "$TEST_S" "$PY" -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 5 ]; then
    echo "no CUDA tests collected"
elif [ "$status" -ne 0 ]; then
    echo "CUDA TESTS FAILED (exit $status)"; failed+=(tests)
fi

phase "benchmark (timeout ${BENCH_S}s)"
# In-process on the GPU (the default there: no process start-up per point). float32 runs
# first; results.csv/results.md are rewritten after every point, so a timeout keeps a table.
timeout "$BENCH_S" "$PY" -m benchmarks --device cuda --sizes "$SIZES" \
    --dtypes float32,bfloat16 --d 128 --k 64 --out "$OUT" 2>&1 \
    | grep -v "^W[0-9]" | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    echo "BENCHMARK FAILED OR TIMED OUT (exit $status); the table so far:"
    cat "$OUT/results.md" 2>/dev/null
    failed+=(benchmark)
fi

phase "done"
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all phases passed; results in $OUT"
else
    echo "gpu_check: FAILED: ${failed[*]}; logs in $OUT"
    exit 1
fi
