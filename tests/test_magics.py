"""The magics in a real IPython kernel, the way notebook users drive them."""

from __future__ import annotations

import time

import pytest

SETUP = """
import torch, numpy as np
from torch import nn
from sklearn.datasets import load_digits
X, y = load_digits(return_X_y=True)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
"""


@pytest.fixture(scope="module")
def k(kernel):
    kernel.check(SETUP)
    return kernel


def test_train_and_predict_as_in_the_quickstart(k):
    out = k.check("result = %aiaas train net --data (X, y) --val 0.2 --epochs 10 --lr 0.005 --normalize --no-widget\nresult")
    assert "TrainResult: completed, 10 epochs" in out.text
    assert "val_accuracy" in out.text and "completed after 10 epochs" in out.stdout
    check = k.check("print(result.status, len(result.history), result.model is net, sorted(result.history[-1]),"
                    " result.history[-1]['val_accuracy'] > 0.9)")
    assert check.stdout.split("\n")[0] == "completed 10 True ['accuracy', 'epoch', 'loss', 'val_accuracy', 'val_loss'] True"
    # The magic predicts what the Python API predicts for the same module, and mostly right.
    pred = k.check("import aiaas_lab\n"
                   "labels = %aiaas predict net --data X[:5] --classes --no-widget\n"
                   "every = %aiaas predict net --data X --classes --no-widget\n"
                   "print(len(labels), labels.tolist() == aiaas_lab.predict(net, X[:5], classes=True).tolist(),"
                   " every.tolist() == aiaas_lab.predict(net, X, classes=True).tolist(),"
                   " float((torch.as_tensor(every) == torch.as_tensor(y)).float().mean()))")
    count, same_few, same_all, accuracy = pred.stdout.split()
    assert (count, same_few, same_all) == ("5", "True", "True")
    assert float(accuracy) > 0.9  # on data it has seen: a wrong or shuffled prediction would be near 0.1
    scores = k.check("s = %aiaas predict net --data X[:7] --no-widget\n"
                     "print(tuple(s.shape), torch.allclose(s, aiaas_lab.predict(net, X[:7])))")
    assert scores.stdout.strip() == "(7, 10) True"


def test_expressions_with_spaces_and_brackets_stay_whole(k):
    out = k.check("r = %aiaas train net --data (X[:300], y[ : 300]) --epochs 1 --batch-size 32 -o saved --no-widget\n"
                  "print(saved is r, saved.status, saved.hyperparameters['batch_size'])")
    assert out.stdout.strip().endswith("True completed 32")


def test_builtins_when_nothing_is_defined(k):
    out = k.check("%aiaas train mlp --data digits --epochs 2 --val 0.2 --normalize --seed 0 --no-widget")
    assert "TrainResult: completed, 2 epochs" in out.text
    pred = k.check("p = %aiaas predict mlp --data X[:3] --classes --no-widget\nprint(p)")
    assert pred.stdout.startswith("tensor([")


def test_each_builtin_training_starts_fresh_and_predict_uses_the_last(k):
    out = k.check("a = %aiaas train linear --data digits --epochs 1 --seed 3 --no-widget\n"
                  "b = %aiaas train linear --data digits --epochs 1 --seed 3 --no-widget\n"
                  "p = %aiaas predict linear --data X[:4] --no-widget\n"
                  "print(a.history == b.history, a.model is not b.model, torch.equal(p, b.model(torch.tensor(X[:4], dtype=torch.float32))),"
                  " 'linear' in globals())")
    assert out.stdout.strip().splitlines()[-1] == "True True True False"


def test_cell_magic_takes_options_from_the_body(k):
    out = k.check("%%aiaas train net -o cell\n--data (X, y)\n--epochs 2\n--optimizer sgd --lr 0.01\n"
                  "--batch-size 128 --seed 5\n--no-widget")
    assert "TrainResult: completed, 2 epochs" in out.text
    # both options of each two-option line took effect (defaults: adam, 0.001, 64, a random seed)
    out = k.check("hp = cell.hyperparameters\n"
                  "print(hp['optimizer'], hp['lr'], hp['batch_size'], hp['seed'], hp['epochs'])")
    assert out.stdout.split() == ["sgd", "0.01", "128", "5", "2"]


