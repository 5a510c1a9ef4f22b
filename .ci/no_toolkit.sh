#!/usr/bin/env bash
# .ci/no_toolkit.sh BUILD_VENV OUT: the README's install on a machine without a CUDA toolkit,
# with the CUDA build of torch (the default `pip install torch` on Linux).
#
# In a private mount namespace (unshare -m) every CUDA toolkit directory gets an empty
# directory mounted over it and every nvcc on PATH gets an empty, non-executable file mounted over it; then the
# package is built with the default ADAKV_CUDA=AUTO and CUDA_HOME unset, installed into a copy
# of nothing but that venv, and smoke-tested (CPU ops against the reference, the CUDA library
# absent and reported as such).
set -euo pipefail
venv=$1 out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$out"; mkdir -p "$out/empty"; : > "$out/not-nvcc"; chmod 644 "$out/not-nvcc"
unshare -m bash -euo pipefail -c '
  venv=$1 out=$2 root=$3
  for d in /usr/local/cuda* /opt/cuda* /usr/lib/cuda; do
    [ -d "$d" ] && [ ! -L "$d" ] && mount --bind "$out/empty" "$d"
  done
  for n in $(which -a nvcc 2>/dev/null | sort -u); do mount --bind "$out/not-nvcc" "$n"; done
  if nvcc --version > /dev/null 2>&1 || [ -e /usr/local/cuda/bin/nvcc ]; then
    echo "the toolkit is still visible"; exit 1
  fi
  echo "toolkit hidden: nvcc on PATH does not run, /usr/local/cuda is empty"
  cd "$root"
  env -u CUDA_HOME -u CUDA_PATH -u CUDACXX "$venv/bin/python" -m pip wheel --no-build-isolation \
    --no-deps -v . -w "$out/dist" -C build-dir="$out/build" > "$out/build.log" 2>&1 \
    || { tail -n 60 "$out/build.log"; exit 1; }
  grep -E -- "-- adakv_ops: " "$out/build.log"
' bash "$venv" "$out" "$root"
whl=$(ls "$out"/dist/*.whl)
files=$(unzip -Z1 "$whl")  # not `unzip | grep -q`: pipefail
if grep -q "_C_cuda.so" <<< "$files"; then echo "CUDA library built without a toolkit?"; exit 1; fi
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall --target "$out/site" "$whl"
cd "$out"
PYTHONPATH="$out/site" "$venv/bin/python" - <<'PY'
import torch
import adakv_ops
from adakv_ops import reference as ref
assert adakv_ops.__file__.startswith(__import__("os").environ["PYTHONPATH"]), adakv_ops.__file__
assert not adakv_ops.cuda_kernels_loaded and "no CUDA kernels" in adakv_ops.cuda_load_error
torch.manual_seed(0)
q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 96, 16), torch.randn(2, 2, 96, 16)
got = adakv_ops.evict(q, k, v, budget=16, reserve=4)
want = ref.evict_ref(q, k, v, budget=16, reserve=4)
for g, w in zip(got, want):
    assert torch.equal(g, w.to(g.dtype)), "CPU-only build disagrees with the reference"
out = adakv_ops.decode_attention(torch.randn(2, 4, 1, 16), *got)
print("CPU-only build (toolkit hidden) works:", adakv_ops.cuda_load_error, tuple(out.shape))
PY
