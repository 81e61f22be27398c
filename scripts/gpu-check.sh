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
    # The test binaries gpu, emulated and cuda_kernels, and the example gpu_bench.
    cargo test -p agr-runtime --features cuda,nccl --release --no-run --message-format=json \
        | python3 scripts/bundle.py "$bundle/bin" gpu emulated gpu_bench cuda_kernels
    for b in gpu emulated gpu_bench cuda_kernels; do
        [ -x "$bundle/bin/$b" ] || { echo "gpu-check: $b was not built" >&2; exit 1; }
        # Without debug information: the bundle travels to the GPU machine
        # (64 MiB at most), and a backtrace still names the functions.
        strip --strip-debug "$bundle/bin/$b"
    done
    # candle on the GPU: the candle suite, the main job and the candle-nn
    # comparison, built with candle's CUDA kernels (nvcc 13 from PyPI) and
    # linked against stand-ins for libcuda and cuBLAS (the GPU machine has
    # the real ones). Their own target folder: other flags, other features.
    (
        eval "$(scripts/cuda-nvcc.sh)"
        eval "$(scripts/cuda-link-stubs.sh)"
        export CARGO_TARGET_DIR=target/gpu-candle
        cargo test -p agr-runtime --features candle-cuda --release --test candle --no-run --message-format=json \
            | python3 scripts/bundle.py "$bundle/bin" candle
        cargo build --release --features candle-cuda --example digits --example candle_gpu_bench --message-format=json \
            | python3 scripts/bundle.py "$bundle/bin" digits candle_gpu_bench
    )
    # Each holds candle's kernels (about 50 MB stripped); together, packed with
    # xz, they fit the 64 MiB that travels to the GPU machine.
    for b in candle digits candle_gpu_bench; do
        [ -x "$bundle/bin/$b" ] || { echo "gpu-check: $b was not built" >&2; exit 1; }
        strip "$bundle/bin/$b"
    done
    python3 -c '
import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz", preset=6) as t:
    for path in sys.argv[2:]:
        t.add(path, arcname=path.rsplit("/", 1)[1])
' "$bundle/candle-cuda.tar.xz" "$bundle/bin/candle" "$bundle/bin/digits" "$bundle/bin/candle_gpu_bench"
    rm "$bundle/bin/candle" "$bundle/bin/digits" "$bundle/bin/candle_gpu_bench"
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
    # NCCL (one rank, in the gpu suite): libnccl from the machine's
    # nvidia-nccl wheel if it has one (too large to travel with the bundle).
    nccl_lib="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)"
    if [ -n "$nccl_lib" ] && [ -d "$nccl_lib" ]; then
        export LD_LIBRARY_PATH="$nccl_lib:$LD_LIBRARY_PATH"
    fi
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
    # candle on the GPU. Its binaries link CUDA 13's cuBLAS, cuRAND and NVRTC:
    # the ones of the machine's PyTorch wheels.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$bundle/candle-cuda.tar.xz" "$bundle/bin"
    nvidia_libs="$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null || true)"
    export LD_LIBRARY_PATH="${nvidia_libs:+$nvidia_libs:}$LD_LIBRARY_PATH"
    # The candle suite with its variables on the GPU (golden files, half
    # precision, two devices, errors), in place on candle's stream.
    AGR_TEST_CANDLE_DEVICE=cuda:0 "$bundle/bin/candle" --include-ignored --nocapture --test-threads=1 > "$out/candle-on-gpu.txt" 2>&1 || status=$?
    cat "$out/candle-on-gpu.txt"
    # The main job with the model on the GPU against the same seeds on the
    # CPU: the forward and backward passes are cuBLAS's, not the CPU's, so
    # the curves agree to rounding, not bit for bit.
    job=(--optimizers adamw,adamw_agr,adan_agr --seeds 2 --epochs 5 --data data/digits.csv.gz)
    { "$bundle/bin/digits" "${job[@]}" --out "$out/digits-cpu" \
        && "$bundle/bin/digits" "${job[@]}" --device cuda --out "$out/digits-cuda" \
        && python3 scripts/compare_curves.py "$out/digits-cpu/curves.csv" "$out/digits-cuda/curves.csv" 1e-2 \
            "digits with the model on the GPU against the CPU"; } > "$out/digits-gpu.txt" 2>&1 || status=$?
    cat "$out/digits-gpu.txt"
    "$bundle/bin/candle_gpu_bench" > "$out/candle-gpu-bench.txt" 2>&1 || status=$?
    cat "$out/candle-gpu-bench.txt"
    # tch on the GPU needs a CUDA libtorch 2.13 (tch 0.26's), and the GPU
    # machine has PyTorch 2.11 and no network: not run (its logic is tested
    # by the test command, behind the tch adapter's facts seam).
    echo "tch on the GPU: not run (needs a CUDA libtorch 2.13; this machine has PyTorch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?'))" | tee "$out/tch-gpu.txt"
    exit $status
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
