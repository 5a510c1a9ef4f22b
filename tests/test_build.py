"""The installed binaries: stable-ABI only, and the libraries this build should have.

* Every shared library of the package may import only extern "C" symbols of torch (the stable
  C shim: ``aoti_torch_*`` / ``torch_*``), never a C++ symbol of ATen, c10 or libtorch: those
  change between torch releases, and one of them would tie the wheel to the torch it was built
  against.
* ``ADAKV_EXPECT_CUDA_LIBRARY=1`` (CI, for the wheel built with the CUDA toolkit) requires the
  CUDA library in the package, and on a CUDA build of torch requires it to load.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from conftest import HAVE_OPS, ops, requires_ops

pytestmark = requires_ops


def _libraries() -> list[pathlib.Path]:
    pkg = pathlib.Path(ops.__file__).resolve().parent
    libs = sorted(pkg.glob("_C*.so"))
    if not libs:  # editable install: the libraries live in the build tree
        import importlib.util

        for name in ("adakv_ops._C", "adakv_ops._C_cuda"):
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.origin and spec.origin.endswith(".so"):
                libs.append(pathlib.Path(spec.origin))
    return libs


@pytest.mark.skipif(shutil.which("nm") is None or shutil.which("c++filt") is None,
                    reason="binutils not installed")
def test_only_stable_abi_symbols_are_imported():
    libs = _libraries()
    assert libs, "no adakv shared library found"
    for lib in libs:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], check=True,
                             capture_output=True, text=True).stdout
        names = [line.split()[-1] for line in out.splitlines() if line.strip()]
        cxx = [n for n in names if n.startswith("_Z")]
        demangled = subprocess.run(["c++filt"], input="\n".join(cxx), check=True,
                                   capture_output=True, text=True).stdout.splitlines()
        torch_cxx = [d for d in demangled if any(d.startswith(p) or f" {p}" in d for p in
                                                  ("c10::", "at::", "torch::", "caffe2::"))]
        assert not torch_cxx, f"{lib.name} imports torch C++ symbols: {torch_cxx[:5]}"
        torch_c = [n for n in names if n.startswith(("aoti_torch_", "torch_"))]
        assert torch_c, f"{lib.name} imports no stable-ABI symbol at all"


@pytest.mark.skipif(os.environ.get("ADAKV_EXPECT_CUDA_LIBRARY") != "1",
                    reason="only for builds made with the CUDA toolkit")
def test_cuda_library_is_built_and_loads():
    names = [lib.name for lib in _libraries()]
    assert any(n.startswith("_C_cuda") for n in names), names
    if torch.version.cuda:
        assert ops.cuda_kernels_loaded, ops.cuda_load_error
    else:
        assert not ops.cuda_kernels_loaded
        assert "CPU-only" in ops.cuda_load_error


def test_cpu_ops_registered():
    assert HAVE_OPS
    for name in ("score", "allocate", "select", "compact", "evict", "append_",
                 "decode_attention", "decode_attention_lse"):
        assert hasattr(torch.ops.adakv, name), name
