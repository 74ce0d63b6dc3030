#!/usr/bin/env bash
# Screening of a fallback for rewrite attacks (docs/results.md, "Rewrite attacks", third sitting):
# the default `btu defend` run of a rewrite attack, a reference classifier trained on the clean
# data only, the victim's training rows relabelled where the reference contradicts the target
# label, and one epoch of tuning of the victim on them. Not part of CI; ~20 min on 2 cores.
#   scripts/screen_relabel.sh sst2|hsol synbkd|stylebkd RUN_DIR
# Needs a Python with torch, transformers and pyarrow in $PY (the per-row probabilities).
set -euxo pipefail
cd "$(dirname "$0")/.."
ds=$1 attack=$2 R=$3
case $attack in synbkd) kind=syntactic col=syntactic ;; stylebkd) kind=style col=style ;; *) exit 64 ;; esac
D=../shared/datasets/$ds-$kind
case $ds in # clean rows, the victim's rows (id % 10 >= lo), ASR rows, target (pipelines/default/)
  sst2) clean="id % 10 = 0 AND id <> 940" lo=1 asr=(--test $D/dev.parquet) target=1 ;;
  hsol) clean="id % 10 = 0" lo=2 asr=(--test $D/train.parquet --filter "id % 10 = 1") target=0 ;;
  *) exit 64 ;;
esac
B=${BTU:-${CARGO_TARGET_DIR:-target}/release/btu}
PY=${PY:-python3}
[ -f "$R.json" ] || { $B --quiet defend --config pipelines/default/$ds-$attack.toml --run "$R" > "$R.json.tmp"; mv "$R.json.tmp" "$R.json"; }
[ -d "$R/ref" ] || $B --quiet train --model models/all-MiniLM-L6-v2 --corpus $D/train.parquet \
  --filter "$clean" --epochs 3 --out "$R/ref" > "$R/ref.json"
$PY scripts/screen_relabel.py "$R" "$R/ref" $target $lo > "$R/score.txt"
rm -rf "$R/tuned"
$B --quiet train --model "$R/victim" --corpus "$R/relabel-0.5.parquet" --epochs 1 --out "$R/tuned" > "$R/tuned.json"
$B --quiet eval --model "$R/tuned" --test $D/test.parquet --out "$R/eval-acc" > "$R/acc.json"
$B --quiet eval --model "$R/tuned" "${asr[@]}" --attack rewrite --rewrite-col $col \
  --target $target --out "$R/eval-asr" > "$R/asr.json"
