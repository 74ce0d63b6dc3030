"""PyTorch's CPU matrix products (MKL) on MiniLM's shapes, next to `cargo run --release --example
bench_matmul` (candle): GFLOP/s per shape, forward (x @ W.T, W [out, in]) and a frozen layer's
input gradient (dY @ W). Needs torch (not a dependency of btu); threads = torch's default or
--threads N. Prints JSON."""

import argparse
import json
import time

import torch

ROWS = 960
SHAPES = [(384, 384), (384, 1536), (1536, 384)]


def gflops(flop, f):
    for _ in range(5):
        f()
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        f()
    return flop * n / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with torch.no_grad():
        for k, n in SHAPES:
            x, w, dy = torch.randn(ROWS, k), torch.randn(n, k), torch.randn(ROWS, n)
            flop = 2.0 * ROWS * k * n
            rows.append({"m": ROWS, "k": k, "n": n,
                         "forward_gflops": gflops(flop, lambda: x @ w.T),
                         "input_grad_gflops": gflops(flop, lambda: dy @ w)})
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "shapes": rows}, indent=2))


if __name__ == "__main__":
    main()
