"""`make demo`, i.e. `python -m aiaas_lab demo`, in a subprocess: it trains the MLP on digits and
on synthetic-mnist, then predicts; what it prints is what a newcomer sees first."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiaas_lab", "demo"], capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.parametrize("data, epochs, floor", [("digits", 10, 0.9), ("synthetic-mnist", 5, 0.6)])
def test_demo_trains_and_predicts_each_data_set(demo, data, epochs, floor):
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr
    section = demo.stdout.split(f"== mlp on {data}: {epochs} epochs ==", 1)[1].split("\n== ", 1)[0]
    assert f"completed after {epochs} epochs" in section
    assert f"TrainResult: completed, {epochs} epochs" in section
    # the result's table: one row per epoch, numbered 1..epochs
    rows = re.findall(r"^\s+(\d+)\s+\d+\.\d{4}\s+\d\.\d{4}\s+\d+\.\d{4}\s+\d\.\d{4}$", section, flags=re.M)
    assert [int(r) for r in rows] == list(range(1, epochs + 1)), section
    predicted = ast.literal_eval(re.search(r"^predicted (\[.*\])$", section, flags=re.M).group(1))
    actual = ast.literal_eval(re.search(r"^   actual (\[.*\])$", section, flags=re.M).group(1))
    assert len(predicted) == len(actual) == 10 and all(0 <= p <= 9 for p in predicted)
    assert sum(p == a for p, a in zip(predicted, actual)) >= 7, (predicted, actual)
    accuracy = float(re.search(rf"^final val_accuracy on {data}: (\d\.\d{{3}})$", section, flags=re.M).group(1))
    assert accuracy > floor
