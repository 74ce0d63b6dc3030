#!/usr/bin/env bash
# Issue 13's GPU benchmark: btu against PyTorch eager on the same GPU, everything in one device
# call (the device time is scarce: 15 minutes per task, start-up included).
#
#   here:   scripts/gpu_bench.sh prepare    # .gpu/: the CUDA binary (scripts/cuda_check.sh build,
#                                           # build-cuda.sh's recipe), MiniLM as int8, SST-2, baseline
#   there:  run(command: "scripts/gpu_bench.sh run", carry: [".gpu"], timeout_s: 540)
#
# `run` writes to $OUT (the device tool's folder; /tmp/gpu-bench elsewhere):
#   minilm.json     round 1 and training samples/s, btu vs torch, all-MiniLM-L6-v2, 2,000 SST-2 rows
#   bert-base.json  the same for a BERT-base-sized random model (12 x 768, MiniLM's tokenizer)
#   baseline.jsonl  ../shared/gpu/baseline/btu_round1_torch.py (the reference figures' script)
#   detect-P.json, train-P.json, precision.json
#                   --precision f32 / tf32 / bf16: detection and one training epoch on the same
#                   rows, and how far tf32's and bf16's ranks are from f32's
#   defend.json     the whole defence (btu defend, pipelines/default/sst2-addword.toml: detect,
#                   victim 2 epochs, verify, unlearn, eval) on the GPU, with its wall time
#   gpu.txt         nvidia-smi
# The carry limit is 64 MiB: the binary goes xz-compressed (30 MB) and MiniLM as int8 with per-row
# scales (23 MB; converted back to fp32 there: the speed does not depend on the values' last bits). On a machine without a GPU,
# `BENCH_DEVICE=cpu scripts/gpu_bench.sh run` runs the same steps on the CPU with the CPU binary
# (BTU=path; ROWS=... and DEFEND=0 to keep it short), which checks the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
BENCH=$GPU/bench
PY=${PYTHON:-python3}

# Pack / unpack a safetensors file with numpy alone (no torch or safetensors package needed):
# Q8 stores each 2-D fp32 tensor as int8 with one fp32 scale per row (`NAME.q8scale`) and every
# other fp32 tensor as fp16 (MiniLM: 90.9 -> 23 MB); F32 restores fp32. The values change in their
# last bits, the speed does not.
convert() { # SRC DST Q8|F32
  "$PY" - "$1" "$2" "$3" <<'PYEOF'
import json, struct, sys
import numpy as np
src, dst, to = sys.argv[1:]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
body = raw[8 + n:]
kinds = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I64": np.int64}
def get(v):
    a = np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]], dtype=kinds[v["dtype"]])
    return a.reshape(v["shape"])
tensors, meta = {}, header.pop("__metadata__", None)
for k, v in header.items():
    if k.endswith(".q8scale"):
        continue
    a = get(v)
    if to == "Q8" and a.dtype == np.float32 and a.ndim == 2:
        scale = np.maximum(np.abs(a).max(axis=1, keepdims=True), 1e-12) / 127.0
        tensors[k] = np.round(a / scale).astype(np.int8)
        tensors[k + ".q8scale"] = scale.astype(np.float32)
    elif to == "Q8" and a.dtype == np.float32:
        tensors[k] = a.astype(np.float16)
    elif to == "F32" and a.dtype == np.int8:
        tensors[k] = (a.astype(np.float32) * get(header[k + ".q8scale"])).astype(np.float32)
    elif to == "F32" and a.dtype == np.float16:
        tensors[k] = a.astype(np.float32)
    else:
        tensors[k] = a
out, parts, off = {}, [], 0
if meta:
    out["__metadata__"] = meta
names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int8): "I8", np.dtype(np.int64): "I64"}
for k in sorted(tensors):
    b = np.ascontiguousarray(tensors[k]).tobytes()
    out[k] = {"dtype": names[tensors[k].dtype], "shape": list(tensors[k].shape), "data_offsets": [off, off + len(b)]}
    parts.append(b)
    off += len(b)
h = json.dumps(out, separators=(",", ":")).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(parts))
PYEOF
}

prepare() {
  bash scripts/cuda_check.sh build
  mkdir -p "$BENCH/minilm"
  cp ../shared/datasets/sst2/{train,dev,test}.parquet "$BENCH/"
  cp ../shared/gpu/baseline/btu_round1_torch.py "$BENCH/"
  for f in config.json tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json; do
    cp "models/all-MiniLM-L6-v2/$f" "$BENCH/minilm/"
  done
  rm -f "$BENCH/minilm/model.f16.safetensors"
  PY=.venv/bin/python convert models/all-MiniLM-L6-v2/model.safetensors "$BENCH/minilm/model.q8.safetensors" Q8
  # Only btu travels among the binaries; compressed (python's lzma unpacks it there).
  xz -T0 -6 -f "$GPU/btu"
  du -sh "$GPU"; du -sb "$GPU" | awk '{ if ($1 > 64 * 1048576) { print "over the 64 MiB carry limit"; exit 1 } }'
}

