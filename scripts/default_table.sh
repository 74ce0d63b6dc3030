#!/usr/bin/env bash
# docs/results.md's table of btu's default method (issue 12): every config in pipelines/default/
# at 10 % poison, the insertion attacks on SST-2 also with a second seed and at 1 %. Each run is a
# resumable `btu defend` (steps keyed by content: an interrupted table continues where it stopped;
# a run whose summary is already in docs/results/ is skipped). Writes
# docs/results/<dataset>-<attack>[-<rate>]-default[-seed<N>].json and re-renders the table.
# Hours on 2 CPU cores (a MiniLM run: 25-40 min); not part of CI.
#
#   scripts/default_table.sh                   # everything
#   scripts/default_table.sh sst2-addword      # the runs of some configs
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory minilm build >&2
BTU=${BTU:-${CARGO_TARGET_DIR:-target}/release/btu}
mkdir -p docs/results
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(sst2-addword sst2-addsent hsol-addword hsol-addsent
  sst2-stylebkd sst2-synbkd hsol-stylebkd hsol-synbkd)

run() { # summary-name config extra-flags...
  local name=$1 cfg=$2; shift 2
  local out=docs/results/$name.json
  [ -s "$out" ] && { echo "have $out" >&2; return; }
  echo "$(date +%T) $name" >&2
  "$BTU" --quiet defend --config "$cfg" "$@" > "$out.tmp"
  mv "$out.tmp" "$out"
}

for c in "${configs[@]}"; do
  ds=${c%%-*}; attack=${c#*-}
  run "$c-default" "pipelines/default/$c.toml"
  if [ "$ds" = sst2 ] && { [ "$attack" = addword ] || [ "$attack" = addsent ]; }; then
    run "$c-default-seed43" "pipelines/default/$c.toml" --seed 43 --run "runs/default/$c-seed43"
    run "$c-1-default" "pipelines/default/$c.toml" --rate 0.01 --run "runs/default/$c-1"
  fi
done
python3 scripts/results_table.py docs/results --update docs/results.md
