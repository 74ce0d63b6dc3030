"""Render docs/results.md from the raw `btu defend` metrics in docs/results/*.json."""
import json
import os
import platform
import sys

PAPER = {  # BERT-base-uncased, 10 % poison (btu-spec.md): (ACC, ASR) without / with BTU
    "addword": ((91.05, 100.00), (90.37, 5.97)),
    "addsent": ((91.10, 100.00), (90.69, 5.50)),
    "stylebkd": ((90.37, 54.72), (90.38, 6.79)),
    "synbkd": ((90.72, 90.46), (90.59, 24.36)),
}
NAMES = {"addword": "Add-Word `cf`", "addsent": "Add-Sent", "stylebkd": "Stylebkd", "synbkd": "Synbkd"}


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def main(d):
    rows = []
    for attack in ["addword", "addsent", "stylebkd", "synbkd"]:
        for preset in ["paper", "paper-frobenius", "reference-code"]:
            p = os.path.join(d, f"sst2-{attack}-{preset}.json")
            if not os.path.exists(p):
                continue
            m = json.load(open(p))
            b, a = m["without_defence"], m["with_defence"]
            secs = ", ".join(f"{k} {v:.0f}s" for k, v in m["seconds_per_step"].items() if v > 0.5)
            (pb, pa) = PAPER[attack]
            rows.append(
                f"| {NAMES[attack]} | {preset} | {pct(b['acc'])} / {pct(b['asr'])} | {pct(a['acc'])} / {pct(a['asr'])} "
                f"| {pb[0]:.2f} / {pb[1]:.2f} -> {pa[0]:.2f} / {pa[1]:.2f} | {', '.join(m['flagged'])} | {secs} |"
            )
    print("| attack | preset | ACC / ASR without defence | ACC / ASR with BTU | paper (BERT-base) | flagged tokens | wall time per step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; model all-MiniLM-L6-v2 (6 x 384).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
