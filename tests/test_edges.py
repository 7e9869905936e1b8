"""Inputs at the edges, each one clear paragraph (never a traceback) or the right answer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import aiaas_lab
from aiaas_lab import BadArgument


def test_predict_on_a_name_without_a_backend_is_a_bad_argument():
    for model in ("mlp", 3, {"builtin": "mlp"}):
        with pytest.raises(BadArgument, match="MODEL: expected a trained torch.nn.Module"):
            aiaas_lab.predict(model, torch.randn(2, 4))


def test_a_missing_text_label_is_refused_not_learnt_as_a_class():
    df = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": ["a", None, "b", "a"]})
    with pytest.raises(BadArgument, match=r"--target: expected a label for every sample, but found 1 missing label \(first at row 1\)"):
        aiaas_lab.train("mlp", df, target="y", epochs=1, progress=False)


def test_a_model_name_is_checked_before_anything_is_sent():
    with pytest.raises(BadArgument, match="--name"):
        aiaas_lab.train("mlp", "digits", name="my model", backend="http://127.0.0.1:9", progress=False)
    with pytest.raises(BadArgument, match="--checkpoint"):
        aiaas_lab.train("mlp", "digits", checkpoint="", progress=False)


def test_predict_takes_a_column_or_a_row_as_a_series():
    df = pd.DataFrame({"income": np.linspace(0, 1, 60), "label": ["low"] * 30 + ["high"] * 30})
    result = aiaas_lab.train("mlp", df, target="label", epochs=30, lr=0.01, seed=0, progress=False, normalize=True)
    column = aiaas_lab.predict(result, df["income"], classes=True)
    assert column.shape == (60,) and (column == df["label"].to_numpy()).mean() > 0.9
    assert aiaas_lab.predict(result, df.drop(columns=["label"]).iloc[0], classes=True).tolist() == column[:1].tolist()


def _run_worker(job: dict, tmp_path, ranks: int) -> subprocess.CompletedProcess:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    command = [sys.executable, "-m", "aiaas_lab.worker", str(path)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   "-m", "aiaas_lab.worker", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_a_job_file_without_a_seed_gives_every_rank_the_same_one(tmp_path):
    done = _run_worker({"model": {"builtin": "mlp"}, "data": {"builtin": "digits"}, "val": 0.2,
                        "hyperparameters": {"epochs": 1, "threads": 1}}, tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-2000:]
    seeds = {line.rsplit("with seed ", 1)[1].split()[0] for line in done.stderr.splitlines()
             if "aiaas_lab.worker: rank" in line and "with seed" in line}
    assert len(seeds) == 1, done.stderr[-2000:]


def test_a_job_file_in_the_earlier_format_still_runs(tmp_path):
    # As the earlier kernel launcher wrote it: every TrainConfig field, momentum 0.9 for adam included.
    config = {"epochs": 1, "batch_size": 64, "lr": None, "optimizer": "adam", "loss": "auto", "weight_decay": 0.0,
              "momentum": 0.9, "grad_accum": 1, "clip": None, "patience": None, "seed": 0, "device": "auto",
              "checkpoint": None, "resume": False, "log_every": None}
    done = _run_worker({"model": {"name": "mlp"}, "data": "digits", "val": 0.2, "normalize": True, "threads": 1,
                        "config": config}, tmp_path, ranks=1)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "completed after" in done.stderr


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_weight_decay_is_applied_as_recorded(optimizer):
    X, y = torch.randn(256, 8), torch.randint(0, 2, (256,))

    def norm(decay: float | None) -> tuple[float, float]:
        result = aiaas_lab.train("mlp", (X, y), epochs=5, optimizer=optimizer, weight_decay=decay, seed=0,
                                 progress=False, threads=1)
        weights = torch.cat([p.detach().flatten() for p in result.model.parameters()])
        return float(weights.norm()), result.hyperparameters["weight_decay"]

    plain, recorded_plain = norm(0.0)
    decayed, recorded = norm(0.5)
    default, recorded_default = norm(None)
    assert recorded_plain == 0.0 and recorded == 0.5
    assert recorded_default == (0.01 if optimizer == "adamw" else 0.0)
    assert decayed < plain, (decayed, plain)  # same seed, one thread: only the decay differs