def test_validation_data_given_as_a_tuple_is_evaluated(k):
    out = k.check(
        "torch.manual_seed(1)\nvnet = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
        "rv = %aiaas train vnet --data (X[:1400], y[:1400]) --val (X[1400:], y[1400:]) --epochs 2 --seed 0 --no-widget\n"
        "Xv, yv = torch.tensor(X[1400:], dtype=torch.float32), torch.tensor(y[1400:])\n"
        "with torch.no_grad():\n"
        "    logits = vnet.eval()(Xv)\n"
        "last = rv.history[-1]\n"
        "print(rv.status, len(rv.history), sorted(last))\n"
        "print(last['val_loss'], nn.functional.cross_entropy(logits, yv).item())\n"
        "print(last['val_accuracy'], (logits.argmax(1) == yv).float().mean().item())")
    head, losses, accuracies = out.stdout.strip().splitlines()[-3:]
    assert head == "completed 2 ['accuracy', 'epoch', 'loss', 'val_accuracy', 'val_loss']"
    reported, computed = map(float, losses.split())
    assert abs(reported - computed) < 1e-4, losses
    reported, computed = map(float, accuracies.split())
    assert abs(reported - computed) < 1e-6 and 0.5 < computed, accuracies  # 397 held-out digits


def test_help(k):
    assert "%aiaas train MODEL --data DATA" in k.check("%aiaas --help").stdout
    text = k.check("%aiaas train --help").stdout
    for option in ("--val", "--target", "--epochs", "--batch-size", "--lr", "--optimizer", "--loss", "--grad-accum",
                   "--clip", "--patience", "--normalize", "--seed", "--device", "--checkpoint", "--resume",
                   "--no-widget", "-o NAME"):
        assert option in text, option
    assert "--classes" in k.check("%aiaas predict --help").stdout


@pytest.mark.parametrize("line, words", [
    ("%aiaas train nett --data (X, y)", ["MODEL", "'nett' is not defined", "Did you mean 'net'"]),
    ("%aiaas train net --data (XX, y)", ["--data", "'XX' is not defined", "Did you mean 'X'"]),
    ("%aiaas train net --data (X[:, :10], y)", ["--data", "expected 64 features", "found 10"]),
    ("%aiaas train net --data (X, y[:10])", ["X with 1797 rows and y with 10"]),
    ("%aiaas train net --data (X, y) --optimizer sgdd", ["--optimizer", "Did you mean 'sgd'"]),
    ("%aiaas train net --data (X, y) --epochs 0", ["--epochs", "positive whole number"]),
    ("%aiaas train net --data (X, y) --epochs two", ["--epochs", "positive whole number", "'two'"]),  # train()'s own words
    ("%aiaas train net --data (np.where(X > 8, np.nan, X), y)", ["--data", "NaN"]),
    ("%aiaas train net", ["--data"]),
    ("%aiaas trian net --data (X, y)", ["unknown command 'trian'", "Did you mean 'train'"]),
    ("%aiaas train net --data (X, y", ["unbalanced bracket"]),
])
def test_bad_input_is_one_usage_error_and_the_kernel_stays_usable(k, line, words):
    out = k.run(line)
    assert out.error is None and "Traceback" not in out.stderr
    assert out.stderr.startswith("UsageError: "), out.stderr
    for word in words:
        assert word in out.stderr, (word, out.stderr)
    assert k.check("print(1 + 1)").stdout == "2\n"


def test_a_model_that_raises_in_forward(k):
    k.check("class Broken(nn.Module):\n    def forward(self, x):\n        raise RuntimeError('shapes do not line up')\n")
    out = k.run("%aiaas train Broken() --data (X, y)")
    assert out.stderr.startswith("UsageError: MODEL: the model raised RuntimeError") and "shapes do not line up" in out.stderr


def test_interrupt_stops_training_cleanly(k):
    k.check("from aiaas_lab.engine.datasets import synthetic_mnist\nXb, yb = synthetic_mnist(seed=1)\n"
            "big = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))\n"
            "w0 = big[0].weight.detach().clone()", timeout=120)
    msg_id = k.client.execute("r = %aiaas train big --data (Xb, yb) --epochs 50 --no-widget\nprint('after', r.status)")
    deadline = time.monotonic() + 60
    started = False
    while time.monotonic() < deadline and not started:
        msg = k.client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream" and "loss" in msg["content"]["text"]:
            started = True
    assert started, "training did not start"
    k.interrupt()
    stdout, error = "", None
    while True:
        msg = k.client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            stdout += msg["content"]["text"]
        if msg["msg_type"] == "error":
            error = msg["content"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            k.client.get_shell_msg(timeout=10)
            break
    assert error is None, error
    assert "after stopped" in stdout and "(interrupted)" in stdout
    out = k.check("print(r.status, r.reason, r.model is big, not torch.equal(w0, big[0].weight))")
    assert out.stdout.strip() == "stopped interrupted True True"
    # the next cell runs normally, and a later Ctrl-C is an ordinary KeyboardInterrupt again
    assert k.check("import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)").stdout.strip() == "True"
