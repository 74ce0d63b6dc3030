#!/usr/bin/env bash
# Does the `cuda` feature still compile? `cargo check --release --features cuda` on a machine with
# no GPU and no driver, with the CUDA 13.0 toolchain wheels from PyPI (the recipe of
# ../shared/gpu/build-cuda.sh: nvcc compiles candle's kernels to PTX in their build scripts;
# checking links nothing, so no driver stub is needed). CI runs it after the tests (`make
# cuda-check`); a cold run is ~1.2 GB of wheels once and ~10 min of compiling on 2 cores.
# Env: CUDA_PREFIX (where the wheels go, kept between runs); the build goes to $CARGO_TARGET_DIR-cuda (its
# own directory: the feature changes candle's features, so it shares little with
# the CPU build), CUDA_COMPUTE_CAP (default 90: H100/H200).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${CUDA_PREFIX:-$HOME/.cache/btu/cuda-pip}"
CUDA_HOME="$PREFIX/nvidia/cu13"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  # Keep nvcc at 13.0.x: a newer one emits PTX that the GPU machines' CUDA 13.0 driver refuses.
  "$PYTHON" -m pip install --quiet --no-cache-dir --disable-pip-version-check --target "$PREFIX" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
fi
( cd "$CUDA_HOME/lib" && for l in cudart:13 cublas:13 cublasLt:13 nvrtc:13 curand:10; do
    ln -sf "lib${l%%:*}.so.${l##*:}" "lib${l%%:*}.so"; done )
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" NVCC="$CUDA_HOME/bin/nvcc"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/btu/target}-cuda"
start=$(date +%s)
cargo check --release --features cuda --lib --bins --examples
echo "cuda-check: cargo check --features cuda passed in $(( $(date +%s) - start )) s (nvcc $("$NVCC" --version | grep -o 'release [0-9.]*'))" >&2
