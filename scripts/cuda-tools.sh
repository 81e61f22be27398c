#!/usr/bin/env bash
# Installs NVRTC, ptxas and the CUDA headers from pinned PyPI wheels (no GPU
# or driver needed) into .tools/cuda, and prints the environment that points
# agr at them. Use:  eval "$(scripts/cuda-tools.sh)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${AGR_CUDA_TOOLS:-$root/.tools/cuda}"
stamp="$dir/.installed-12.9"
if [ ! -f "$stamp" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target "$dir" \
        nvidia-cuda-nvrtc-cu12==12.9.86 \
        nvidia-cuda-nvcc-cu12==12.9.86 \
        nvidia-cuda-runtime-cu12==12.9.79 >&2
    touch "$stamp"
fi
nv="$dir/nvidia"
echo "export LD_LIBRARY_PATH=\"$nv/cuda_nvrtc/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
echo "export AGR_NVRTC=\"$nv/cuda_nvrtc/lib/libnvrtc.so.12\""
echo "export AGR_PTXAS=\"$nv/cuda_nvcc/bin/ptxas\""
echo "export AGR_CUDA_INCLUDE=\"$nv/cuda_runtime/include\""
