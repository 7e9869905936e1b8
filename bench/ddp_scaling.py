"""How well does `aiaas_lab.train(..., workers=N)` scale, and what does starting workers cost?

    .venv/bin/python bench/ddp_scaling.py [--epochs 2] [--repeats 2] [--batch-size 64]

synthetic-mnist (60,000 x 784), the built-in 784-128-64-10 MLP, Adam, batch 64 per worker,
side by side in one run:
  1w/1t  one process, 1 torch thread          (what each of two workers gets on two cores)
  1w/Nt  one process, all cores' threads       (what a user would do without workers)
  2w     two worker processes, 1 thread each   (DDP over gloo)
  2w/ga4 two workers, --grad-accum 4           (one gradient all-reduce per 4 batches)
Throughput is the best epoch's samples/s as the run reports it (EpochEnd), so start-up is not in
it; start-up is measured apart, as the time from the call to the first reported step. Each
variant runs `--repeats` times, interleaved, and the best run counts: this machine is shared
and noisy. Prints samples/s, scaling efficiency 2w / (2 x 1w/1t), and the ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import aiaas_lab
from aiaas_lab import EpochEnd, StepEnd
from aiaas_lab.engine.datasets import synthetic_mnist


def run(data: tuple[torch.Tensor, torch.Tensor], epochs: int, batch: int, **options: object) -> tuple[float, float]:
    """(best epoch samples/s, seconds from the call to the first reported step)."""
    rates: list[float] = []
    first_step: list[float] = []
    t0 = time.perf_counter()

    def watch(event: object) -> None:
        if isinstance(event, StepEnd) and not first_step:
            first_step.append(time.perf_counter() - t0)
        if isinstance(event, EpochEnd):
            rates.append(event.samples_per_s)

    result = aiaas_lab.train("mlp", data, epochs=epochs, batch_size=batch, seed=0, device="cpu",
                             progress=False, callbacks=[watch], **options)
    assert result.status == "completed", result.error
    return max(rates), first_step[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    opts = parser.parse_args()
    cores = os.cpu_count() or 1
    data = synthetic_mnist(seed=0)
    b, e = opts.batch_size, opts.epochs
    variants = {
        "1w/1t  one process, 1 thread": lambda: run(data, e, b, threads=1),
        f"1w/{cores}t  one process, {cores} threads": lambda: run(data, e, b, threads=cores),
        "2w     two workers, 1 thread each": lambda: run(data, e, b, workers=2, threads=1),
        "2w/ga4 two workers, --grad-accum 4": lambda: run(data, e, b, workers=2, threads=1, grad_accum=4),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(opts.repeats):
        for name, variant in variants.items():
            rate, start = variant()
            old = best.get(name, (0.0, float("inf")))
            best[name] = (max(old[0], rate), min(old[1], start))
    print(f"torch {torch.__version__}, {cores} cores, synthetic-mnist {len(data[0]):,} samples, MLP 784-128-64-10, "
          f"batch {b} per worker, best of {opts.repeats} (epochs of {e})")
    print(f"  {'variant':<38} {'samples/s':>10} {'call -> first step':>20}")
    for name, (rate, start) in best.items():
        print(f"  {name:<38} {rate:>10,.0f} {start:>18.2f} s")
    one, many, two, accum = (best[name][0] for name in variants)
    print(f"  scaling efficiency 2w / (2 x 1w/1t)   = {two / (2 * one):.2f}")
    print(f"  speed-up 2w / 1w/{cores}t                 = {two / many:.2f}")
    print(f"  --grad-accum 4 / 1 on two workers     = {accum / two:.2f}")
    print(f"  launcher overhead (2w first step)     = {best[list(variants)[2]][1]:.2f} s   (target < 5 s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
