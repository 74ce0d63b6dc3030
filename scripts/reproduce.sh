#!/usr/bin/env bash
# Reproduce the paper's SST-2 table (btu-spec.md) with a real pre-trained model, all-MiniLM-L6-v2
# from its PyPI wheel, on this machine. For each attack, `btu defend` runs these variants:
#
#   paper            the attack's config as committed: paper preset (mean-row threshold, trained
#                    padding row, 3 clean epochs at lr 5e-7)
#   paper-frobenius  the same suspicious set T, the released code's Frobenius threshold
#   paper-alpha0.01  detection with alpha 0.01 % (k = 4 tokens per round), Frobenius threshold
#   reference-code   the released code's detection rounds, Frobenius threshold, reference
#                    padding row, 1 clean epoch at lr 2e-5
#
# Variants that detect differently get their own run directory, started as a copy of the
# attack's base run: steps are keyed by content, so the poisoned corpus and the victim are
# reused, never retrained. Writes docs/results/sst2-<attack>-<variant>.json (the raw summary of
# `btu defend`) and docs/results.md's table (scripts/results_table.py). Hours on 2 CPU cores;
# not part of CI.
#
#   scripts/reproduce.sh                      # all four attacks
#   scripts/reproduce.sh addword addsent      # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory minilm build >&2
BTU=./target/release/btu
mkdir -p docs/results
attacks=("$@")
[ ${#attacks[@]} -gt 0 ] || attacks=(addword addsent stylebkd synbkd)

# variant  run-directory suffix  extra flags
variants=(
  "paper||"
  "paper-frobenius||--threshold frobenius"
  "paper-alpha0.01|-alpha0.01|--alpha 0.01 --threshold frobenius"
  "reference-code|-reference-code|--preset reference-code --threshold frobenius --replacement reference-pad --clean-epochs 1 --clean-lr 2e-5"
)

for a in "${attacks[@]}"; do
  cfg="pipelines/sst2-$a.toml"
  base="runs/sst2-$a"
  for v in "${variants[@]}"; do
    IFS='|' read -r name suffix flags <<<"$v"
    run="$base$suffix"
    if [ "$run" != "$base" ] && [ ! -d "$run" ] && [ -d "$base" ]; then
      cp -a "$base" "$run"
    fi
    echo "== $a: $name" >&2
    # shellcheck disable=SC2086
    "$BTU" --log info defend --config "$cfg" --run "$run" $flags > "docs/results/sst2-$a-$name.json"
  done
done
python3 scripts/results_table.py docs/results --update docs/results.md
echo "updated the table in docs/results.md" >&2
