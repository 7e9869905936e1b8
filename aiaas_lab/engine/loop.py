"""The training loop. It reports progress only as events (see `_events`) and knows nothing of
notebooks, widgets or HTTP: whoever wants to watch passes a callable that receives each event.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .data import InMemory, Prepared
from .events import CheckpointSaved, EpochEnd, Event, RunEnded, RunStarted, StepEnd
from .epochs import DistContext, _batches, _loss_fn, _micro_batches, _steps_per_epoch, epoch_permutation, evaluate
from .job import DEFAULT_LR, DEFAULT_MOMENTUM, DEFAULT_WEIGHT_DECAY, DEVICES, LOSSES, OPTIMIZERS, Hyperparameters

__all__ = ["TrainConfig", "Outcome", "StopFlag", "DistContext", "fit", "make_optimizer", "resolve_device",
           "epoch_permutation", "DEFAULT_LR", "OPTIMIZERS", "LOSSES", "DEVICES", "not_finite_reason"]


class StopFlag(Protocol):
    """Anything with `is_set()`; a `threading.Event` is the usual one."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: the optimizer's usual default (DEFAULT_LR)
    optimizer: str = "adam"
    loss: str = "auto"
    weight_decay: float | None = None  # None: 0, or AdamW's 0.01
    momentum: float | None = None  # sgd only; None: 0.9
    grad_accum: int = 1
    clip: float | None = None
    patience: int | None = None
    seed: int = 0
    device: str = "auto"
    checkpoint: str | None = None
    resume: bool = False
    log_every: int | None = None  # optimizer steps per StepEnd event; None: about 50 per epoch
    # Recorded with the run, decided outside the loop (preparation, the launcher).
    normalize: bool = False
    workers: int = 1
    shard: bool = False
    threads: int | None = None

    @classmethod
    def from_hyperparameters(cls, h: Hyperparameters, **overrides: Any) -> TrainConfig:
        """The loop's settings for a job's (checked) hyperparameters: the one conversion."""
        r = h.resolved()
        settings: dict[str, Any] = dict(
            epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, optimizer=r.optimizer, loss=r.loss,
            weight_decay=r.weight_decay, momentum=r.momentum, grad_accum=r.grad_accum, clip=r.clip,
            patience=r.patience, seed=r.seed or 0, device=r.device, checkpoint=r.checkpoint, resume=r.resume,
            normalize=r.normalize, workers=r.workers, shard=r.shard, threads=r.threads, log_every=r.log_every)
        return cls(**{**settings, **overrides})

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]

    @property
    def resolved_momentum(self) -> float | None:
        if self.optimizer != "sgd":
            return None
        return self.momentum if self.momentum is not None else DEFAULT_MOMENTUM

    def hyperparameters(self) -> dict[str, Any]:
        """What the run uses, as recorded: every default resolved, the device included."""
        params = asdict(self)
        params.pop("log_every")
        params.update(lr=self.resolved_lr, weight_decay=self.resolved_weight_decay,
                      momentum=self.resolved_momentum, device=str(resolve_device(self.device)))
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
    lr, decay = cfg.resolved_lr, cfg.resolved_weight_decay
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.resolved_momentum or 0.0, weight_decay=decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def not_finite_reason(step: int, value: float, *, checked_every: int = 1) -> str:
    """The one sentence a diverged run ends with, on every launcher."""
    kind = "NaN" if math.isnan(value) else "infinite"
    where = f"at step {step}" if checked_every == 1 else f"by step {step} (checked every {checked_every} steps)"
    return (f"the training loss was not finite ({kind}) {where}; the run stopped there. "
            "Try a lower --lr, --clip 1.0, or --normalize for features on very different scales.")


