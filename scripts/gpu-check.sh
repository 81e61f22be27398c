#!/usr/bin/env bash
# The GPU check, in two halves, because the GPU machine has no Rust tool chain:
#
#   scripts/gpu-check.sh build   # here: builds the GPU tests and benchmark into gpu-bundle/
#   scripts/gpu-check.sh run     # on the GPU machine: runs them, results under $OUT
#
# With the device tool: run `bash scripts/gpu-check.sh run` carrying gpu-bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle

case "${1:-}" in
build)
    rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/golden"
    cargo test -p agr-runtime --features cuda --release --no-run --message-format=json \
        | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    # The test binaries gpu, emulated and cuda_kernels, and the example gpu_bench.
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu", "emulated", "gpu_bench", "cuda_kernels"):
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        print("bundled", m["target"]["name"])
' "$bundle/bin"
    for b in gpu emulated gpu_bench cuda_kernels; do
        [ -x "$bundle/bin/$b" ] || { echo "gpu-check: $b was not built" >&2; exit 1; }
        # Without debug information: the bundle travels to the GPU machine
        # (64 MiB at most), and a backtrace still names the functions.
        strip --strip-debug "$bundle/bin/$b"
    done
    cp ../shared/golden/*.json "$bundle/golden/"
    for sub in more frontier; do
        if [ -d "../shared/golden/$sub" ]; then
            mkdir -p "$bundle/golden/$sub" && cp "../shared/golden/$sub"/*.json "$bundle/golden/$sub/"
        fi
    done
    du -sh "$bundle"
    ;;
run)
    out="${OUT:-out/gpu}"
    mkdir -p "$out"
    cuda="${CUDA_HOME:-/usr/local/cuda}"
    export LD_LIBRARY_PATH="$cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export AGR_CUDA_INCLUDE="$cuda/include"
    export AGR_GOLDEN_DIR="$PWD/$bundle/golden"
    # The repository's own references travel with the working tree.
    export AGR_REPO_GOLDEN_DIR="$PWD/tests/golden"
    (nvidia-smi || true) > "$out/nvidia-smi.txt" 2>&1
    status=0
    # The GPU tests are #[ignore]d (a run without a GPU lists them as ignored):
    # run them all here, where a missing GPU fails them.
    "$bundle/bin/gpu" --include-ignored --nocapture --test-threads=1 > "$out/gpu-tests.txt" 2>&1 || status=$?
    cat "$out/gpu-tests.txt"
    # The emulated device's suite, on the GPU: the same engine paths, with
    # the driver calls instead of host C++.
    AGR_TEST_DEVICE=cuda "$bundle/bin/emulated" --nocapture --test-threads=1 > "$out/engine-on-gpu.txt" 2>&1 || status=$?
    cat "$out/engine-on-gpu.txt"
    # The benchmark is an example program (agr-runtime/examples/gpu_bench.rs).
    "$bundle/bin/gpu_bench" > "$out/gpu-bench.txt" 2>&1 || status=$?
    (python3 scripts/torch_adamw_bench.py || true) >> "$out/gpu-bench.txt" 2>&1
    cat "$out/gpu-bench.txt"
    exit $status
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
