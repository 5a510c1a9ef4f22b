#!/usr/bin/env bash
# One call on a GPU machine: build, CUDA tests, compute-sanitizer, benchmarks.
# Usage: bash benchmarks/run_gpu_checks.sh [build|test|sanitize|bench|all]...  (default: all)
# Logs and results go to ${OUT:-/tmp/adakv-gpu} (the device tool's $OUT folder when set).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/adakv-gpu}
mkdir -p "$out"
steps=${*:-all}
export PYTHONUNBUFFERED=1
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
PY=${PY:-python3}
# The GPU image puts a GCC at /opt/gcc first on PATH whose libstdc++ ends up linked into the
# module (a C++ exception then crashes inside its private iostreams); use the system compiler.
# (that image also exports CXX=/opt/gcc/bin/g++, so override it there)
if [ -x /usr/bin/g++ ] && [[ -z "${CXX:-}" || "${CXX}" == /opt/gcc/* ]]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++
fi
status=0
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }

if has build; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  start=$(date +%s)
  rm -rf build/cp*  # a cached CMAKE_CXX_COMPILER would ignore the compiler chosen above
  # sm_90a only on the device: halves the build time; CI builds both targets.
  ADAKV_CUDA_ARCHS=${ADAKV_CUDA_ARCHS:-90a} CMAKE_BUILD_PARALLEL_LEVEL=16 \
    $PY -m pip install --no-build-isolation -e . -v > "$out/build.log" 2>&1 \
    || { tail -n 60 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
  grep -E "adakv_ops: |ptxas.*spill" "$out/build.log" | sort | uniq | head -20
  echo "build: $(( $(date +%s) - start )) s"
fi
if has test; then
  $PY -m pytest tests -q -k "cuda or CUDA" -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" | grep -E "FAILED|ERROR|Fatal|passed|failed" | head -n 60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if has cputests; then
  $PY -m pytest tests -q -p no:cacheprovider -k "not cuda and not CUDA" 2>&1 | tee "$out/test_cpu.log" | tail -n 30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest tests -x -q -m sanitize \
      -p no:cacheprovider > "$out/sanitize_$tool.log" 2>&1
    rc=$?
    echo "compute-sanitizer $tool: rc=$rc $(grep -E 'ERROR SUMMARY|passed|failed' "$out/sanitize_$tool.log" | tail -n 2 | tr '\n' ' ')"
    [ $rc -eq 0 ] || status=1
  done
fi
if has bench; then
  $PY benchmarks/bench_ops.py --out "$out/ops.jsonl" --md "$out/ops.md" 2>&1 | tee "$out/bench_ops.log" | tail -n 40
fi
exit $status
