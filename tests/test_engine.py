"""The engine through the public Python API: events, metrics, optimisation options, stop, resume."""

from __future__ import annotations

import torch
from torch import nn

import aiaas_lab
from aiaas_lab import EpochEnd, RunEnded, RunStarted, StepEnd, StopSignal
from aiaas_lab.engine.datasets import load_builtin_dataset


def digits():
    return load_builtin_dataset("digits")


def small_net(inputs=64, outputs=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, outputs))


def test_event_sequence_is_exact():
    X, y = digits()
    events = []
    result = aiaas_lab.train(small_net(), (X[:640], y[:640]), epochs=2, batch_size=64, seed=1,
                             progress=False, callbacks=[events.append])
    kinds = [e.type for e in events]
    # 640 samples / 64 = 10 steps per epoch, fewer than 50, so every step is reported.
    expected = ["run_started"] + (["step"] * 10 + ["epoch_end"]) * 2 + ["run_ended"]
    assert kinds == expected
    started, ended = events[0], events[-1]
    assert isinstance(started, RunStarted) and started.steps_per_epoch == 10 and started.epochs == 2
    assert started.task == "classification" and started.num_classes == 10 and started.train_samples == 640
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert [s.step for s in steps] == list(range(1, 21))
    assert [s.epoch_step for s in steps] == list(range(1, 11)) * 2
    assert steps[-1].samples == 1280
    assert isinstance(ended, RunEnded) and ended.status == "completed" and ended.steps == 20
    epoch_events = [e for e in events if isinstance(e, EpochEnd)]
    assert [e.metrics for e in epoch_events] == [{k: v for k, v in h.items() if k != "epoch"} for h in result.history]
    # Step losses are window means: their mean over an epoch is that epoch's loss.
    first_epoch = [s.loss for s in steps[:10]]
    assert abs(sum(first_epoch) / 10 - result.history[0]["loss"]) < 1e-5


def test_long_epochs_report_about_fifty_steps():
    X = torch.randn(64 * 200, 4)
    y = (X[:, 0] > 0).long()
    events = []
    aiaas_lab.train(small_net(4, 2), (X, y), epochs=1, batch_size=64, progress=False, callbacks=[events.append])
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert 40 <= len(steps) <= 60  # 200 steps, reported every 4


def test_classification_learns_digits_with_validation():
    X, y = digits()
    result = aiaas_lab.train(small_net(), (X, y), val=0.2, epochs=8, lr=0.005, normalize=True, seed=0, progress=False)
    assert result.status == "completed"
    assert [h["epoch"] for h in result.history] == list(range(1, 9))
    assert set(result.history[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert result.history[-1]["val_accuracy"] > 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_regression_is_detected_from_float_targets():
    torch.manual_seed(0)
    X = torch.randn(512, 3)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
    net = nn.Linear(3, 1)
    result = aiaas_lab.train(net, (X.numpy(), y.numpy()), epochs=30, lr=0.05, optimizer="sgd", val=0.25, progress=False)
    assert result.task == "regression"
    assert set(result.history[-1]) == {"epoch", "loss", "val_loss"}
    assert result.history[-1]["val_loss"] < 0.01
    out = aiaas_lab.predict(net, X[:4])
    assert out.shape == (4, 1)


def test_grad_accumulation_matches_a_larger_batch():
    X, y = digits()
    a, b = small_net(seed=3), small_net(seed=3)
    common = dict(epochs=2, optimizer="sgd", lr=0.05, seed=7, progress=False)
    aiaas_lab.train(a, (X[:1024], y[:1024]), batch_size=64, **common)
    aiaas_lab.train(b, (X[:1024], y[:1024]), batch_size=16, grad_accum=4, **common)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_gradient_clipping_bounds_each_update():
    X, y = digits()
    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    result = aiaas_lab.train(net, (X[:256], y[:256]), batch_size=64, epochs=1, optimizer="sgd", lr=1.0,
                             clip=1e-3, progress=False)
    moved = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(net.parameters(), before)))
    # SGD with momentum 0.9: each step moves at most lr * clip * (1 + 0.9 + 0.81 + ...) < 10 * lr * clip.
    assert result.status == "completed" and 0 < moved.item() < 4 * 10 * 1e-3


def test_early_stopping_restores_the_best_weights():
    torch.manual_seed(0)
    X = torch.randn(300, 20)
    y = torch.randint(0, 2, (300,))  # no signal: validation loss soon rises
    net = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 2))
    result = aiaas_lab.train(net, (X, y), val=0.3, epochs=200, lr=0.01, patience=3, seed=0, progress=False)
    assert result.status == "completed" and result.reason.startswith("early stopping")
    assert len(result.history) < 200
    best = min(h["val_loss"] for h in result.history)
    # the restored weights are the best epoch's: evaluating them gives the best val_loss again
    from aiaas_lab.engine.data import prepare_data
    from aiaas_lab.engine.loop import evaluate

    prepared = prepare_data((X, y), val=0.3, seed=0)
    assert abs(evaluate(net, prepared.val, "classification", 1024, torch.device("cpu"))["loss"] - best) < 1e-5


def test_stop_signal_ends_the_run_at_a_step_boundary():
    X, y = digits()
    stop = StopSignal()
    events = []

    def stop_at_five(event):
        events.append(event)
        if isinstance(event, StepEnd) and event.step == 5:
            stop.request()

    net = small_net()
    before = net[0].weight.detach().clone()
    result = aiaas_lab.train(net, (X, y), epochs=5, batch_size=32, stop=stop, progress=False, callbacks=[stop_at_five])
    assert result.status == "stopped" and result.reason == "stop requested"
    assert events[-1].type == "run_ended" and events[-1].steps == 5
    assert result.history == []  # the first epoch never completed
    assert result.model is net and not torch.equal(before, net[0].weight)


def test_failure_inside_the_loop_returns_a_failed_result():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 4:
                raise RuntimeError("the GPU caught fire")
            return self.lin(x)

    X, y = digits()
    events = []
    result = aiaas_lab.train(Flaky(), (X, y), epochs=2, progress=False, callbacks=[events.append])
    assert result.status == "failed" and "the GPU caught fire" in result.error
    assert events[-1].type == "run_ended" and events[-1].status == "failed"


def test_checkpoint_and_resume_continue_the_same_run(tmp_path):
    X, y = digits()
    data = (X[:512], y[:512])
    common = dict(epochs=4, batch_size=64, seed=5, optimizer="adam", progress=False)
    straight = small_net(seed=1)
    full = aiaas_lab.train(straight, data, **common)

    first = small_net(seed=1)
    stop = StopSignal()
    events = []

    def stop_after_two_epochs(event):
        events.append(event)
        if isinstance(event, EpochEnd) and event.epoch == 2:
            stop.request()

    part = aiaas_lab.train(first, data, checkpoint=str(tmp_path), stop=stop, callbacks=[stop_after_two_epochs], **common)
    assert part.status == "stopped" and len(part.history) == 2
    assert (tmp_path / "checkpoint.safetensors").exists()
    assert [e.type for e in events].count("checkpoint") >= 2

    resumed_net = small_net(seed=99)  # different initial weights: the checkpoint must replace them
    resumed = aiaas_lab.train(resumed_net, data, checkpoint=str(tmp_path), resume=True, **common)
    assert resumed.status == "completed"
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(full.history, resumed.history):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    for pa, pb in zip(straight.parameters(), resumed_net.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
