"""Data-parallel training through the doors users use: `aiaas_lab.train(..., workers=N)`, the
`%aiaas train --workers N` magic in a real kernel, and `aiaas_lab.worker` run the way a server or
torchrun runs it. Two workers on digits, a few epochs: CI has two cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import aiaas_lab
from aiaas_lab import BadArgument, RunEnded, RunStarted, StepEnd, StopSignal
from aiaas_lab.engine.datasets import load_builtin_dataset
from aiaas_lab.launch.processes import _free_port

# 1,792 digits, a quarter held out: 1,344 training samples, a whole number of batches of 64
# (2 workers x 32, or 2 x 16 x 2 accumulated), so one process and two see the very same batches.
# One torch thread per process: what each of two workers gets on two cores, and what keeps a
# local run fast on a machine busy with other work.
RUN = {"val": 0.25, "epochs": 3, "seed": 0, "normalize": True, "progress": False, "threads": 1}


def digits():
    X, y = load_builtin_dataset("digits")
    return X[:1792], y[:1792]


def workers_left() -> list[psutil.Process]:
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "aiaas_lab.worker" in " ".join(child.cmdline()):
                left.append(child)
        except psutil.NoSuchProcess:
            pass
    return left


def max_difference(a: nn.Module | dict, b: nn.Module | dict) -> float:
    a = a.state_dict() if isinstance(a, nn.Module) else a
    b = b.state_dict() if isinstance(b, nn.Module) else b
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process():
    return aiaas_lab.train("mlp", digits(), batch_size=64, **RUN)


@pytest.fixture(scope="module")
def two_workers():
    events = []
    result = aiaas_lab.train("mlp", digits(), batch_size=32, workers=2, callbacks=[events.append], **RUN)
    return result, events


def test_two_workers_end_with_the_weights_of_one_process(one_process, two_workers):
    result, events = two_workers
    assert result.status == "completed", result.error
    assert isinstance(result.model, nn.Sequential)
    assert max_difference(result.model, one_process.model) < 1e-5
    for mine, theirs in zip(result.history, one_process.history, strict=True):
        assert mine.keys() == theirs.keys()
        assert all(abs(mine[k] - theirs[k]) < 1e-5 for k in mine)
    # The same events as one process, reported once (by rank 0), with global numbers.
    kinds = [e.type for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_ended" and kinds.count("epoch_end") == 3
    started = events[0]
    assert isinstance(started, RunStarted) and started.hyperparameters["workers"] == 2
    assert started.train_samples == 1344 and started.steps_per_epoch == 21
    steps = [e for e in events if isinstance(e, StepEnd)]
    assert [s.step for s in steps] == list(range(1, 64))
    assert steps[-1].samples == 3 * 1344
    assert isinstance(events[-1], RunEnded) and events[-1].status == "completed" and events[-1].steps == 63
    assert result.hyperparameters["workers"] == 2
    # predict applies the kernel-side normalisation to the copied-back model
    X, y = digits()
    accuracy = (aiaas_lab.predict(result, X, classes=True) == y).float().mean().item()
    assert accuracy > 0.85
    assert workers_left() == []


def test_gradient_accumulation_composes_with_data_parallel(one_process):
    result = aiaas_lab.train("mlp", digits(), batch_size=16, grad_accum=2, workers=2, **RUN)
    assert result.status == "completed", result.error
    assert max_difference(result.model, one_process.model) < 1e-5


def test_sharded_model_is_really_sharded_and_follows_the_same_loss_curve(tmp_path):
    # The probe records on each rank, at its first step, what the rank really holds: equal losses
    # alone cannot tell FSDP from DDP, which gives them too.
    import cloudpickle

    import helpers_models
    from helpers_models import ShardProbe

    cloudpickle.register_pickle_by_value(helpers_models)  # the workers have no tests/ on their path
    runs = {}
    for shard in (False, True):
        records = tmp_path / ("fsdp" if shard else "ddp")
        records.mkdir()
        result = aiaas_lab.train(ShardProbe(str(records)), digits(), batch_size=32, workers=2, shard=shard, **RUN)
        assert result.status == "completed", result.error
        assert result.hyperparameters["shard"] is shard
        runs[shard] = result, [json.loads((records / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, (plain, sharded) in enumerate(zip(runs[False][1], runs[True][1], strict=True)):
        assert plain["dtensor"] == [False] * 4 and plain["local_numel"] == plain["full_numel"], (rank, plain)
        assert sharded["dtensor"] == [True] * 4, (rank, sharded)
        assert 0 < sharded["local_numel"] < sharded["full_numel"] == plain["full_numel"], (rank, sharded)
    # the two ranks' shards together are the whole model, each element held once
    assert sum(r["local_numel"] for r in runs[True][1]) == runs[True][1][0]["full_numel"]
    unsharded, sharded = runs[False][0], runs[True][0]
    for mine, theirs in zip(sharded.history, unsharded.history, strict=True):
        assert abs(mine["loss"] - theirs["loss"]) < 1e-5
        assert abs(mine["val_loss"] - theirs["val_loss"]) < 1e-5
    # the full weights were gathered from the shards into the kernel's module
    assert max_difference(sharded.model, unsharded.model) < 1e-5
    assert workers_left() == []


def test_checkpoint_and_resume_across_workers(two_workers, tmp_path):
    unbroken, _ = two_workers
    options = {**RUN, "epochs": 2}
    first = aiaas_lab.train("mlp", digits(), batch_size=32, workers=2, checkpoint=str(tmp_path / "ck"), **options)
    assert first.status == "completed" and (tmp_path / "ck" / "checkpoint.safetensors").exists()
    options["epochs"] = 3
    resumed = aiaas_lab.train("mlp", digits(), batch_size=32, workers=2, checkpoint=str(tmp_path / "ck"),
                              resume=True, **options)
    assert resumed.status == "completed", resumed.error
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert abs(resumed.history[-1]["loss"] - unbroken.history[-1]["loss"]) < 1e-5
    assert max_difference(resumed.model, unbroken.model) < 1e-5


def test_stop_reaches_every_rank_and_keeps_the_weights_so_far():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stop = StopSignal()

    def stop_in_epoch_two(event):
        if isinstance(event, StepEnd) and event.epoch == 2:
            stop.request("stop requested")

    result = aiaas_lab.train(net, digits(), batch_size=32, workers=2, epochs=50, seed=0, progress=False,
                             stop=stop, callbacks=[stop_in_epoch_two])
    assert result.status == "stopped", result.error
    assert result.reason == "stop requested"
    assert 1 <= len(result.history) < 50
    assert result.model is net and max_difference(net, before) > 0  # weights copied back in place
    assert workers_left() == []


def test_a_killed_worker_fails_the_run_within_seconds_and_leaves_no_process():
    killed_at: list[float] = []

    def kill_rank_one(event):
        if isinstance(event, StepEnd) and not killed_at:
            for child in workers_left():
                if child.environ().get("RANK") == "1":
                    child.kill()
                    killed_at.append(time.monotonic())

    result = aiaas_lab.train("mlp", digits(), batch_size=32, workers=2, epochs=200, seed=0, progress=False,
                             callbacks=[kill_rank_one])
    assert killed_at, "no worker was found to kill"
    assert time.monotonic() - killed_at[0] < 10
    assert result.status == "failed"
    assert result.error.startswith("worker 1 was killed by SIGKILL"), result.error
    assert workers_left() == []


def test_a_worker_that_raises_fails_the_run_with_its_error():
    class FailsOnRankOne(nn.Module):  # a class made in the session: it travels by value
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.training and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1 \
                    and self.calls > 5:
                raise RuntimeError("rank one ran out of luck")
            return self.layer(x)

    t0 = time.monotonic()
    result = aiaas_lab.train(FailsOnRankOne(), digits(), batch_size=32, workers=2, epochs=50, seed=0,
                             progress=False)
    assert result.status == "failed"
    assert result.error.startswith("worker 1 exited with status 1: RuntimeError: rank one ran out of luck"), result.error
    assert time.monotonic() - t0 < 30
    assert workers_left() == []


def test_bad_input_is_a_clear_error_before_any_worker_starts():
    X, y = digits()
    with pytest.raises(BadArgument, match=r"^--data: expected X and y with the same number of rows"):
        aiaas_lab.train("mlp", (X, y[:-1]), workers=2, progress=False)
    with pytest.raises(BadArgument, match=r"^--shard: expected --workers 2 or more"):
        aiaas_lab.train("mlp", (X, y), shard=True, progress=False)
    dataset = torch.utils.data.TensorDataset(X, y)
    with pytest.raises(BadArgument, match=r"^--workers: expected in-memory data"):
        aiaas_lab.train("mlp", dataset, workers=2, progress=False)
    assert workers_left() == []


# -- the worker entry point, as a server or a cluster launcher runs it -------------------------

class _EventCollector(BaseHTTPRequestHandler):
    received: list[dict] = []
    auth: list[str] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).auth.append(self.headers.get("Authorization", ""))
        type(self).received.extend(json.loads(line) for line in body.decode().splitlines())
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def write_job(directory: Path, **overrides) -> Path:
    X, y = digits()
    save_file({"X": X, "y": y}, str(directory / "digits.safetensors"))
    job = {"run_id": "job-1", "model": {"name": "mlp"}, "data": "digits.safetensors", "normalize": True,
           "config": {"epochs": 2, "batch_size": 32, "seed": 0}, "threads": 1,
           "events": {"file": "events.jsonl"}, "output": "model.safetensors", "stop_file": "STOP", **overrides}
    (directory / "job.json").write_text(json.dumps(job))
    return directory / "job.json"


def read_events(path: Path) -> list[dict]:
    """The complete lines so far: a read can land while rank 0 is still writing the last one."""
    if not path.exists():
        return []
    complete = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines() if line]


def test_stop_file_stops_all_ranks_at_the_same_step_and_events_reach_a_url(tmp_path):
    # the model as a server receives it: an exported graph and its weights, no code
    from aiaas_lab.engine.export import export_module

    torch.manual_seed(0)
    graph, weights = export_module(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), digits()[0][:4])
    (tmp_path / "graph.json").write_bytes(graph)
    (tmp_path / "init.safetensors").write_bytes(weights)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EventCollector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/events"
    job = write_job(tmp_path, model={"export": {"graph": "graph.json", "weights": "init.safetensors"}},
                    config={"epochs": 500, "batch_size": 32, "seed": 0},
                    events={"file": "events.jsonl", "url": url, "token": "s3cret"})
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "aiaas_lab.worker", str(job)], stdout=subprocess.DEVNULL,
                                          stderr=log, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
    try:
        deadline = time.monotonic() + 60
        while not any(e["type"] == "epoch_end" for e in read_events(tmp_path / "events.jsonl")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()
            time.sleep(0.05)
        (tmp_path / "STOP.tmp").write_text("cancelled by the operator")
        os.replace(tmp_path / "STOP.tmp", tmp_path / "STOP")
        codes = [p.wait(timeout=30) for p in procs]
    finally:
        for p in procs:
            p.kill()
        server.shutdown()
    assert codes == [0, 0], [log.read_text() for log in logs]
    last_lines = [log.read_text().strip().splitlines()[-1] for log in logs]
    steps = [int(line.split(" after ")[1].split()[0]) for line in last_lines]
    assert steps[0] == steps[1] and steps[0] > 0, last_lines  # every rank stopped at the same step
    assert last_lines[0] == f"aiaas_lab.worker: rank 0: stopped after {steps[0]} steps with seed 0 (cancelled by the operator)"
    events = read_events(tmp_path / "events.jsonl")
    assert events[-1]["type"] == "run_ended" and events[-1]["status"] == "stopped"
    assert events[-1]["steps"] == steps[0]
    assert _EventCollector.received == events  # the same events, in order, posted with the token
    assert set(_EventCollector.auth) == {"Bearer s3cret"}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        outcome = json.loads(f.metadata()["aiaas.outcome"])
        info = json.loads(f.metadata()["aiaas.model"])
    assert outcome["status"] == "stopped" and outcome["steps"] == steps[0]
    assert info["task"] == "classification" and info["output_size"] == 10 and len(info["normalizer"]["mean"]) == 64
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert max_difference(weights, load_file(str(tmp_path / "init.safetensors"))) > 0
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_torchrun_across_two_nodes_on_localhost(tmp_path):
    job = write_job(tmp_path)
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job-1",
               "-m", "aiaas_lab.worker", str(job)]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=120)[0].decode(errors="replace") for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], outputs
    events = read_events(tmp_path / "events.jsonl")
    assert events[0]["type"] == "run_started" and events[0]["hyperparameters"]["workers"] == 2
    assert events[-1]["type"] == "run_ended" and events[-1]["status"] == "completed"
    # Two one-process nodes with batch 32 train exactly as one process with batch 64.
    X, y = digits()
    reference = aiaas_lab.train("mlp", (X, y), epochs=2, batch_size=64, seed=0, normalize=True, progress=False,
                                threads=1)
    assert max_difference(load_file(str(tmp_path / "model.safetensors")), reference.model) < 1e-5


def test_a_bad_job_is_one_paragraph_and_status_2(tmp_path):
    job = write_job(tmp_path, config={"epochs": 2, "batch_sise": 32})
    done = subprocess.run([sys.executable, "-m", "aiaas_lab.worker", str(job)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        # The job schema's own words, as train() and the server say them.
        ("aiaas_lab.worker: --batch-sise: expected a known option (--epochs, --batch-size, --lr, --optimizer, "
         "--momentum, --loss, --weight-decay, --grad-accum, --clip, --patience, --seed, --device, --normalize, "
         "--workers, --shard, --threads, --checkpoint, --resume, --log-every), but found an unknown one. "
         "Did you mean '--batch-size'?")]


# -- the magic in a real kernel -------------------------------------------------------------------

def test_magic_trains_a_notebook_class_on_two_workers(kernel):
    kernel.check("""
