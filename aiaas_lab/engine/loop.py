"""The training loop. It reports progress only as events (see `_events`) and knows nothing of
notebooks, widgets or HTTP: whoever wants to watch passes a callable that receives each event.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .data import InMemory, Prepared
from .events import CheckpointSaved, EpochEnd, Event, RunEnded, RunStarted, StepEnd

__all__ = ["TrainConfig", "Outcome", "StopFlag", "DistContext", "fit", "make_optimizer", "resolve_device",
           "epoch_permutation", "DEFAULT_LR"]

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
OPTIMIZERS = tuple(DEFAULT_LR)
LOSSES = ("auto", "cross_entropy", "mse")
DEVICES = ("auto", "cpu", "cuda", "mps")


class StopFlag(Protocol):
    """Anything with `is_set()`; a `threading.Event` is the usual one."""

    def is_set(self) -> bool: ...


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


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: the optimizer's usual default (DEFAULT_LR)
    optimizer: str = "adam"
    loss: str = "auto"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    grad_accum: int = 1
    clip: float | None = None
    patience: int | None = None
    seed: int = 0
    device: str = "auto"
    checkpoint: str | None = None
    resume: bool = False
    log_every: int | None = None  # optimizer steps per StepEnd event; None: about 50 per epoch

    def hyperparameters(self) -> dict[str, Any]:
        params = asdict(self)
        params["lr"] = self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]
        return params


@dataclass
class Outcome:
    status: str  # "completed" | "stopped" | "failed"
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    reason: str = ""
    steps: int = 0
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay or 0.01)


def _loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, a function of (seed, epoch) alone, so a resumed run and every
    rank of a distributed run draw the same order without sharing generator state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _batches(data: InMemory | DataLoader, batch_size: int, seed: int, epoch: int,
             device: torch.device, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        for start in range(0, len(perm), batch_size):
            yield data.X.index_select(0, perm[start:start + batch_size]), y[start:start + batch_size]
    else:
        for xb, yb in data:
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
        chunks = ((xb.to(device), yb.to(device)) for xb, yb in data)
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


def fit(model: nn.Module, data: Prepared, cfg: TrainConfig, emit: Callable[[Event], None],
        stop: StopFlag, run_id: str = "", extra_state: dict[str, Any] | None = None, *,
        dist: DistContext | None = None) -> Outcome:
    """Train `model` in place. Never raises for a failure inside the loop: it ends the run with
    status "failed" and the error text, so the caller always gets the weights and history so far.

    With `dist`, this process is one rank of a data-parallel run: it trains on its shard of each
    epoch through `dist.net`, only rank 0 emits events, and a stop is acted on only once every
    rank knows of it, at the same step. A single process pays for none of this per step."""
    if dist is not None and not isinstance(data.train, InMemory):
        raise ValueError("distributed training shards in-memory data (tensors) only")
    net, rank, world = (dist.net, dist.rank, dist.world_size) if dist is not None else (model, 0, 1)
    local_stop = stop
    accumulating = dist is not None and cfg.grad_accum > 1
    if dist is not None:
        stop = threading.Event()  # set when the ranks agree to stop, at a step they all reach
        if rank != 0:
            emit = _discard
    device = resolve_device(cfg.device)
    model.to(device)
    train, val = data.train, data.val
    if isinstance(train, InMemory):
        train = InMemory(train.X.to(device), train.y.to(device))
    if isinstance(val, InMemory):
        val = InMemory(val.X.to(device), val.y.to(device))
    optimizer = make_optimizer(model, cfg)
    loss_fn = _loss_fn(data.task)
    classification = data.task == "classification"
    steps_per_epoch = _steps_per_epoch(train, cfg.batch_size, cfg.grad_accum, world)
    micro_per_epoch = _micro_batches(train, cfg.batch_size, world)
    log_every = cfg.log_every or max(1, steps_per_epoch // 50)

    history: list[dict[str, float]] = []
    start_epoch, step = 0, 0
    if cfg.resume and cfg.checkpoint and (_exists(cfg.checkpoint)):
        saved = load_checkpoint(cfg.checkpoint, model, optimizer)
        start_epoch, step, history = saved["epoch"], saved["step"], saved["history"]

    t0 = time.time()
    emit(RunStarted(run_id=run_id, epochs=cfg.epochs, start_epoch=start_epoch,
                    steps_per_epoch=steps_per_epoch, batch_size=cfg.batch_size,
                    train_samples=len(train.dataset) if isinstance(train, DataLoader) else len(train),
                    val_samples=(len(val.dataset) if isinstance(val, DataLoader) else len(val)) if val is not None else 0,
                    task=data.task, num_classes=data.num_classes,
                    hyperparameters={**cfg.hyperparameters(), **({"workers": world} if dist else {})},
                    time=t0))

    best_val, best_state, stale_epochs = math.inf, None, 0
    status, reason, error = "completed", "", None
    epoch = start_epoch
    samples = 0

    def checkpoint() -> None:
        if cfg.checkpoint and rank == 0:  # ranks hold the same weights; one writes them
            state = {"epoch": epoch, "step": step, "history": history, **(extra_state or {})}
            path = save_checkpoint(cfg.checkpoint, model, optimizer, state)
            emit(CheckpointSaved(epoch=epoch, path=str(path), time=time.time()))

    try:
        model.train()
        for epoch_index in range(start_epoch, cfg.epochs):
            if stop.is_set():  # asked between epochs: stop before the next one takes a step
                status, reason = "stopped", getattr(local_stop, "reason", "") or "stop requested"
                break
            epoch_t0 = time.perf_counter()
            epoch_samples = 0
            # Running sums stay on the device; they reach Python once per log interval.
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            micro, logged_micro, logged_loss = 0, 0, 0.0
            epoch_step = 0
            for xb, yb in _batches(train, cfg.batch_size, cfg.seed, epoch_index, device, rank, world):
                if accumulating:  # reduce gradients across ranks only on a step's last micro-batch
                    dist.sync_gradients((micro + 1) % cfg.grad_accum == 0 or micro + 1 == micro_per_epoch)  # type: ignore[union-attr]
                out = net(xb)
                loss = loss_fn(out, yb)
                (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
                micro += 1
                epoch_samples += len(xb)
                loss_sum += loss.detach()
                if classification:
                    correct += (out.detach().argmax(dim=1) == yb).sum()
                # The epoch's last micro-batch closes a partial accumulation through the same
                # step (clipping, counting, reporting) as every other.
                if micro % cfg.grad_accum == 0 or micro == micro_per_epoch:
                    if cfg.clip:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    epoch_step += 1
                    if epoch_step % log_every == 0:
                        total, seen_micro, seen = loss_sum.item(), micro, epoch_samples
                        if dist is not None:  # also where the ranks agree on a stop
                            total, seen_micro, seen, stopping = dist.all_sum(
                                total, seen_micro, seen, local_stop.is_set())
                            if stopping:
                                stop.set()
                        window = (total - logged_loss) / (seen_micro - logged_micro)
                        logged_loss, logged_micro = total, seen_micro
                        emit(StepEnd(epoch=epoch_index + 1, step=step, epoch_step=epoch_step,
                                     loss=window, samples=samples + int(seen), time=time.time()))
                if stop.is_set():
                    break
            loss_total, correct_total = loss_sum.item(), correct.item()
            if dist is not None:  # the history is global: every rank's sums, added up
                loss_total, micro, correct_total, epoch_samples, stopping = dist.all_sum(
                    loss_total, micro, correct_total, epoch_samples, local_stop.is_set())
                epoch_samples = int(epoch_samples)
                if stopping:
                    stop.set()
            samples += epoch_samples
            if stop.is_set():
                status, reason = "stopped", getattr(local_stop, "reason", "") or "stop requested"
                epoch = epoch_index  # the interrupted epoch is not complete
                break

            metrics = {"loss": loss_total / max(micro, 1)}
            if classification:
                metrics["accuracy"] = correct_total / max(epoch_samples, 1)
            if val is not None:
                for key, value in evaluate(model, val, data.task, max(cfg.batch_size, 1024), device, dist).items():
                    metrics[f"val_{key}"] = value
                model.train()
            epoch = epoch_index + 1
            seconds = time.perf_counter() - epoch_t0
            history.append({"epoch": epoch, **metrics})
            emit(EpochEnd(epoch=epoch, step=step, metrics=metrics, seconds=seconds,
                          samples_per_s=epoch_samples / seconds if seconds > 0 else 0.0, time=time.time()))
            checkpoint()

            if cfg.patience is not None and val is not None:
                if metrics["val_loss"] < best_val:
                    best_val, stale_epochs = metrics["val_loss"], 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale_epochs += 1
                    if stale_epochs >= cfg.patience:
                        model.load_state_dict(best_state)  # type: ignore[arg-type]
                        reason = (f"early stopping: val_loss did not improve for {cfg.patience} "
                                  f"epoch{'s' if cfg.patience > 1 else ''}; best weights restored")
                        break
    except Exception as exc:  # a failure inside the loop ends the run, never the caller
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    if status == "stopped":
        checkpoint()  # a stopped run can be resumed from where it stopped
    seconds = time.time() - t0
    emit(RunEnded(status=status, epochs_completed=len(history), steps=step, seconds=seconds,
                  reason=reason, error=error, time=time.time()))
    return Outcome(status=status, history=history, error=error, reason=reason, steps=step, seconds=seconds)


def _discard(event: Event) -> None:
    pass


def _exists(directory: str) -> bool:
    from pathlib import Path

    return (Path(directory) / CHECKPOINT_FILE).exists()
