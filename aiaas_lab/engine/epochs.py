"""How an epoch is cut into batches, and how a model is evaluated on a split: the parts of the
loop that depend on the data's form (in memory or a DataLoader) and on the ranks of a run."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import InMemory

__all__ = ["DistContext", "epoch_permutation", "evaluate"]


class DistContext(Protocol):
    """One rank's view of a data-parallel run (made by `_distributed`). The loop trains its shard
    of each epoch through `net` (the DDP- or FSDP-wrapped model) and sums its counters over the
    ranks, so that every rank takes the same decisions and the history is global."""

    rank: int
    world_size: int
    net: nn.Module

    def sync_gradients(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients across ranks (off on accumulation steps)."""

    def all_sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks; a collective, so every rank calls it at the same point."""
        ...


def _loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, a function of (seed, epoch) alone, so a resumed run and every
    rank of a distributed run draw the same order without sharing generator state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _batches(data: InMemory | DataLoader, batch_size: int, seed: int, epoch: int,
             device: torch.device, rank: int = 0, world: int = 1, skip: int = 0,
             flat_targets: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's micro-batches, after the first `skip` (a run resumed mid-epoch)."""
    if isinstance(data, InMemory):
        # One index_select per batch on a shuffled index: per-sample indexing and collation
        # (what a DataLoader does) costs a third of a small model's throughput, and gathering
        # the whole set at once (X[perm]) writes a full copy through memory every epoch; a
        # batch-sized gather stays in cache and measured 2-3x cheaper here.
        perm = epoch_permutation(len(data), seed, epoch)
        if world > 1:
            # Every rank draws the same permutation and takes every world-th sample of it, so the
            # ranks' k-th batches together are the k-th batch of one process with a world times
            # larger batch. The last len % world samples sit this epoch out: all ranks must take
            # the same number of steps.
            perm = perm[:len(perm) - len(perm) % world][rank::world]
        perm = perm.to(data.X.device)
        y = data.y[perm]
        for start in range(skip * batch_size, len(perm), batch_size):
            yield data.X.index_select(0, perm[start:start + batch_size]), y[start:start + batch_size]
    else:
        for index, (xb, yb) in enumerate(data):
            if index < skip:
                continue
            if flat_targets:  # a Dataset of scalar regression targets: (n,) -> (n, 1), like the outputs
                yb = yb.to(torch.float32).reshape(len(yb), -1)
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def _micro_batches(data: InMemory | DataLoader, batch_size: int, world: int = 1) -> int:
    return math.ceil(len(data) // world / batch_size) if isinstance(data, InMemory) else len(data)


def _steps_per_epoch(data: InMemory | DataLoader, batch_size: int, grad_accum: int, world: int = 1) -> int:
    return math.ceil(_micro_batches(data, batch_size, world) / grad_accum)


@torch.no_grad()
def evaluate(model: nn.Module, data: InMemory | DataLoader, task: str, batch_size: int,
             device: torch.device, dist: DistContext | None = None) -> dict[str, float]:
    """Mean loss (and accuracy) over `data`; with `dist`, each rank evaluates its share and the
    sums are combined, so every rank gets the metrics of the whole set."""
    was_training = model.training
    model.eval()
    loss_fn = _loss_fn(task)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    if isinstance(data, InMemory) and dist is not None:
        # Every rank runs the same number of forward passes (a sharded model gathers its weights
        # in each one), some of them possibly empty at the end.
        rank, world, span = dist.rank, dist.world_size, batch_size * dist.world_size
        chunks: Any = ((data.X[i:i + span][rank::world], data.y[i:i + span][rank::world])
                       for i in range(0, len(data), span))
    elif isinstance(data, InMemory):
        chunks = ((data.X[i:i + batch_size], data.y[i:i + batch_size])
                  for i in range(0, len(data), batch_size))
    else:
        chunks = _batches(data, batch_size, 0, 0, device, flat_targets=task == "regression")
    for xb, yb in chunks:
        out = model(xb)
        if len(xb) == 0:
            continue
        total_loss += loss_fn(out, yb) * len(xb)
        if task == "classification":
            correct += (out.argmax(dim=1) == yb).sum()
        count += len(xb)
    model.train(was_training)
    loss_total, correct_total = total_loss.item(), correct.item()
    if dist is not None:
        loss_total, correct_total, count = dist.all_sum(loss_total, correct_total, count)
    metrics = {"loss": loss_total / max(count, 1)}
    if task == "classification":
        metrics["accuracy"] = correct_total / max(count, 1)
    return metrics


