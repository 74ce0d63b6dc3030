#!/usr/bin/env python3
"""btu against PyTorch eager on the same device (CPU, or a GPU with --device cuda), the same rows
and the same model, side by side.

Measures, in one run, samples/s of
  - detection round 1 (only the word embeddings trainable, AdamW, lr 2e-5, batch 32, one epoch),
  - training (every weight trainable, AdamW, lr 2e-5, batch 32, one epoch),
for PyTorch + transformers (eager, torch.set_num_threads = the cores given) and for `btu detect`
/ `btu train` (their summaries' samples/s), on the first ROWS rows of a Parquet corpus, with a
Hugging Face model directory (default: all-MiniLM-L6-v2 from `make minilm`). Batches: the same
tokenizer (the model's tokenizer.json), truncation at 128, shuffled, each padded to its longest
row (as btu's random batching does). Both sides time every batch of the epoch (no warm-up left
out, as btu's summaries count). Peak RSS of each side is reported too.

Not part of CI: torch and transformers come from PyPI into a venv of your choosing:
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch transformers pyarrow tokenizers
    /tmp/tv/bin/python scripts/bench_cpu_vs_torch.py --btu target/release/btu [--rows 2000]
On a GPU machine (scripts/gpu_bench.sh runs it): --device cuda --btu ".gpu/run.sh btu"; the torch
side then synchronizes before reading the clock, and btu runs with --device cuda:0.
Prints one JSON object (ratios are btu / torch; > 1 means btu is faster).
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification


def rows(path, n, text_col="text", label_col="label"):
    t = pq.read_table(path, columns=[text_col, label_col]).slice(0, n)
    return t.column(text_col).to_pylist(), t.column(label_col).to_pylist()


def batches(model_dir, texts, labels, bs, max_len, seed):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    enc = [e.ids for e in tok.encode_batch(texts)]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(enc), generator=g).tolist()
    out = []
    for i in range(0, len(order), bs):
        idx = order[i:i + bs]
        m = max(len(enc[j]) for j in idx)
        ids = torch.zeros((len(idx), m), dtype=torch.long)
        mask = torch.zeros((len(idx), m), dtype=torch.long)
        for r, j in enumerate(idx):
            ids[r, :len(enc[j])] = torch.tensor(enc[j])
            mask[r, :len(enc[j])] = 1
        out.append((ids, mask, torch.tensor([labels[j] for j in idx])))
    return out


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_epoch(model_dir, data, embeddings_only, device="cpu", warmup=0):
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(device)
    model.train()
    data = [tuple(x.to(device) for x in b) for b in data]
    if embeddings_only:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.bert.embeddings.word_embeddings.weight
        emb.requires_grad_(True)
        params = [emb]
    else:
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)

    def step(ids, mask, y):
        out = model(input_ids=ids, attention_mask=mask, labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in data[:warmup]:
        step(*b)
    sync(device)
    t = time.perf_counter()
    n = 0
    for b in data[warmup:]:
        step(*b)
        n += b[0].shape[0]
    sync(device)
    s = time.perf_counter() - t
    return {"samples": n, "seconds": s, "samples_per_s": n / s}


def btu_json(cmd):
    """Run btu under /usr/bin/time: its summary and its peak RSS in MB. (getrusage's children
    figure would count this process's memory at fork time.)"""
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True)
    if r.returncode != 0 and "No such file" in r.stderr and "time" in r.stderr:
        sys.exit("/usr/bin/time is missing (apt install time)")
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout), int(r.stderr.strip().splitlines()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--btu", default="target/release/btu", help="the btu command (split like a shell)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--corpus", default="../shared/datasets/sst2/train.parquet")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts, labels = rows(args.corpus, args.rows)
    data = batches(args.model, texts, labels, 32, 128, 42)
    out = {"bench": "vs_torch", "device": args.device, "rows": len(texts), "threads": args.threads,
           "torch": torch.__version__, "model": args.model, "corpus": args.corpus}
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    out["torch_round1"] = torch_epoch(args.model, data, embeddings_only=True, device=args.device)
    out["torch_train"] = torch_epoch(args.model, data, embeddings_only=False, device=args.device)
    # Both epochs in one process: the larger of the two (training, every weight with moments).
    out["torch_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        out["torch_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    btu = shlex.split(args.btu)
    with tempfile.TemporaryDirectory() as d:
        device = "cuda:0" if args.device == "cuda" else "cpu"
        common = ["--limit", str(args.rows), "--device", device, "--quiet"]
        det, rss_detect = btu_json(btu + ["detect", "--corpus", args.corpus, "--model", args.model,
                        "--out", os.path.join(d, "detect")] + common)
        r1 = next(r for r in det["rounds"] if r["round"] == 1)
        out["btu_round1"] = {"seconds": r1["seconds"], "samples_per_s": r1["samples_per_s"]}
        tr, rss_train = btu_json(btu + ["train", "--corpus", args.corpus, "--model", args.model,
                       "--epochs", "1", "--out", os.path.join(d, "train")] + common)
        e = tr["epochs"][0]["stats"]
        out["btu_train"] = {"seconds": e["seconds"], "samples_per_s": e["samples_per_s"]}
    out["btu_peak_rss_mb"] = {"detect": rss_detect, "train": rss_train}
    out["ratio_round1"] = out["btu_round1"]["samples_per_s"] / out["torch_round1"]["samples_per_s"]
    out["ratio_train"] = out["btu_train"]["samples_per_s"] / out["torch_train"]["samples_per_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