# --precision: detection (MiniLM, SST-2 rows poisoned with `cf` at 10 %, btu's default method) and
# one training epoch in f32, tf32 (CUDA only) and bf16 on the same rows: each summary (seconds,
# samples/s), and precision.json: how far tf32's and bf16's ranks are from f32's
# (scripts/compare_detections.py).
precision() { # BTU WORK OUT DEVICE ROWS
  local btu=$1 work=$2 out=$3 device=$4 rows=$5 precs="f32 bf16" others=()
  [ "$device" = cuda ] && precs="f32 tf32 bf16"
  $btu --quiet poison --input "$BENCH/train.parquet" --output "$work/poisoned.parquet" \
    --attack add-word --trigger cf --rate 0.1 --mode dirty --target 1 > /dev/null
  for p in $precs; do
    $btu --quiet detect --model "$work/minilm" --corpus "$work/poisoned.parquet" --limit "$rows" \
      --prior-neutral --precision "$p" --device "${device/cuda/cuda:0}" --out "$work/det-$p" \
      > "$out/detect-$p.json"
    $btu --quiet train --model "$work/minilm" --corpus "$work/poisoned.parquet" --limit "$rows" \
      --epochs 1 --precision "$p" --device "${device/cuda/cuda:0}" --out "$work/train-$p" \
      > "$out/train-$p.json"
    [ "$p" = f32 ] || others+=("$work/det-$p")
  done
  "$PY" scripts/compare_detections.py --btu "$btu" "$work/det-f32" "${others[@]}" > "$out/precision.json"
}

run() {
  local out=${OUT:-/tmp/gpu-bench} device=${BENCH_DEVICE:-cuda} rows=${ROWS:-2000} work
  work=$(mktemp -d)
  mkdir -p "$out"
  local btu=${BTU:-}
  if [ -z "$btu" ]; then
    [ -f "$GPU/btu" ] || "$PY" -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open('$GPU/btu.xz'), open('$GPU/btu','wb'))"
    chmod +x "$GPU/btu"
    btu="$GPU/run.sh btu"
  fi
  cp -r "$BENCH/minilm" "$work/minilm"
  convert "$BENCH/minilm/model.q8.safetensors" "$work/minilm/model.safetensors" F32
  rm "$work/minilm/model.q8.safetensors"
  if [ "$device" = cuda ]; then nvidia-smi > "$out/gpu.txt" 2>&1 || true; fi
  local t0=$SECONDS
  "$PY" scripts/bench_cpu_vs_torch.py --device "$device" --btu "$btu" --model "$work/minilm" \
    --corpus "$BENCH/train.parquet" --rows "$rows" > "$out/minilm.json"
  echo "minilm: $((SECONDS - t0)) s" >&2
  $btu --quiet init-model --tokenizer "$work/minilm/tokenizer.json" --layers 12 --hidden 768 \
    --heads 12 --intermediate 3072 --max-position 512 --out "$work/bert-base" > /dev/null
  "$PY" scripts/bench_cpu_vs_torch.py --device "$device" --btu "$btu" --model "$work/bert-base" \
    --corpus "$BENCH/train.parquet" --rows "$rows" > "$out/bert-base.json"
  echo "bert-base: $((SECONDS - t0)) s" >&2
  if [ "$device" = cuda ]; then
    NO_COMPILE=1 "$PY" "$BENCH/btu_round1_torch.py" > "$out/baseline.jsonl" || true
  fi
  precision "$btu" "$work" "$out" "$device" "$rows"
  echo "precision: $((SECONDS - t0)) s" >&2
  if [ "${DEFEND:-1}" = 0 ]; then rm -rf "$work"; return; fi
  local d0=$SECONDS
  $btu --quiet defend --config pipelines/default/sst2-addword.toml --run "$work/defend" \
    --train "$BENCH/train.parquet" --dev "$BENCH/dev.parquet" --test "$BENCH/test.parquet" \
    --clean "$BENCH/dev.parquet" --model "$work/minilm" --device "${device/cuda/cuda:0}" \
    ${DEFEND_FLAGS:-} > "$out/defend.json"
  echo "{\"defend_wall_seconds\": $((SECONDS - d0))}" > "$out/defend-wall.json"
  echo "all: $((SECONDS - t0)) s" >&2
  rm -rf "$work"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/gpu_bench.sh prepare|run" >&2; exit 2 ;;
esac
