#!/usr/bin/env bash
# The GPU check of atlas, in one script for a bare GPU machine with this tree
# and no network: build the extension with CUDA (one architecture), run the
# CUDA tests, run the kernel benchmarks, print a summary. Meant to finish in
# well under 8 minutes on a 16-core H200 machine.
#
#   bench/gpu_check.sh                      # python3, sm_90
#   PYTHON=/path/python ATLAS_CUDA_ARCHS=100a bench/gpu_check.sh
#
# Needs: nvcc, cmake, a Python with a CUDA build of torch, numpy, scipy, pytest
# and pybind11 (only its CMake files: `python -m pybind11 --cmakedir`).
# scikit-build-core is not needed: this builds with plain CMake. Logs and the
# benchmark JSON go to $OUT when set (the device tool's output folder), else
# to build/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCHS=${ATLAS_CUDA_ARCHS:-90}
LOG=${OUT:-build/gpu_check}
mkdir -p "$LOG"
start=$(date +%s)
summary=()
stage() { summary+=("$(printf '%-34s %-6s %5ss' "$1" "$2" "$3")"); }
elapsed() { echo $(( $(date +%s) - $1 )); }
finish() {
  echo
  echo "== gpu_check summary ($(elapsed "$start")s total; logs in $LOG)"
  printf '%s\n' "${summary[@]}"
  exit "$1"
}

# ---- environment ------------------------------------------------------------------------------
echo "== environment"
command -v nvcc > /dev/null || { echo "nvcc not found on PATH"; stage "environment" FAIL 0; finish 2; }
command -v cmake > /dev/null || { echo "cmake not found on PATH"; stage "environment" FAIL 0; finish 2; }
nvcc --version | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null || true
"$PY" - << 'EOF' || { stage "environment" FAIL 0; finish 2; }
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("device", torch.cuda.get_device_name(0))
EOF
if ! PYBIND11_DIR=$("$PY" -m pybind11 --cmakedir 2> /dev/null); then
  echo "pybind11 is not installed for $PY. It is needed at build time only (its headers and CMake"
  echo "files). On a machine without network, carry its wheel (pip download pybind11 on a machine with"
  echo "network, copy it over, pip install --no-index the .whl) and run this script again."
  stage "environment" FAIL 0
  finish 2
fi
stage "environment" ok 0

# ---- build ---------------------------------------------------------------------------------------
echo "== build (CUDA archs: $ARCHS)"
t=$(date +%s)
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
if cmake -S . -B build/gpu "${generator[@]}" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$PYBIND11_DIR" -DATLAS_CUDA=on -DATLAS_CUDA_ARCHS="$ARCHS" -DATLAS_BUILD_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=Release > "$LOG/build.log" 2>&1 &&
  cmake --build build/gpu -j "$(nproc)" >> "$LOG/build.log" 2>&1; then
  cp build/gpu/_native*.so python/atlas/
  grep -iE "warning|error" "$LOG/build.log" | grep -v "ptxas info" | head -20
  stage "build" ok "$(elapsed "$t")"
else
  tail -40 "$LOG/build.log"
  stage "build" FAIL "$(elapsed "$t")"
  finish 1
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import atlas, atlas.cuda as c; print(atlas.build_info()); assert c.available()" ||
  { stage "import" FAIL 0; finish 1; }

# ---- tests -------------------------------------------------------------------------------------
echo "== tests/test_cuda.py"
t=$(date +%s)
rc_tests=0
timeout 300 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$LOG/tests.log" | tail -30
rc_tests=${PIPESTATUS[0]}
stage "tests/test_cuda.py" "$([ "$rc_tests" = 0 ] && echo ok || echo FAIL)" "$(elapsed "$t")"

# ---- kernel benchmarks -----------------------------------------------------------------------------
echo "== bench/bench_cuda.py"
t=$(date +%s)
timeout 240 "$PY" bench/bench_cuda.py --json "$LOG/bench_cuda.json" 2>&1 | tee "$LOG/bench.log"
rc_bench=${PIPESTATUS[0]}
stage "bench/bench_cuda.py" "$([ "$rc_bench" = 0 ] && echo ok || echo FAIL)" "$(elapsed "$t")"

# ---- end-to-end engine timing ---------------------------------------------------------------------
# Plain decoding vs atlas (suffix speculator under the controller) with the
# engine on the GPU, Llama-shaped models of about 135M and 1B parameters with
# random weights, on a repetitive workload; outputs are checked equal.
echo "== bench/bench_engine.py --device cuda"
t=$(date +%s)
timeout 200 "$PY" bench/bench_engine.py --device cuda --sizes 135m,1b 2>&1 | tee "$LOG/engine.log"
rc_engine=${PIPESTATUS[0]}
stage "bench/bench_engine.py" "$([ "$rc_engine" = 0 ] && echo ok || echo FAIL)" "$(elapsed "$t")"
echo
grep -E "^\| " "$LOG/engine.log" || true

finish $(( rc_tests != 0 || rc_bench != 0 || rc_engine != 0 ))
