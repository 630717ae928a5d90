#!/usr/bin/env bash
# GPU check, one run under 8 minutes on an H200 with torch preinstalled and no network:
#   1. the build (in place, sm_90, CUDA kernels when nvcc is there);
#   2. bfloat16 forward+backward time and peak memory at per-view N = 16384 and 65536 for
#      triton, cuda, eager and compiled reference (skipped or OOM where they do not fit), then
#      for the symmetric sweeps of triton and cuda;
#   3. the GPU tests of each backend in its own bounded phase, with fixed Triton tiles; the slow
#      compile and autotune tests last;
#   4. float32 figures.
# Run from anywhere: `bash benchmarks/gpu_check.sh`. Every phase has its own `timeout`, and a
# failed phase does not stop the next. Logs and tables go to "${OUT:-benchmarks/results}/gpu".
# Exit status: 0 only if every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}/gpu"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The in-place build is imported from the tree, ahead of any installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Fixed Triton tiles everywhere but the autotune test: autotuning compiles and times every
# configuration of every kernel variant and size, minutes this check does not have.
export ICL_MSR_TRITON_AUTOTUNE=0
# Per-phase limits (seconds); with start-up they add up to under 8 minutes.
BUILD_S="${BUILD_S:-100}"
BF16_S="${BF16_S:-110}"
SYM_S="${SYM_S:-50}"
TESTS_S="${TESTS_S:-40}"
TRITON_TESTS_S="${TRITON_TESTS_S:-60}"  # compiles the most kernel variants
SLOW_S="${SLOW_S:-40}"
FP32_S="${FP32_S:-35}"

failed=()
phase() { echo; echo "=== $1 ($(date +%T))"; }
bench() {  # bench DTYPE SIZES LOGNAME [PROVIDERS]
    "$PY" -m benchmarks --device cuda --sizes "$2" --dtypes "$1" --d 128 --k 64 --warmup 1 \
        --repeats 3 --min-time 0.2 --providers "${4:-triton,cuda,reference,reference-compiled}" \
        --out "$OUT/$3" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/$3.log"
    return "${PIPESTATUS[0]}"
}

phase "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
"$PY" -c 'import triton; print("triton", triton.__version__)' || true

phase "build (timeout ${BUILD_S}s)"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "no nvcc under CUDA_HOME=$CUDA_HOME: building the CPU kernels only (backend 'cuda' off)"
    export ICL_MSR_NO_CUDA=1
else
    export PATH="$CUDA_HOME/bin:$PATH"
fi
if timeout "$BUILD_S" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    echo "built: $(ls icl_msr_kernels/_C*.so 2>/dev/null | tr '\n' ' ')"
else
    echo "BUILD FAILED (exit $?); last lines of $OUT/build.log:"; tail -n 30 "$OUT/build.log"
    failed+=(build)
fi
"$PY" -c 'import icl_msr_kernels as m; print("backends:", m.backend_status())'

phase "bfloat16 benchmark, N = 16384 and 65536 (timeout ${BF16_S}s)"
timeout "$BF16_S" bash -c "$(declare -f bench); PY='$PY' OUT='$OUT' bench bfloat16 16384,65536 bf16" \
    || { echo "BF16 BENCHMARK FAILED OR TIMED OUT; the table so far:"; cat "$OUT/bf16/results.md" 2>/dev/null; failed+=(bf16); }

# A phase of its own: the symmetric sweep's programs wait on each other, so a fault there costs
# no other figure.
phase "bfloat16, the symmetric sweeps, N = 16384 and 65536 (timeout ${SYM_S}s)"
timeout "$SYM_S" bash -c "$(declare -f bench); PY='$PY' OUT='$OUT' bench bfloat16 16384,65536 bf16-symmetric triton-symmetric,cuda-symmetric" \
    || { echo "SYMMETRIC BENCHMARK FAILED OR TIMED OUT"; failed+=(bf16-symmetric); }

run_tests() {  # run_tests NAME TIMEOUT PYTEST-ARGS...
    local name="$1" limit="$2"; shift 2
    phase "tests: $name (timeout ${limit}s)"
    timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider -x "$@" 2>&1 | tail -n 25 \
        | tee "$OUT/tests-$name.log"
    local status=${PIPESTATUS[0]}
    if [ "$status" -eq 5 ]; then echo "no tests collected"
    elif [ "$status" -ne 0 ]; then echo "TESTS FAILED: $name (exit $status)"; failed+=("tests-$name"); fi
}
run_tests cuda "$TESTS_S" tests/test_cuda.py -m "cuda and not slow"
run_tests triton "$TRITON_TESTS_S" tests/test_triton.py -m "cuda and not slow"
run_tests conformance "$TESTS_S" tests/test_conformance.py -m "cuda and not slow"
run_tests slow "$SLOW_S" tests -m "cuda and slow"

phase "float32 benchmark, N = 16384 (timeout ${FP32_S}s)"
timeout "$FP32_S" bash -c "$(declare -f bench); PY='$PY' OUT='$OUT' bench float32 16384 fp32" \
    || { echo "FP32 BENCHMARK FAILED OR TIMED OUT"; failed+=(fp32); }

phase "done"
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all phases passed; results in $OUT"
else
    echo "gpu_check: FAILED: ${failed[*]}; logs in $OUT"
    exit 1
fi