def fit(model: nn.Module, data: Prepared, cfg: TrainConfig, emit: Callable[[Event], None],
        stop: StopFlag, run_id: str = "", extra_state: dict[str, Any] | None = None, *,
        dist: DistContext | None = None) -> Outcome:
    """Train `model` in place. Never raises for a failure inside the loop: it ends the run with
    status "failed" and the error text, so the caller always gets the weights and history so far.

    A stop is taken at an optimizer-step boundary; with `checkpoint`, the position in the epoch is
    saved too, so a resumed run continues with the next batch and takes exactly the steps an
    uninterrupted run would. A loss that is not finite ends the run as failed at that step.

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
    flat_targets = not classification and not isinstance(train, InMemory)
    steps_per_epoch = _steps_per_epoch(train, cfg.batch_size, cfg.grad_accum, world)
    micro_per_epoch = _micro_batches(train, cfg.batch_size, world)
    log_every = cfg.log_every or max(1, steps_per_epoch // 50)
    # On the CPU, reading the loss costs well under a microsecond, so each step's loss is checked
    # and a divergence stops at that very step, before its update. On an accelerator that read is a
    # device sync, and across ranks agreeing costs a collective: there the check rides on the
    # reads the loop already makes, every `log_every` steps.
    check_each_step = device.type == "cpu" and dist is None

    history: list[dict[str, float]] = []
    start_epoch, step = 0, 0
    partial: dict[str, Any] = {}  # the position and sums of an epoch stopped part-way
    best_val, best_state, stale_epochs = math.inf, None, 0
    # Dropout and other randomness in the model draw from torch's generator: seeded, and saved
    # with every checkpoint, so a run is repeatable and a resumed one continues the same draws.
    torch.manual_seed(cfg.seed)
    if cfg.resume and cfg.checkpoint and (_exists(cfg.checkpoint)):
        saved = load_checkpoint(cfg.checkpoint, model, optimizer)
        start_epoch, step, history = saved["epoch"], saved["step"], saved["history"]
        partial = saved.get("partial") or {}
        if not isinstance(train, InMemory) or partial.get("world", 1) != world:
            partial = {}  # a DataLoader's order cannot be replayed: that epoch starts over
        tensors = saved.get("tensors") or {}
        if "rng" in tensors:
            torch.set_rng_state(tensors["rng"])
        best_val = float(saved["best_val"]) if saved.get("best_val") is not None else math.inf
        stale_epochs = int(saved.get("stale_epochs", 0))
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        best_state = {k: v.to(device) for k, v in best.items()} or None

    t0 = time.time()
    emit(RunStarted(run_id=run_id, epochs=cfg.epochs, start_epoch=start_epoch,
                    steps_per_epoch=steps_per_epoch, batch_size=cfg.batch_size,
                    train_samples=len(train.dataset) if isinstance(train, DataLoader) else len(train),
                    val_samples=(len(val.dataset) if isinstance(val, DataLoader) else len(val)) if val is not None else 0,
                    task=data.task, num_classes=data.num_classes,
                    hyperparameters={**cfg.hyperparameters(), "workers": world},
                    time=t0))

    status, reason, error = "completed", "", None
    epoch = start_epoch
    samples = 0
    position: dict[str, Any] = {}

    def checkpoint() -> None:
        if cfg.checkpoint and rank == 0:  # ranks hold the same weights; one writes them
            state = {"epoch": epoch, "step": step, "history": history, "partial": position or None,
                     "seed": cfg.seed, "best_val": best_val if math.isfinite(best_val) else None,
                     "stale_epochs": stale_epochs, **(extra_state or {})}
            extra = {"rng": torch.get_rng_state(), **{f"best.{k}": v for k, v in (best_state or {}).items()}}
            path = save_checkpoint(cfg.checkpoint, model, optimizer, state, extra)
            emit(CheckpointSaved(epoch=epoch, path=str(path), time=time.time()))

    try:
        model.train()
        for epoch_index in range(start_epoch, cfg.epochs):
            if stop.is_set():  # asked between epochs: stop before the next one takes a step
                status, reason = "stopped", getattr(local_stop, "reason", "") or "stop requested"
                position = partial if partial.get("epoch") == epoch_index else {}  # not yet replayed
                break
            epoch_t0 = time.perf_counter()
            resumed = partial if partial.get("epoch") == epoch_index else {}
            partial = {}
            micro = int(resumed.get("micro", 0))
            epoch_step = int(resumed.get("epoch_step", 0))
            epoch_samples = int(resumed.get("samples", 0))
            # Running sums stay on the device; they reach Python once per log interval.
            loss_sum = torch.tensor(float(resumed.get("loss_sum", 0.0)), device=device)
            correct = torch.tensor(int(resumed.get("correct", 0)), dtype=torch.int64, device=device)
            logged_micro, logged_loss = micro, float(resumed.get("loss_sum", 0.0))
            bad: tuple[int, float] | None = None
            for xb, yb in _batches(train, cfg.batch_size, cfg.seed, epoch_index, device, rank, world,
                                   skip=micro, flat_targets=flat_targets):
                if accumulating:  # reduce gradients across ranks only on a step's last micro-batch
                    dist.sync_gradients((micro + 1) % cfg.grad_accum == 0 or micro + 1 == micro_per_epoch)  # type: ignore[union-attr]
                out = net(xb)
                loss = loss_fn(out, yb)
                if check_each_step:
                    value = loss.item()
                    if not math.isfinite(value):
                        bad = (step + 1, value)
                        break
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
                        if not math.isfinite(window):
                            bad = (step, window)
                            break
                        logged_loss, logged_micro = total, seen_micro
                        emit(StepEnd(epoch=epoch_index + 1, step=step, epoch_step=epoch_step,
                                     loss=window, samples=samples + int(seen), time=time.time()))
                    # A stop is taken only here, between optimizer steps: no accumulated
                    # gradient is lost, and a resumed run replays nothing.
                    if stop.is_set():
                        break
            if bad is not None:
                status = "failed"
                reason = error = not_finite_reason(bad[0], bad[1], checked_every=1 if check_each_step else log_every)
                epoch = epoch_index
                break
            loss_total, correct_total = loss_sum.item(), correct.item()
            if dist is not None:  # the history is global: every rank's sums, added up
                loss_total, micro_total, correct_total, epoch_total, stopping = dist.all_sum(
                    loss_total, micro, correct_total, epoch_samples, local_stop.is_set())
                if stopping:
                    stop.set()
            else:
                micro_total, epoch_total = micro, epoch_samples
            if not math.isfinite(loss_total):  # diverged after the last log interval
                status = "failed"
                reason = error = not_finite_reason(step, loss_total, checked_every=log_every)
                epoch = epoch_index
                break
            if stop.is_set() and micro < micro_per_epoch:
                status, reason = "stopped", getattr(local_stop, "reason", "") or "stop requested"
                epoch = epoch_index  # the interrupted epoch is not complete
                position = {"epoch": epoch_index, "micro": micro, "epoch_step": epoch_step, "samples": epoch_samples,
                            "loss_sum": float(loss_sum.item()), "correct": int(correct.item()), "world": world}
                break
            samples += int(epoch_total)

            metrics = {"loss": loss_total / max(micro_total, 1)}
            if classification:
                metrics["accuracy"] = correct_total / max(epoch_total, 1)
            if val is not None:
                for key, value in evaluate(model, val, data.task, max(cfg.batch_size, 1024), device, dist).items():
                    metrics[f"val_{key}"] = value
                model.train()
            epoch = epoch_index + 1
            seconds = time.perf_counter() - epoch_t0
            history.append({"epoch": epoch, **metrics})
            emit(EpochEnd(epoch=epoch, step=step, metrics=metrics, seconds=seconds,
                          samples_per_s=epoch_total / seconds if seconds > 0 else 0.0, time=time.time()))
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
            if stop.is_set():  # asked during the epoch's last step: the epoch is complete
                if epoch < cfg.epochs:
                    status, reason = "stopped", getattr(local_stop, "reason", "") or "stop requested"
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
