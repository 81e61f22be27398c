#!/usr/bin/env bash
# Installs libtorch 2.13.0 (what tch 0.26 builds against) from the pinned
# PyPI wheel torch==2.13.0 into .tools/libtorch, and prints the environment
# that points tch at it. Use:  eval "$(scripts/libtorch.sh)"
#
# The wheel is a CUDA build. Its CPU libraries need only two small CUDA
# runtime libraries (libcudart, libcupti, from their own pinned wheels); the
# CUDA half (libtorch_cuda.so and its GBs of cuBLAS, cuDNN, NCCL) is left out,
# so tch builds and runs CPU-only here. For CUDA tensors, point LIBTORCH at a
# full install instead (e.g. the torch of the GPU machine's Python).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${AGR_LIBTORCH:-$root/.tools/libtorch}"
stamp="$dir/.installed-2.13.0"
if [ ! -f "$stamp" ]; then
    dl="$dir.download"
    rm -rf "$dir" "$dl"
    mkdir -p "$dl"
    python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps --dest "$dl" \
        torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 >&2
    python3 - "$dl" "$dir" <<'EOF' >&2
import glob, os, shutil, sys, zipfile
dl, out = sys.argv[1], sys.argv[2]
keep_libs = {"libtorch_cpu.so", "libtorch.so", "libc10.so", "libgomp.so.1", "libshm.so",
             "libtorch_global_deps.so", "libcudart.so.13", "libcupti.so.13"}
os.makedirs(os.path.join(out, "lib"), exist_ok=True)
for wheel in glob.glob(os.path.join(dl, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.endswith("/"):
                continue
            if name.startswith(("torch/include/", "torch/share/")):
                target = os.path.join(out, name[len("torch/"):])
            elif base in keep_libs and "/lib/" in name:
                target = os.path.join(out, "lib", base)
            else:
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
EOF
    rm -rf "$dl"
    touch "$stamp"
fi
echo "export LIBTORCH=\"$dir\""
echo "export LIBTORCH_CXX11_ABI=1"
echo "export LD_LIBRARY_PATH=\"$dir/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