import torch, psutil
from torch import nn
from sklearn.datasets import load_digits
X, y = load_digits(return_X_y=True)
class Net(nn.Module):  # defined in the notebook: it reaches the workers by value
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    def forward(self, x):
        return self.body(x)
torch.manual_seed(0)
net = Net()
""")
    out = kernel.check("r = %aiaas train net --data (X, y) --val 0.2 --epochs 3 --workers 2 --normalize --seed 0 --no-widget\n"
                       "print(r.status, r.model is net, len(r.history), r.hyperparameters['workers'])", timeout=180)
    assert "completed True 3 2" in out.stdout
    assert "completed after 3 epochs" in out.stdout  # the same text progress as local training
    out = kernel.check("print(psutil.Process().children(recursive=True))")
    assert out.stdout.strip() == "[]"


def test_kernel_interrupt_stops_every_worker(kernel):
    done: dict = {}
    stepping = threading.Event()

    def on_message(msg):
        # the text progress prints a loss once rank 0 has reported steps: training is under way
        if msg["msg_type"] == "stream" and "loss" in msg["content"]["text"]:
            stepping.set()

    def run():
        done["out"] = kernel.run("r = %aiaas train mlp --data X, y --epochs 500 --workers 2 --no-widget --seed 0\n"
                                 "print('status', r.status, r.reason)", timeout=180, on_message=on_message)

    kernel.check("import psutil\nfrom sklearn.datasets import load_digits\nX, y = load_digits(return_X_y=True)")
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not stepping.wait(0.2):
        assert thread.is_alive(), f"the cell ended before training reported a step: {done.get('out')}"
        assert time.monotonic() < deadline, "training never reported a step"
    assert any("aiaas_lab.worker" in " ".join(p.cmdline()) for p in _kernel_children(kernel))
    kernel.interrupt()
    thread.join(timeout=120)
    out = done["out"]
    assert out.error is None, out.error
    assert "status stopped interrupted" in out.stdout
    assert kernel.check("print(psutil.Process().children(recursive=True))").stdout.strip() == "[]"


def _kernel_children(kernel) -> list[psutil.Process]:
    pid = kernel.manager.provisioner.process.pid
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


# -- the tutorial ----------------------------------------------------------------------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04-distributed.ipynb"


def test_tutorial_is_committed_without_outputs_and_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "TrainResult: completed, 5 epochs" in text
    gaps = [float(line.rsplit(": ", 1)[1]) for line in text.splitlines() if line.startswith("largest weight difference")]
    assert len(gaps) == 2 and max(gaps) < 1e-5
    assert "exit status 0" in text and "run_ended completed" in text and "completed after 5 epochs" in text
