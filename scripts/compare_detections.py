#!/usr/bin/env python3
"""How far another detection's ranks are from a reference detection's (issue 13: the effect of
`--precision` on the selected tokens). Reads each directory's token_scores.arrow through `btu sql`
(no pyarrow needed) and prints JSON: per round, the reference's selected tokens, how many of
them the other run also selected, the largest rank change among them and the tokens that
entered or left the top k; and whether the suspicious sets (the union over rounds) are equal.

    python3 scripts/compare_detections.py --btu BTU REF_DIR OTHER_DIR [OTHER_DIR ...]
"""
import argparse
import json
import subprocess
import sys


def ranks(btu, d):
    """{round: {token: rank}} and {round: [selected tokens in rank order]} of one detection."""
    q = "select round, token, rank, selected from t where rank is not null"
    out = subprocess.run(
        btu.split() + ["sql", "--quiet", "--format", "json", "--table", f"t={d}/token_scores.arrow", q],
        check=True, capture_output=True, text=True).stdout
    by_round, selected = {}, {}
    for r in json.loads(out):
        by_round.setdefault(r["round"], {})[r["token"]] = r["rank"]
        if r["selected"]:
            selected.setdefault(r["round"], []).append((r["rank"], r["token"]))
    return by_round, {k: [t for _, t in sorted(v)] for k, v in selected.items()}


def compare(ref, other):
    (rr, rs), (orr, os_) = ref, other
    rounds = []
    for n in sorted(rs):
        a, b = rs[n], os_.get(n, [])
        shifts = {t: orr[n].get(t, 0) - rr[n][t] for t in a}
        rounds.append({
            "round": n,
            "reference_selected": a,
            "also_selected": len(set(a) & set(b)),
            "k": len(a),
            "largest_rank_change": max(shifts.values(), key=abs) if shifts else 0,
            "rank_changes": {t: s for t, s in shifts.items() if s},
            "entered": [t for t in b if t not in a],
            "left": [t for t in a if t not in b],
        })
    union = lambda s: sorted({t for v in s.values() for t in v})
    return {"rounds": rounds, "same_suspicious_set": union(rs) == union(os_),
            "suspicious_only_in_other": sorted(set(union(os_)) - set(union(rs))),
            "suspicious_only_in_reference": sorted(set(union(rs)) - set(union(os_)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--btu", default="btu", help="the btu command (default: btu on PATH)")
    ap.add_argument("reference")
    ap.add_argument("others", nargs="+")
    a = ap.parse_args()
    ref = ranks(a.btu, a.reference)
    json.dump({"reference": a.reference,
               "compared": {d: compare(ref, ranks(a.btu, d)) for d in a.others}},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
