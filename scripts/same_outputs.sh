#!/usr/bin/env bash
# Do two btu binaries write the same outputs? For refactors that must not change behaviour.
# Runs, with each binary in turn and in the same directory (paths are recorded in provenance):
# the demo (poison -> init-model -> detect -> train -> verify -> unlearn with escalation ->
# export -> eval), three plain unlearns of its victim (no clean data; clean data; --effects with
# clean tuning) and two scans (suspicious tokens; verified effects). Then compares every file
# byte for byte; JSON files with their timing fields (seconds, samples_per_s, ...) blanked, the
# report without its time section.
# usage: scripts/same_outputs.sh OLD_BTU NEW_BTU [WORKDIR]     exit 0: identical
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); work=${3:-$(mktemp -d)}
mkdir -p "$work" && cd "$work"
run() { # BIN TAG
  local b=$1 t=$2 d=run
  rm -rf run u1 u2 u3 scans "$t" && mkdir scans
  "$b" --quiet demo --out run > demo.json
  local u=("$b" --quiet unlearn --checkpoint $d/victim --reference $d/model --suspicious $d/detect/suspicious_tokens.arrow)
  "${u[@]}" --out u1 > u1.json
  "${u[@]}" --clean-corpus $d/data/clean.parquet --out u2 > u2.json
  "${u[@]}" --effects $d/verify/token_effects.arrow --clean-corpus $d/data/clean.parquet --clean-tuning always --out u3 > u3.json
  local s=("$b" --quiet scan --corpus $d/poison/train.parquet --suspicious $d/detect/suspicious_tokens.arrow --tokenizer $d/model)
  "${s[@]}" --out scans/all.parquet > scans/all.json
  "${s[@]}" --effects $d/verify/token_effects.arrow --out scans/verified.parquet > scans/verified.json
  mkdir "$t" && mv run u1 u2 u3 scans ./*.json "$t"/
}
blank() { sed -E 's/"(seconds|computed_seconds|samples_per_s|wall_s|rows_per_s)": [0-9.e+-]+/"\1": 0/g; s/("(detect|eval-repaired|eval-victim|export-repaired|export-victim|init-model|poison|train|unlearn|verify|verify-repaired)": )[0-9.e+-]+/\10/g' "$1"; }
untimed() { awk '/^<section id=/ { skip = ($0 ~ /^<section id="time">/) } !skip' "$1"; }
run "$old" old >&2
run "$new" new >&2
differ=0; n=0
while IFS= read -r f; do
  n=$((n + 1))
  if [[ $f == *.json ]]; then cmp -s <(blank "old/$f") <(blank "new/$f") || { echo "differs: $f"; differ=1; }
  elif [[ $f == *.html ]]; then # the report's time section (one line) differs from run to run
    cmp -s <(untimed "old/$f") <(untimed "new/$f") || { echo "differs: $f"; differ=1; }
  else cmp -s "old/$f" "new/$f" || { echo "differs: $f"; differ=1; }; fi
done < <(cd old && find . -type f | sort)
[ "$(cd old && find . -type f | sort)" = "$(cd new && find . -type f | sort)" ] || { echo "the file lists differ"; differ=1; }
echo "{\"files\": $n, \"identical\": $([ $differ = 0 ] && echo true || echo false), \"dir\": \"$work\"}"
exit $differ
