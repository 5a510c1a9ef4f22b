#!/usr/bin/env bash
# .ci/venv.sh DIR PACKAGE...: a fresh virtual environment at DIR with PACKAGE... installed.
set -euo pipefail
dir=$1; shift
rm -rf "$dir"
python3 -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
"$dir/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
"$dir/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
