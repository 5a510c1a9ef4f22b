#!/usr/bin/env bash
# One call on a GPU machine: build, CUDA tests, compute-sanitizer, benchmarks.
# Usage: bash benchmarks/run_gpu_checks.sh [wheel=PATH|build|test|cputests|alltests|sanitize|
#                                            sanitizerotary|bench|benchpaged|
#                                            benchprefill|benchserve|benchstreams|benchpeers|
#                                            benchfollowups|benchitl|benchautotune|benchprofile|
#                                            benchsplits|benchrotary|benchblas|benchgemm|all]
#                                            [bundle]
#   benchpaged / benchprefill / benchserve / benchstreams / benchpeers / benchfollowups: the
#   evidence runs of issues 12, 13 and 14 (each a few minutes on an H100/H200; not in "all");
#   benchitl: issue 13's A/B of max_prefill_tokens (inter-token gaps, TTFT by prompt length);
#   benchautotune: the decode step at batch 64 compiled with max-autotune (issue 13's 85%);
#   benchprofile: where the device time of a step goes at batch 64 and 128 (torch.profiler);
#   benchsplits: the paged attention's split count at the engine's shapes (1K keys per head,
#   even and Ada-like heads) and the engine's step with one split per head forced;
#   sanitizerotary: memcheck / racecheck over paged_append_rotary_'s CUDA tests and memcheck
#   over its adversarial cases (a subset of sanitize);
#   benchrotary: paged_append_rotary_ against the compiled RoPE + copies + append it replaces
#   (bench_rotary_append.py, per layer, CUDA graphs), then the engine at batch 64 / 128 with and
#   without Engine(rotary_append=True), each with --profile;
#   benchblas: the engine at batch 64 / 128 / 256 with Engine(blas="auto") and blas=None (the
#   decode GEMMs' library); benchgemm: bench_decode_gemm.py with cuBLAS and with cuBLASLt
#   (default: all); bundle (give it last): packs every file of the output folder into one
#   results.tar.gz (the device tool brings back at most 8 files). wheel=PATH installs a
#   prebuilt wheel (the one CI builds, brought here unchanged) into $OUT/../site instead of
#   building, and tests that.
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
wheel=""
for a in $steps; do [[ $a == wheel=* ]] && wheel=${a#wheel=}; done
if [ -n "$wheel" ]; then
  site=${SITE:-/tmp/adakv-site}
  rm -rf "$site"
  $PY -m pip install -q --no-deps --no-index --target "$site" "$wheel" || { echo "WHEEL INSTALL FAILED"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ADAKV_REQUIRE_EXTENSION=1 ADAKV_EXPECT_CUDA_LIBRARY=1
  $PY -c "import torch, adakv_ops; print('torch', torch.__version__, '| wheel', '$(basename "$wheel")', '| from', adakv_ops.__file__, '| CUDA kernels:', adakv_ops.cuda_kernels_loaded, adakv_ops.cuda_load_error or '')"
fi
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
if has alltests; then  # the whole suite, CPU and CUDA (what CI runs, plus the CUDA cases)
  $PY -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$out/test_all.log" | grep -E "FAILED|ERROR|Fatal|passed|failed" | head -n 60
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
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
  # every adversarial CUDA case (malicious metadata, huge sizes, NaN/Inf) under memcheck: the
  # kernels must never read or write out of bounds, whatever the input
  # (--report-api-errors no: the allocation-failure cases make cudaMalloc fail on purpose)
  compute-sanitizer --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 $PY -m pytest tests/test_adversarial.py tests/test_paged.py \
    -q -k cuda -p no:cacheprovider > "$out/sanitize_adversarial.log" 2>&1
  rc=$?
  echo "compute-sanitizer memcheck, adversarial + paged: rc=$rc $(grep -E 'ERROR SUMMARY|passed|failed' "$out/sanitize_adversarial.log" | tail -n 2 | tr '\n' ' ')"
  [ $rc -eq 0 ] || status=1
fi
if [[ " $steps " == *" sanitizerotary "* ]]; then  # paged_append_rotary_ alone (quicker than sanitize)
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 99 $PY -m pytest tests/test_paged_rotary.py -q -k cuda \
      -p no:cacheprovider > "$out/sanitize_rotary_$tool.log" 2>&1
    rc=$?
    echo "compute-sanitizer $tool, paged_append_rotary_: rc=$rc $(grep -E 'ERROR SUMMARY|passed|failed' "$out/sanitize_rotary_$tool.log" | tail -n 2 | tr '\n' ' ')"
    [ $rc -eq 0 ] || status=1
  done
  compute-sanitizer --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 \
    $PY -m pytest tests/test_adversarial.py -q -k "prappend and cuda" -p no:cacheprovider \
    > "$out/sanitize_rotary_adversarial.log" 2>&1
  rc=$?
  echo "compute-sanitizer memcheck, adversarial prappend: rc=$rc $(grep -E 'ERROR SUMMARY|passed|failed' "$out/sanitize_rotary_adversarial.log" | tail -n 2 | tr '\n' ' ')"
  [ $rc -eq 0 ] || status=1
fi
if has benchpaged; then
  $PY benchmarks/bench_paged.py --pages 16,64 --schedules default,balanced --graph-all \
    --out "$out/paged.jsonl" 2>&1 | tee "$out/bench_paged.log" | tail -n 20
fi
if [[ " $steps " == *" benchprefill "* ]]; then
  timeout 420 $PY benchmarks/bench_prefill.py --lengths 32768,131072 --chunks 16384 --orders layer,chunk \
    --out "$out/prefill.jsonl" > "$out/bench_prefill.log" 2>&1; echo "bench_prefill rc=$?"
  sed -n '/^      N  chunk/,$p' "$out/bench_prefill.log"
fi
if [[ " $steps " == *" benchserve "* ]]; then
  timeout 420 $PY benchmarks/bench_serve.py --requests 2 --prompt 32768 --fork-to 64,128,256 --compile \
    --warmup 3 --steps 12 --out "$out/serve32k.jsonl" > "$out/bench_serve.log" 2>&1; echo "bench_serve rc=$?"
  sed -n '/^prompt /,$p' "$out/bench_serve.log"
fi
if [[ " $steps " == *" benchstreams "* ]]; then  # issue 13's three streams (Engine.warmup first)
  timeout 400 $PY benchmarks/bench_serve.py --requests 32 --prompt 32768 --new 256,1024 --compile \
    --out "$out/stream32k.jsonl" > "$out/stream32k.log" 2>&1; echo "stream 32K rc=$?"; tail -n 1 "$out/stream32k.log"
  timeout 300 $PY benchmarks/bench_serve.py --requests 16 --prompt 4096 --new 8192,8192 --max-growth 256 \
    --compile --out "$out/heavy.jsonl" > "$out/heavy.log" 2>&1; echo "decode-heavy rc=$?"; tail -n 1 "$out/heavy.log"
  timeout 500 $PY benchmarks/bench_serve.py --requests 12 --prompt-mix 8192,32768,131072 --new 256,1024 \
    --compile --out "$out/mixed.jsonl" > "$out/mixed.log" 2>&1; echo "mixed 8K-128K rc=$?"; tail -n 1 "$out/mixed.log"
fi
if [[ " $steps " == *" benchpeers "* ]]; then  # the engine at batch 8 x 32K and its peers, same run
  timeout 500 $PY benchmarks/bench_serve.py --requests 2 --prompt 32768 --fork-to 8 --compile \
    --warmup 3 --steps 12 --peers 8 --peer-new 64 --out "$out/peers.jsonl" > "$out/peers.log" 2>&1
  echo "bench_serve peers rc=$?"; tail -n 12 "$out/peers.log"
fi
if [[ " $steps " == *" benchitl "* ]]; then  # 8K and 128K prompts: split prefill vs whole
  for mpt in 16384 0; do
    timeout 200 $PY benchmarks/bench_serve.py --requests 4 --seed 2 --prompt-mix 8192,131072 \
      --new 256,512 --compile --max-prefill-tokens $mpt --out "$out/itl-mpt$mpt.jsonl" \
      > "$out/itl-mpt$mpt.log" 2>&1; echo "bench_serve max_prefill_tokens=$mpt rc=$?"
    tail -n 2 "$out/itl-mpt$mpt.log"
  done
fi
if [[ " $steps " == *" benchautotune "* ]]; then  # the decode figures print before the join
  timeout 300 $PY benchmarks/bench_serve.py --requests 1 --prompt 32768 --fork-to 64 --compile \
    --mode max-autotune --warmup 3 --steps 12 --out "$out/serve-autotune.jsonl" \
    > "$out/autotune.log" 2>&1; echo "bench_serve max-autotune rc=$?"
  grep -E "^batch |^prompt |^ +64 " "$out/autotune.log" | tail -n 4
fi
if [[ " $steps " == *" benchprofile "* ]]; then  # device vs wall time, kernels by category
  timeout 300 $PY benchmarks/bench_serve.py --requests 1 --prompt 32768 --fork-to 64,128 --compile \
    --profile --warmup 3 --steps 12 --out "$out/serve-profile.jsonl" > "$out/profile.log" 2>&1
  echo "bench_serve --profile rc=$?"; sed -n '/^prompt /,$p' "$out/profile.log"
fi
if [[ " $steps " == *" benchsplits "* ]]; then  # the attention's split count at the engine's shapes
  for sg in 0 1; do  # even heads (the random model's) and Ada-like ones
    timeout 120 $PY benchmarks/bench_paged.py --no-flex --no-flashinfer --pages 64 --graph-all --quick \
      --configs 64x1024,128x1024,64x2048 --sigma $sg --schedules default,split1,split2,split3,split4 \
      --out "$out/paged-splits-sigma$sg.jsonl" > "$out/paged-splits-sigma$sg.log" 2>&1
    echo "bench_paged splits sigma $sg rc=$?"; grep -E "^B=" "$out/paged-splits-sigma$sg.log" | grep -v "B=  1" | cut -c1-100
  done
  for sp in "" 1; do  # the engine's step with the heuristic's splits, then one split per head
    ADAKV_DECODE_SPLITS=$sp timeout 240 $PY benchmarks/bench_serve.py --requests 1 --prompt 32768 \
      --fork-to 64,128 --compile --warmup 3 --steps 12 --out "$out/serve-splits${sp:-auto}.jsonl" \
      > "$out/serve-splits${sp:-auto}.log" 2>&1; echo "bench_serve ADAKV_DECODE_SPLITS=${sp:-auto} rc=$?"
    sed -n '/^batch  step/,$p' "$out/serve-splits${sp:-auto}.log"
  done
fi
if [[ " $steps " == *" benchrotary "* ]]; then  # same call: the A/B of Engine(rotary_append=)
  timeout 120 $PY benchmarks/bench_rotary_append.py --out "$out/rotary-append.jsonl" \
    > "$out/rotary-append.log" 2>&1; echo "bench_rotary_append rc=$?"; tail -n 4 "$out/rotary-append.log"
  for r in "" --rotary-append; do
    name=serve-rotary${r:+-on}
    timeout 280 $PY benchmarks/bench_serve.py --requests 1 --prompt 32768 --fork-to 64,128 \
      --compile --warmup 3 --steps 12 $r --profile --out "$out/$name.jsonl" > "$out/$name.log" 2>&1
    echo "bench_serve ${r:---no rotary append} --profile rc=$?"; sed -n '/^batch  step/,$p' "$out/$name.log"
  done
fi
if [[ " $steps " == *" benchblas "* ]]; then  # same machine, same call: the A/B of Engine(blas=)
  for b in auto none; do
    timeout 280 $PY benchmarks/bench_serve.py --requests 1 --prompt 32768 --fork-to 64,128,256 \
      --compile --warmup 3 --steps 12 --blas $b --out "$out/serve-blas-$b.jsonl" \
      > "$out/serve-blas-$b.log" 2>&1; echo "bench_serve --blas $b rc=$?"
    sed -n '/^batch  step/,$p' "$out/serve-blas-$b.log"
  done
fi
if [[ " $steps " == *" benchgemm "* ]]; then  # the decode GEMMs alone, each BLAS library
  timeout 200 $PY benchmarks/bench_decode_gemm.py --out "$out/decode-gemm.jsonl" \
    > "$out/decode-gemm.log" 2>&1; echo "bench_decode_gemm rc=$?"
  TORCH_BLAS_PREFER_CUBLASLT=1 timeout 200 $PY benchmarks/bench_decode_gemm.py --no-compile \
    --out "$out/decode-gemm-cublaslt.jsonl" > "$out/decode-gemm-lt.log" 2>&1
  echo "bench_decode_gemm (cuBLASLt) rc=$?"
  tail -n 19 "$out/decode-gemm.log"; tail -n 16 "$out/decode-gemm-lt.log"
fi
if [[ " $steps " == *" benchfollowups "* ]]; then
  timeout 300 $PY benchmarks/bench_followups.py --out "$out/followups.jsonl" > "$out/bench_followups.log" 2>&1
  echo "bench_followups rc=$?"; sed -n '/^| eviction of one layer/,$p' "$out/bench_followups.log"
fi
if has bench; then
  $PY benchmarks/bench_ops.py --cases "${BENCH_CASES:-evict,append,decode_b1,decode_bN,graph}" \
    --out "$out/ops.jsonl" --md "$out/ops.md" 2>&1 | tee "$out/bench_ops.log" | tail -n 40
fi
if [[ " $steps " == *" bundle "* ]]; then  # last: one archive instead of many files
  # (the device tool brings back at most 8 files of $OUT: the run of 2026-12-08 lost a record)
  (cd "$out" && files=$(ls -A | grep -v '^results\.tar\.gz$') && [ -n "$files" ] \
     && tar czf results.tar.gz $files && rm -rf $files) && echo "bundled into $out/results.tar.gz"
fi
exit $status
