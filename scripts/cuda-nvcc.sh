#!/usr/bin/env bash
# Installs a full CUDA 13.0 nvcc tool chain from pinned PyPI wheels (no GPU or
# driver needed) into .tools/cuda13, and prints the environment that builds
# candle's `cuda` feature with it (candle-kernels compiles its .cu files with
# nvcc; cudarc reads the CUDA version from `nvcc --version`). Kernels are
# built for sm_90 (H100/H200) unless CUDA_COMPUTE_CAP is set, on every core
# (candle-kernels' builder uses half of them unless CUDAFORGE_THREADS says).
# Use:  eval "$(scripts/cuda-nvcc.sh)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${AGR_CUDA_NVCC:-$root/.tools/cuda13}"
stamp="$dir/.installed-13.0"
if [ ! -f "$stamp" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target "$dir" \
        nvidia-cuda-nvcc==13.0.88 \
        nvidia-nvvm==13.0.88 \
        nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-cccl==13.0.85 >&2
    touch "$stamp"
fi
cu="$dir/nvidia/cu13"
echo "export PATH=\"$cu/bin\${PATH:+:\$PATH}\""
echo "export CUDA_ROOT=\"$cu\" CUDA_PATH=\"$cu\" CUDA_HOME=\"$cu\""
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
echo "export CUDAFORGE_THREADS=\"\${CUDAFORGE_THREADS:-$(nproc)}\""
