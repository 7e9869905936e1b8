"""What does aiaas_lab.train cost over a bare PyTorch loop? Side by side, in one process.

    .venv/bin/python bench/train_overhead.py [--epochs 1] [--repeats 3] [--threads N]

synthetic-mnist (60,000 x 784), the 784-128-64-10 MLP, batch 64, SGD, one epoch per run:
  (a) the tutorial loop people copy: DataLoader(TensorDataset, shuffle=True)
  (b) the limit: pre-sliced batches, forward / backward / step only
  (c) aiaas_lab.train, progress off
  (d) aiaas_lab.train, text progress on (to a null stream)
Each variant runs `--repeats` times, interleaved, and the best run counts: this machine is
noisy, and the best of several is the least disturbed. Prints samples/s and c/b, d/b, c/a.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import aiaas_lab
from aiaas_lab.engine.datasets import synthetic_mnist
from aiaas_lab.notebook.progress import TextProgress

BATCH = 64
LR = 0.01


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def tutorial_loop(X: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def presliced_loop(X: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(X[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(X), BATCH)]
    t0 = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in batches:
            opt.zero_grad()
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def aiaas_train(X: torch.Tensor, y: torch.Tensor, epochs: int, progress: object) -> float:
    net = make_net()
    t0 = time.perf_counter()
    result = aiaas_lab.train(net, (X, y), epochs=epochs, batch_size=BATCH, optimizer="sgd", lr=LR,
                             seed=0, device="cpu", progress=progress)
    elapsed = time.perf_counter() - t0
    assert result.status == "completed", result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    X, y = synthetic_mnist(seed=0)
    n = len(X) * opts.epochs
    variants = {
        "a tutorial DataLoader loop": lambda: tutorial_loop(X, y, opts.epochs),
        "b pre-sliced loop (limit)": lambda: presliced_loop(X, y, opts.epochs),
        "c aiaas_lab.train, progress off": lambda: aiaas_train(X, y, opts.epochs, False),
        "d aiaas_lab.train, text progress": lambda: aiaas_train(X, y, opts.epochs, TextProgress(io.StringIO(), interval=0.5)),
    }
    for run in variants.values():  # warm-up: allocator, kernels, first-call costs
        run()
    best: dict[str, float] = {}
    for _ in range(opts.repeats):
        for name, run in variants.items():
            elapsed = run()
            best[name] = min(best.get(name, float("inf")), elapsed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{opts.epochs} epoch(s) of {len(X):,} samples, batch {BATCH}, best of {opts.repeats}")
    rate = {name: n / seconds for name, seconds in best.items()}
    for name, r in rate.items():
        print(f"  {name:<34} {r:>10,.0f} samples/s")
    a, b, c, d = (rate[k] for k in variants)
    print(f"  c/b = {c / b:.3f}   (target >= 0.95)")
    print(f"  d/b = {d / b:.3f}   (target >= 0.93)")
    print(f"  c/a = {c / a:.3f}   (target >= 1.3)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
