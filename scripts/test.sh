#!/usr/bin/env bash
# The test suite: installs the pinned CUDA compiler wheels (NVRTC, ptxas,
# headers; no GPU needed) into .tools/cuda and libtorch 2.13.0 (for tch) into
# .tools/libtorch, then runs every test of the workspace with the `cuda`,
# `candle` and `tch` features (and the root's `candle-bench`, so `agr bench`
# with candle compiles, and `mpi`, so sharded optimizers run under mpirun:
# OpenMPI comes from Debian's packages, see scripts/mpi.sh), so generated
# kernels are compiled and assembled and both framework adapters are tested. The GPU tests are #[ignore]d: the
# summary of agr-runtime's `gpu` test lists them as ignored
# (scripts/gpu-check.sh runs them on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-tools.sh)"
eval "$(scripts/libtorch.sh)"
scripts/mpi.sh
export AGR_REQUIRE_CUDA_TOOLS="${AGR_REQUIRE_CUDA_TOOLS:-1}"
cargo test --workspace --features agr-runtime/cuda,agr-runtime/nccl,agr-runtime/candle,agr-runtime/tch,candle-bench,mpi "$@"
