"""The text progress as a script's output shows it: one line per epoch when stdout is not a
terminal (a CI log, `make demo | tee`), never carriage-return redraws piling up on one line; NaN
and infinity by name."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import torch, aiaas_lab
X = torch.randn(400, 4); y = torch.randn(400, 1)
val = (torch.full((20, 4), 3e38), torch.full((20, 1), -3e38))  # the squared error overflows
r = aiaas_lab.train('linear', (X, y), val=val, epochs=3, progress='text', seed=0, log_every=1)
print('status', r.status)
"""


def test_a_piped_run_writes_one_line_per_epoch_with_non_finite_values_named():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout
    lines = done.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], lines
    assert all("val_loss inf" in line for line in epochs), epochs
    assert lines[-2].startswith("completed after 3 epochs") and lines[-1] == "status completed"
