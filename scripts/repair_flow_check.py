"""Does the repair flow (`[model] suspect`) repair a user's model exactly as the experiment flow
repairs its own victim? (issue 14; docs/results.md, "Repairing a user's model")

1. `btu defend` with an experiment config (it poisons, trains the victim, repairs it) in WORK/exp;
2. the user's side: `btu train` on the experiment's poisoned corpus, with the config's [train]
   parameters and dev split, into WORK/user-victim;
3. `btu defend` in the repair flow (no [poison]; model.suspect = WORK/user-victim; the poisoned
   corpus as data.train; the attack named in [eval]) in WORK/rep;
4. compares the victim weights and every table, checkpoint and prediction file byte for byte,
   and the two summaries' scores. Steps already done in WORK are reused (btu defend resumes).

    python3 scripts/repair_flow_check.py pipelines/default/sst2-addword.toml WORK [BTU]

Run from the repository root; prints a JSON report; exit 0 when everything is identical.
Takes about an hour on 2 cores for SST-2 with MiniLM.
"""

import json
import os
import subprocess
import sys
import tomllib

# The repair's outputs (one list, shared with the test suite), plus the victim's predictions.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "repair_outputs.txt")) as f:
    FILES = [line.strip() for line in f if line.strip()] + ["eval-victim/predictions.parquet"]


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def toml_text(d, prefix=""):
    """A TOML document for a config of scalars, lists and nested tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", toml_text(v, f"{prefix}{k}.")]
    return "\n".join(lines)


def btu(bin_, *args):
    out = subprocess.run([bin_, "--quiet", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    config, work = sys.argv[1], os.path.abspath(sys.argv[2])
    bin_ = sys.argv[3] if len(sys.argv) > 3 else os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "btu")
    os.makedirs(work, exist_ok=True)
    with open(config, "rb") as f:
        exp = tomllib.load(f)
    exp["run"] = os.path.join(work, "exp")
    with open(os.path.join(work, "exp.toml"), "w") as f:
        f.write(toml_text(exp) + "\n")
    m_exp = btu(bin_, "defend", "--config", os.path.join(work, "exp.toml"))

    corpus = os.path.join(work, "exp", "poison", "train.parquet")
    suspect = os.path.join(work, "user-victim")
    if not os.path.exists(os.path.join(suspect, "model.safetensors")):
        t = exp.get("train", {})
        args = ["train", "--corpus", corpus, "--model", exp["model"]["path"], "--out", suspect,
                "--seed", str(exp.get("seed", 42))]
        for key, flag in [("epochs", "--epochs"), ("lr", "--lr"), ("batch_size", "--batch-size"),
                          ("max_len", "--max-len")]:
            if key in t:
                args += [flag, str(t[key])]
        for d in exp["data"].get("dev", []):
            args += ["--dev", d]
        btu(bin_, *args)

    poison = exp.pop("poison")
    rep = dict(exp)
    rep["run"] = os.path.join(work, "rep")
    rep["data"] = {k: v for k, v in exp["data"].items() if k not in ("dev", "train_filter")}
    rep["data"]["train"] = [corpus]
    rep["model"] = dict(exp["model"], suspect=suspect)
    rep["eval"] = dict(exp.get("eval", {}), attack=poison["attack"], target=poison.get("target", 1))
    for key in ("trigger", "sentence", "rewrite_col"):
        if key in poison:
            rep["eval"][key] = poison[key]
    with open(os.path.join(work, "rep.toml"), "w") as f:
        f.write(toml_text(rep) + "\n")
    m_rep = btu(bin_, "defend", "--config", os.path.join(work, "rep.toml"))

    def same(a, b):
        with open(a, "rb") as x, open(b, "rb") as y:
            return x.read() == y.read()

    files = {"victim/model.safetensors": same(os.path.join(suspect, "model.safetensors"),
                                              os.path.join(work, "exp", "victim", "model.safetensors"))}
    for f in FILES:
        files[f] = same(os.path.join(work, "rep", f), os.path.join(work, "exp", f))
    keys = ["without_defence", "with_defence", "acc_change", "verified", "dimensions_replaced"]
    summary = {k: m_rep[k] == m_exp[k] for k in keys}
    report = {"files_identical": files, "summary_identical": summary, "flows": [m_exp["flow"], m_rep["flow"]],
              "with_defence": m_rep["with_defence"],
              "seconds": {"experiment": m_exp["seconds"], "repair": m_rep["seconds"]}}
    print(json.dumps(report, indent=2))
    sys.exit(0 if all(files.values()) and all(summary.values()) else 1)


if __name__ == "__main__":
    main()
