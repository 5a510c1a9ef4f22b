#!/usr/bin/env bash
# .ci/asan.sh BUILD_VENV TEST_VENV: builds the CPU library with -fsanitize=address,undefined
# (ADAKV_SANITIZE) in BUILD_VENV and runs the op tests against it in TEST_VENV (its wheel is
# replaced by the sanitized build). Any ASan or UBSan report aborts the test process.
#
# allocator_may_return_null: the adversarial allocation-failure cases ask for more than any
# machine has; ASan's allocator would abort the process instead of returning NULL (torch then
# raises and adakv reports it).
# libasan must come first in the process and libstdc++ must be loaded before it resolves
# __cxa_throw (python itself does not link libstdc++), hence both in LD_PRELOAD.
set -euo pipefail
build=$1 test=$2
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.ci-out/asan"
rm -rf "$out"; mkdir -p "$out"
cd "$root"
ADAKV_CUDA=OFF ADAKV_SANITIZE=address,undefined "$build/bin/python" -m pip wheel \
  --no-build-isolation --no-deps -v . -w "$out/dist" -C build-dir="$out/build" > "$out/build.log" 2>&1 \
  || { tail -n 60 "$out/build.log"; exit 1; }
grep -E -- "-- adakv_ops: " "$out/build.log"
"$test/bin/python" -m pip install -q --no-deps --force-reinstall "$out"/dist/*.whl
ldd "$test"/lib/python3*/site-packages/adakv_ops/_C.so | grep -E "asan|ubsan"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
ADAKV_REQUIRE_EXTENSION=1 \
  "$test/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_cpu_ops.py tests/test_errors.py tests/test_opcheck.py tests/test_adversarial.py \
    tests/test_paged.py tests/test_store.py tests/test_followup_ops.py tests/test_composite.py
