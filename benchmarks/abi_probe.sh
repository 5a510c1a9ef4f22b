#!/usr/bin/env bash
# Diagnose exceptions crashing with a given torch: build CPU-only variants, throw from each.
set -u
cd "$(dirname "$0")/.."
for v in "20 ON" "20 OFF" "17 ON" "17 OFF"; do
  set -- $v
  ( ADAKV_CUDA=OFF python3 -m pip wheel -q --no-build-isolation --no-deps . -w /tmp/w_$1_$2 \
      -Cbuild-dir=/tmp/b_$1_$2 -Ccmake.define.ADAKV_CXX_STANDARD=$1 \
      -Ccmake.define.ADAKV_HIDDEN_VISIBILITY=$2 > /tmp/log_$1_$2 2>&1 || tail -5 /tmp/log_$1_$2 ) &
done
wait
for v in "20 ON" "20 OFF" "17 ON" "17 OFF"; do
  set -- $v
  so=$(find /tmp/b_$1_$2 -name "_C.so" | head -1)
  python3 -c "
import torch; torch.ops.load_library('$so')
try:
    torch.ops.adakv.allocate(torch.rand(1,1,4), -1)
except RuntimeError as e: print('std=$1 hidden=$2: caught', str(e)[:50])
" > /tmp/probe.out 2>&1; rc=$?
  echo "std=$1 hidden=$2 rc=$rc $(tail -c 120 /tmp/probe.out)"
done
