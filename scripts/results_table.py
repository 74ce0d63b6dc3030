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
DBEGIN, DEND = "<!-- default-table:begin (scripts/results_table.py) -->", "<!-- default-table:end -->"

# docs/results/<dataset>-<attack>[-<rate>]-default[-seed<N>].json, in table order.
DEFAULT_RUNS = [
    (ds, attack, rate, seed)
    for ds in ["sst2", "hsol"]
    for attack in ["addword", "addsent", "stylebkd", "synbkd"]
    for rate, seed in [("", ""), ("", "-seed43"), ("-1", "")]
]
DATASETS = {"sst2": "SST-2", "hsol": "HSOL"}
ATTACKS = {"addword": "Add-Word", "addsent": "Add-Sent", "stylebkd": "Stylebkd", "synbkd": "Synbkd"}


def cell5(m):
    """ACC / ASR (FPR, flip, FNR)."""
    return (f"{pct(m['acc'])} / {pct(m['asr'])} ({pct(m.get('clean_false_positive_rate'))}, "
            f"{pct(m.get('flip_rate'))}, {pct(m.get('clean_false_negative_rate'))})")


def verification_share(m):
    """Seconds of the verify steps and the escalation's rechecks, and their share of the run."""
    total = sum(step_seconds(s) for s in m["steps"])
    ver = sum(step_seconds(s) for s in m["steps"] if s["step"].startswith("verify"))
    for s in m["steps"]:
        u = s.get("summary") or {}
        stages = u.get("escalation")
        if s["step"] == "unlearn" and isinstance(stages, list):
            if all("seconds" in st for st in stages):
                ver += sum(st["seconds"] for st in stages)
            else:  # summaries from before stages were timed: an upper bound (bench/defend.rs)
                tuning = sum(e.get("seconds", 0.0) for e in (u.get("clean_tuning") or {}).get("epochs", []))
                ver += max(0.0, u.get("seconds", 0.0) - tuning)
    return total, ver


def default_table(d):
    rows = []
    for ds, attack, rate, seed in DEFAULT_RUNS:
        p = os.path.join(d, f"{ds}-{attack}{rate}-default{seed}.json")
        if not os.path.exists(p):
            continue
        m = json.load(open(p))
        b, a, c = m["without_defence"], m["with_defence"], m["acc_change"]
        total, ver = verification_share(m)
        poison = next(s for s in m["steps"] if s["step"] == "poison")["summary"]["params"]
        # Newer summaries keep the seed in the run's config only.
        seed = poison.get("seed", m["config"].get("seed"))
        ok = ""
        if attack in ("addword", "addsent"):
            good = c["delta"] >= -0.005 and (a.get("flip_rate") or 1.0) <= 0.03
            ok = "yes" if good else "no"
        else:
            # Rewrites: ASR at most the reference-code variant's on the same attack, ACC -1 at most.
            ref = os.path.join(d, f"{ds}-{attack}-reference-code.json")
            if os.path.exists(ref):
                bar = json.load(open(ref))["with_defence"]["asr"]
                good = a["asr"] <= bar and c["delta"] >= -0.01
                ok = f"{'yes' if good else 'no'} (ASR bar {100 * bar:.2f})"
        verified = ", ".join(f"`{v}`" for v in (m.get("verified") or [])) or "none"
        relabel = m.get("relabel") or {}
        if relabel.get("target") is not None:
            verified += f"; {relabel['relabelled']} rows of class {relabel['target']} relabelled"
        rows.append(
            f"| {DATASETS[ds]} | {ATTACKS[attack]} | {100 * poison['rate']:g} % | {seed} "
            f"| {cell5(b)} | {cell5(a)} | {100 * c['delta']:+.2f} [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] "
            f"| {verified} | {m.get('dimensions_replaced', 0)} | {ok} | {total / 60:.0f} min, {100 * ver / total:.1f} % |"
        )
    out = [
        "| dataset | attack | poison | seed | without defence: ACC / ASR (FPR, flip, FNR) | with btu: ACC / ASR (FPR, flip, FNR) "
        "| ACC change, points [95 % CI] | verified triggers | dimensions replaced | issue 12's bar | time (verification's share) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ] + rows
    return "\n".join(out) + "\n"


def main(argv):
    """results_table.py [DIR] [--update FILE]: print the table, or replace it in FILE between the markers."""
    d = argv[0] if argv and not argv[0].startswith("--") else "docs/results"
    t, dt = table(d), default_table(d)
    if "--update" in argv:
        f = argv[argv.index("--update") + 1]
        doc = open(f).read()
        for (b, e, text) in [(BEGIN, END, t), (DBEGIN, DEND, dt)]:
            if b in doc:
                i, j = doc.index(b), doc.index(e)
                doc = doc[: i + len(b)] + "\n" + text + doc[j:]
        open(f + ".tmp", "w").write(doc)
        os.replace(f + ".tmp", f)
    else:
        sys.stdout.write(dt + "\n" + t)


if __name__ == "__main__":
    main(sys.argv[1:])
