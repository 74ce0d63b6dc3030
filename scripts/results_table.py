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
# The variants scripts/reproduce.sh runs per attack, in table order (see docs/results.md).
VARIANTS = ["paper", "paper-frobenius", "paper-alpha0.01", "reference-code"]
NAMES = {"addword": "Add-Word `cf`", "addsent": "Add-Sent", "stylebkd": "Stylebkd", "synbkd": "Synbkd"}


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def cell(m):
    """ACC / ASR, then the clean false-positive rate and the flip rate (ASR's floor and the trigger's own effect)."""
    return f"{pct(m['acc'])} / {pct(m['asr'])} ({pct(m.get('clean_false_positive_rate'))}, {pct(m.get('flip_rate'))})"


def step_seconds(s):
    """Wall time of a step: this run's, or, for a step reused from an earlier run, the time it took then."""
    return s["seconds"] if not s["skipped"] else (s.get("computed_seconds") or 0.0)


def step_time(s):
    return f"{s['step']} {step_seconds(s):.0f}s" + ("*" if s["skipped"] else "")


def table(d):
    out = []
    rows = []
    for attack in ["addword", "addsent", "stylebkd", "synbkd"]:
        for preset in VARIANTS:
            p = os.path.join(d, f"sst2-{attack}-{preset}.json")
            if not os.path.exists(p):
                continue
            m = json.load(open(p))
            b, a = m["without_defence"], m["with_defence"]
            secs = ", ".join(step_time(s) for s in m["steps"] if step_seconds(s) > 0.5)
            (pb, pa) = PAPER[attack]
            rows.append(
                f"| {NAMES[attack]} | {preset} | {cell(b)} | {cell(a)} "
                f"| {pb[0]:.2f} / {pb[1]:.2f} -> {pa[0]:.2f} / {pa[1]:.2f} | {', '.join(m['flagged'])} | {secs} |"
            )
    out.append("| attack | variant | without defence: ACC / ASR (FPR, flip) | with BTU: ACC / ASR (FPR, flip) | paper (BERT-base) | flagged tokens | wall time per step |")
    out.append("|---|---|---|---|---|---|---|")
    out.extend(rows)
    out.append("")
    out.append("\\* reused: computed by an earlier run of the same step (steps are keyed by their inputs' content).")
    out.append("")
    out.append(f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; model all-MiniLM-L6-v2 (6 x 384).")
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- table:begin (scripts/results_table.py) -->", "<!-- table:end -->"


def main(argv):
    """results_table.py [DIR] [--update FILE]: print the table, or replace it in FILE between the markers."""
    d = argv[0] if argv and not argv[0].startswith("--") else "docs/results"
    t = table(d)
    if "--update" in argv:
        f = argv[argv.index("--update") + 1]
        doc = open(f).read()
        i, j = doc.index(BEGIN), doc.index(END)
        open(f + ".tmp", "w").write(doc[: i + len(BEGIN)] + "\n" + t + doc[j:])
        os.replace(f + ".tmp", f)
    else:
        sys.stdout.write(t)


if __name__ == "__main__":
    main(sys.argv[1:])
