#!/usr/bin/env bash
# Link-time stand-ins for the CUDA libraries candle's `cuda` feature links
# (libcuda, cuBLAS, cuBLASLt, cuRAND, NVRTC), so that a binary for the GPU
# machine links here, where there is no driver and no cuBLAS. Each stub is an
# empty shared library with the real one's SONAME that defines every function
# cudarc declares for it: the binary records the real names, and on the GPU
# machine the driver's libcuda and the CUDA wheels' libraries are loaded
# instead. Nothing linked against these runs here: they are for building only.
# Needs the nvcc tool chain first:  eval "$(scripts/cuda-nvcc.sh)"
# Use:  eval "$(scripts/cuda-link-stubs.sh)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
: "${CUDA_ROOT:?run eval \"\$(scripts/cuda-nvcc.sh)\" first}"
stubs="$root/.tools/cuda-link-stubs"
cudarc="$(cd "$root" && cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
pkgs = json.load(sys.stdin)["packages"]
print(os.path.dirname(next(p["manifest_path"] for p in pkgs if p["name"] == "cudarc")))
')"
mkdir -p "$stubs"
# library name, SONAME on the GPU machine (CUDA 13), cudarc module declaring it
while read -r lib soname module; do
    names="$(grep -ohE '^\s+fn (cu|nvrtc)[A-Za-z0-9_]+\(' "$cudarc/src/$module/sys/mod.rs" \
        | sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/\1/' | sort -u)"
    [ -n "$names" ] || { echo "cuda-link-stubs: no functions found for $lib" >&2; exit 1; }
    printf 'void %s(void) {}\n' $names > "$stubs/$lib.c"
    cc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
done <<'LIBS'
cuda libcuda.so.1 driver
cublas libcublas.so.13 cublas
cublasLt libcublasLt.so.13 cublaslt
curand libcurand.so.10 curand
nvrtc libnvrtc.so.13 nvrtc
LIBS
# candle-kernels links the CUDA runtime by its development name.
ln -sf "$CUDA_ROOT/lib/libcudart.so.13" "$stubs/libcudart.so"
echo "export RUSTFLAGS=\"-L native=$stubs\${RUSTFLAGS:+ \$RUSTFLAGS}\""
