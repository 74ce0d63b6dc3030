"""Screening behind docs/decisions.md, "Neighbourhoods in the suspect" (session 16).

For the committed default runs of the rewrite attacks (`runs/default/<dataset>-<attack>`, made by
scripts/default_table.sh), reads every training row with the victim (PyTorch, transformers), takes
the mean of its final hidden states, and among the target's rows compares the references' doubt
of one row (`relabelled.parquet`'s `doubt`) with its mean over the row's 10 nearest target rows
(cosine): the poisoned share among a row's neighbours, the AUC of poisoned over clean rows, and
the rows each rule relabels. With --write DIR it also writes, per run and rule, the corpus
relabelled by that rule (`<run>-<rule>.parquet`: id, text, label) for
`btu train --model runs/default/<run>/repaired --corpus ... --epochs 1` and `btu eval`.

Not part of CI (a minute per run on 2 cores). Needs torch, transformers and pyarrow:
    python scripts/screen_neighbours.py [--write DIR] sst2-stylebkd sst2-synbkd hsol-stylebkd hsol-synbkd
The screen in the docs averaged over the 10 neighbours without the row (rule `knn`); the product
averages over the row and its 10 neighbours (rule `hood`, what `btu relabel` writes as
`neighbourhood_doubt`).
"""
import argparse
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import BertForSequenceClassification, BertTokenizerFast

K = 10


def features(run):
    """The victim's mean final hidden state of every training row, in relabelled.parquet's order."""
    model = BertForSequenceClassification.from_pretrained(f"{run}/victim").eval()
    tok = BertTokenizerFast.from_pretrained(f"{run}/victim")
    rows = pq.read_table(f"{run}/relabel/relabelled.parquet").to_pydict()
    out = []
    with torch.no_grad():
        for i in range(0, len(rows["text"]), 64):
            b = tok(rows["text"][i:i + 64], padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
            h = model.bert(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
    return rows, np.concatenate(out)


def auc(score, y):
    order = np.argsort(score, kind="stable")
    rank = np.empty(len(score))
    rank[order] = np.arange(1, len(score) + 1)
    p, n = y.sum(), len(y) - y.sum()
    return float((rank[y].sum() - p * (p + 1) / 2) / (p * n))


def screen(name, write):
    run = f"runs/default/{name}"
    rows, x = features(run)
    target = json.load(open(f"{run}/relabel/summary.json"))["target"]
    label = np.array(rows["label_before"])
    t = label == target
    y = np.array(rows["poisoned"])[t]
    d = np.array(rows["doubt"])[t]
    u = x[t] / np.linalg.norm(x[t], axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1, kind="stable")[:, :K]
    rules = {"row": d, "knn": d[near].mean(1), "hood": (d[near].sum(1) + d) / (K + 1)}
    report = {
        "run": name, "target_rows": int(t.sum()), "poisoned": int(y.sum()),
        "poisoned_share_of_neighbours": {"poisoned_rows": float(y[near][y].mean()),
                                         "clean_rows": float(y[near][~y].mean())},
        "auc": {r: auc(s, y) for r, s in rules.items()},
        "clean_doubt_sd": {r: float(s[~y].std()) for r, s in rules.items()},
        "relabelled": {},
    }
    for r, s in rules.items():
        for th in (0.4, 0.5):
            sel = s >= th
            report["relabelled"][f"{r}>={th}"] = {"rows": int(sel.sum()),
                                                  "poisoned": int((sel & y).sum())}
            if write:
                new = label.copy()
                new[np.where(t)[0][sel]] = 1 - target  # two classes
                pq.write_table(pa.table({"id": rows["id"], "text": rows["text"],
                                         "label": pa.array(new.astype(np.int64))}),
                               f"{write}/{name}-{r}{th}.parquet")
    print(json.dumps(report))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="directory for the relabelled corpora")
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args()
    torch.set_num_threads(2)
    for name in a.runs:
        screen(name, a.write)


if __name__ == "__main__":
    sys.exit(main())
