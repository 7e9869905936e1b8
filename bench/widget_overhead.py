"""What the live widget costs a training run, measured side by side in one real kernel.

    .venv/bin/python bench/widget_overhead.py [--runs 5] [--samples 30000] [--epochs 2]

The same training (the seed MLP on MNIST-shaped data, one torch thread) runs with the widget on
and off, alternately so that load from elsewhere hits both alike; the ratio of median times is
the overhead (target <= 1.03). On a shared machine that ratio is noisy, so the time spent inside
the reporter is also added up: the direct cost the loop pays for the widget. It is measured twice: with the engine's default event rate (about
50 StepEnd events an epoch) and with an event after every step (log_every=1, the worst case).
The kernel's iopub traffic is counted by this script acting as the front-end: comm messages and
bytes per run, the largest message. Last, a million StepEnd events go straight into a reporter
to price one call on the hot path and show that the traffic stays flat however long the run.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import time
from typing import Any

SETUP = """
%load_ext aiaas_lab
import time, torch
import aiaas_lab
from aiaas_lab import StopSignal
from aiaas_lab.engine.datasets import synthetic_mnist
from aiaas_lab.notebook.widget import make_widget_reporter
X, y = synthetic_mnist(n={samples}, seed=0)

class Timed:
    # The widget reporter, with the time spent inside it added up: its direct cost to the loop.

    def __init__(self):
        self.inner = make_widget_reporter("widget", StopSignal())
        self.seconds = 0.0

    def __call__(self, event):
        t0 = time.perf_counter()
        self.inner(event)
        self.seconds += time.perf_counter() - t0

def timed(widget, log_every):
    reporter = Timed() if widget else False
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
    t0 = time.perf_counter()
    result = aiaas_lab.train(net, (X, y), epochs={epochs}, batch_size=64, seed=0, log_every=log_every,
                             progress=reporter, threads=1)
    assert result.status == "completed", result
    return time.perf_counter() - t0, reporter.seconds if widget else 0.0
"""

HOT_PATH = """
from aiaas_lab.engine.events import RunStarted, StepEnd, RunEnded
from aiaas_lab.notebook.widget import make_widget_reporter

def feed(subscriber, n):
    subscriber(RunStarted(run_id="b", epochs=1, start_epoch=0, steps_per_epoch=n, batch_size=64,
                          train_samples=64 * n, val_samples=0, task="classification", num_classes=10))
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        subscriber(StepEnd(epoch=1, step=step, epoch_step=step, loss=1.0 / step, samples=64 * step))
    seconds = time.perf_counter() - t0
    subscriber(RunEnded(status="completed", epochs_completed=1, steps=n, seconds=seconds))
    return seconds

n = 1_000_000
bare = feed(lambda event: None, n)
with_widget = feed(make_widget_reporter("widget", StopSignal()), n)
(bare, with_widget)
"""


class Kernel:
    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3")

    def run(self, code: str, timeout: float = 1800) -> tuple[str, dict[str, Any]]:
        """Run a cell; return its result text and the traffic it caused on iopub."""
        msg_id = self.kc.execute(code)
        traffic = {"comm_open": 0, "comm_msgs": 0, "comm_bytes": 0, "largest": 0, "open_bytes": 0,
                   "displays": 0, "display_bytes": 0}
        result, error = "", None
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(code[:80]) from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            size = len(json.dumps(content)) + sum(len(b) for b in msg.get("buffers", []))
            if kind == "comm_open":
                traffic["comm_open"] += 1
                traffic["open_bytes"] += size
            elif kind == "comm_msg":
                traffic["comm_msgs"] += 1
                traffic["comm_bytes"] += size
                traffic["largest"] = max(traffic["largest"], size)
            elif kind in ("display_data", "update_display_data"):
                traffic["displays"] += 1
                traffic["display_bytes"] += size
            elif kind == "execute_result":
                result = content["data"]["text/plain"]
            elif kind == "error":
                error = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                break
        self.kc.get_shell_msg(timeout=30)
        if error:
            raise RuntimeError(error)
        return result, traffic

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _compare(kernel: Kernel, runs: int, log_every: str) -> dict[str, Any]:
    off, on, inside, traffic = [], [], [], []
    for i in range(runs):
        # Alternate which goes first, so drift in the machine's load favours neither.
        for widget in ((False, True) if i % 2 == 0 else (True, False)):
            text, seen = kernel.run(f"timed({widget}, {log_every})")
            total, in_reporter = (float(v) for v in text.strip("()").split(","))
            (on if widget else off).append(total)
            if widget:
                inside.append(in_reporter / total)
                traffic.append(seen)
    return {"off": statistics.median(off), "on": statistics.median(on), "best_ratio": min(on) / min(off),
            "inside": statistics.median(inside), "traffic": traffic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind per comparison")
    parser.add_argument("--samples", type=int, default=30_000)
    parser.add_argument("--epochs", type=int, default=2)
    opts = parser.parse_args()

    kernel = Kernel()
    try:
        kernel.run(SETUP.format(samples=opts.samples, epochs=opts.epochs))
        steps = opts.epochs * -(-opts.samples // 64)
        print(f"seed MLP, {opts.samples} MNIST-shaped samples, {opts.epochs} epochs of batch 64 "
              f"({steps} steps), 1 torch thread, median of {opts.runs} alternated runs each\n")
        print(f"{'events':<22}{'off s':>8}{'on s':>8}{'on/off':>8}{'best':>7}{'inside':>8}{'msgs/run':>10}{'msgs/s':>8}"
              f"{'KB/run':>8}{'largest':>9}{'open':>8}{'displays':>9}")
        for label, log_every in (("default (~50/epoch)", "None"), ("every step", "1")):
            r = _compare(kernel, opts.runs, log_every)
            t = r["traffic"]
            msgs = statistics.median(x["comm_msgs"] for x in t)
            print(f"{label:<22}{r['off']:>8.3f}{r['on']:>8.3f}{r['on'] / r['off']:>8.3f}{r['best_ratio']:>7.3f}{r['inside']:>8.2%}{msgs:>10.0f}"
                  f"{msgs / r['on']:>8.1f}{statistics.median(x['comm_bytes'] for x in t) / 1024:>8.1f}"
                  f"{max(x['largest'] for x in t):>9}{max(x['open_bytes'] for x in t):>8}"
                  f"{statistics.median(x['displays'] for x in t):>9.0f}")
        text, seen = kernel.run(HOT_PATH)
        bare, widget = (float(v) for v in text.strip("()").split(","))
        per_event = (widget - bare) / 1_000_000 * 1e6
        print(f"\n1,000,000 StepEnd events straight into a widget reporter: {per_event:.2f} us per event "
              f"over a bare callback ({widget:.2f} s vs {bare:.2f} s), {seen['comm_msgs']} comm messages "
              f"({seen['comm_msgs'] / widget:.1f}/s), {seen['comm_bytes'] / 1024:.0f} KB in all, "
              f"largest {seen['largest']} bytes")
        print("\non/off: ratio of medians; best: ratio of the fastest runs, the least disturbed by other load;")
        print("inside: share of the run's time spent inside the reporter, its direct cost to the loop.")
        print("'open' is the widget's comm_open, which carries the front-end code once per run; "
              "'largest' is the largest update.")
    finally:
        kernel.close()


if __name__ == "__main__":
    main()
