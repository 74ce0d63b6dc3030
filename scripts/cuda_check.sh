#!/usr/bin/env bash
# Does the `cuda` feature still compile? `cargo check --release --features cuda` on a machine with
# no GPU and no driver, with the CUDA 13.0 toolchain wheels from PyPI (the recipe of
# ../shared/gpu/build-cuda.sh: nvcc compiles candle's kernels to PTX in their build scripts;
# checking links nothing, so no driver stub is needed). CI runs it after the tests (`make
# cuda-check`); a cold run is ~1.2 GB of wheels once and ~10 min of compiling on 2 cores.
# `scripts/cuda_check.sh build` builds the binary instead (for a GPU machine: linked against a
# stub libcuda.so made from cudarc's symbol list, as ../shared/gpu/build-cuda.sh does; the real
# driver library comes from the GPU machine) and copies it, stripped, with run.sh into .gpu/.
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
if [ "${1:-check}" != build ]; then
  cargo check --release --features cuda --lib --bins --examples
  echo "cuda-check: cargo check --features cuda passed in $(( $(date +%s) - start )) s (nvcc $("$NVCC" --version | grep -o 'release [0-9.]*'))" >&2
  exit 0
fi
# The link-time stub of the driver library (never shipped: the GPU machine has the real one).
cudarc=$(cargo metadata --format-version 1 --features cuda | "$PYTHON" -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
mkdir -p "$CUDA_HOME/lib/stubs"
grep -ohP '\bfn \Kcu[A-Z]\w*(?=\s*\()' "$cudarc/src/driver/sys/mod.rs" | sort -u \
  | sed 's/.*/void &(void) {}/' > "$CUDA_HOME/lib/stubs/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" "$CUDA_HOME/lib/stubs/cuda_stub.c"
export LIBRARY_PATH="$CUDA_HOME/lib/stubs:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
cargo build --release --features cuda --bin btu
mkdir -p .gpu
cp "$CARGO_TARGET_DIR/release/btu" .gpu/btu && strip .gpu/btu
cp ../shared/gpu/run.sh .gpu/run.sh && chmod +x .gpu/run.sh
echo "cuda build: .gpu/btu in $(( $(date +%s) - start )) s" >&2
