#!/usr/bin/env bash
# Installs what the `mpi` feature builds and runs with, from Debian's
# packages, when it is missing: OpenMPI (mpirun, libmpi, mpicc) and libclang
# (the mpi crate generates its bindings with bindgen).
set -euo pipefail
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 \
    && compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null; then
    exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    openmpi-bin libopenmpi-dev libclang-dev >&2
