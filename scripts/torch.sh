#!/usr/bin/env bash
# The torch `agr bench --against torch` times beside agr: torch 2.15.0 from
# PyPI (its wheel runs on the CPU) in a virtual environment under
# .tools/torch, installed on first use (about 2 minutes). Prints the Python
# that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.tools/torch
want=2.15.0
if ! "$dir/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$want'))" 2>/dev/null; then
    echo "installing torch $want into $dir (once)" >&2
    python3 -m venv "$dir" >&2
    "$dir/bin/pip" install --no-cache-dir --quiet "torch==$want" >&2
fi
echo "$PWD/$dir/bin/python"
