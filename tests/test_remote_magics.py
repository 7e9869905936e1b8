"""`%aiaas connect | train --backend | predict | jobs | models | attach | cancel` in a real IPython
kernel against the real server process. Every cell's outputs are checked for the token: it is
typed once (from a variable) and must never be shown or stored in an output."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from aiaas_lab import Client

from server_fixtures import ServerProcess, aiaas_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def k(kernel: Any, aiaas_server: ServerProcess) -> Any:  # noqa: F811
    kernel.check(f"import os; os.environ.pop('AIAAS_TOKEN', None)\nURL = {aiaas_server.url!r}\n"
                 f"TOKEN = {aiaas_server.token!r}\nfrom aiaas_lab.engine.datasets import load_builtin_dataset\n"
                 "X, y = load_builtin_dataset('digits')")
    return kernel


def _outputs(out: Any) -> str:
    return json.dumps([out.stdout, out.stderr, out.results, out.displays, out.error])


def run(k: Any, code: str, token: str, timeout: float = 180) -> Any:
    out = k.run(code, timeout)
    assert token not in _outputs(out), f"the token was shown by: {code}"
    return out


def check(k: Any, code: str, token: str, timeout: float = 180) -> Any:
    out = run(k, code, token, timeout)
    assert out.error is None, f"{out.error['ename']}: {out.error['evalue']}"
    return out


def usage_error(k: Any, code: str, token: str) -> str:
    out = run(k, code, token)
    # IPython shows a UsageError as one line on stderr: no traceback, no error object
    assert out.error is None and "Traceback" not in out.stderr, out
    assert out.stderr.startswith("UsageError: ") and out.stderr.count("\n") == 1, out.stderr
    return out.stderr.removeprefix("UsageError: ").rstrip("\n")


def test_remote_commands_need_a_server_first(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    message = usage_error(k, "%aiaas jobs", aiaas_server.token)
    assert message == "No server to talk to: run %aiaas connect URL [--token T] first, or pass --backend URL."


def test_connect_errors_are_one_clear_message(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    assert usage_error(k, "%aiaas connect http://127.0.0.1:1 --token $TOKEN", token).startswith(
        "Cannot reach the server at http://127.0.0.1:1 after 4 attempts: connection refused.")
    wrong = usage_error(k, "%aiaas connect $URL --token wrong-token-0123456789", token)
    assert wrong.startswith(f"The server at {aiaas_server.url} rejected the token (401 Unauthorized)")
    assert "wrong-token-0123456789" not in wrong
    assert usage_error(k, "%aiaas connect $URL", token).startswith(f"The server at {aiaas_server.url} needs a token")
    assert usage_error(k, "%aiaas connect localhost:8000", token) == (
        "--backend: expected an http:// or https:// URL, but found 'localhost:8000'.")


def test_connect_takes_the_token_from_aiaas_token(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    try:
        # the variable is read: a wrong one is what the server rejects...
        check(k, "os.environ['AIAAS_TOKEN'] = 'wrong-env-token-0123456789'", token)
        wrong = usage_error(k, "%aiaas connect $URL", token)
        assert wrong.startswith(f"The server at {aiaas_server.url} rejected the token (401 Unauthorized)"), wrong
        # ...the right one connects, and later commands go on using it
        check(k, "os.environ['AIAAS_TOKEN'] = TOKEN", token)
        out = check(k, "%aiaas connect $URL", token)
        assert out.stdout.startswith(f"Connected to {aiaas_server.url} (aiaas-lab "), out.stdout
        jobs = check(k, "%aiaas jobs", token)
        assert jobs.stderr == "" and jobs.results, jobs  # no UsageError: the server took the variable's token
        # --token, when given, wins over the variable
        check(k, "os.environ['AIAAS_TOKEN'] = 'wrong-env-token-0123456789'", token)
        out = check(k, "%aiaas connect $URL --token $TOKEN", token)
        assert out.stdout.startswith(f"Connected to {aiaas_server.url}"), out.stdout
    finally:
        check(k, "os.environ.pop('AIAAS_TOKEN', None)", token)


def test_connect_then_train_predict_jobs_models(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    out = check(k, "%aiaas connect $URL --token $TOKEN", token)
    assert out.stdout.startswith(f"Connected to {aiaas_server.url} (aiaas-lab ") and out.results == []
    assert check(k, "print(get_ipython().magics_manager.registry['AiaasMagics'].backend)", token).stdout.strip() \
        == aiaas_server.url

    out = check(k, "r = %aiaas train mlp --data digits --epochs 2 --val 0.2 --normalize --name magic-mlp --no-widget\n"
                   "print(r.status, r.model_name, r.job_id, len(r.history))", token)
    assert f"on {aiaas_server.url}: model sent as the built-in 'mlp'; the built-in 'digits' data." in out.stdout
    assert "completed after 2 epochs" in out.stdout
    status, name, job_id, epochs = out.stdout.strip().splitlines()[-1].split()
    assert (status, name, epochs) == ("completed", "magic-mlp", "2")

    # `mlp` now names the module trained last; predicting with it goes to the server it came from
    out = check(k, "a = %aiaas predict mlp --data X[:20] --classes --no-widget\n"
                   "b = %aiaas predict magic-mlp --data X[:20] --classes --no-widget\n"
                   "import aiaas_lab\nc = aiaas_lab.predict(r.model, X[:20], classes=True)\n"
                   "print(a.tolist() == b.tolist() == c.tolist(), (a == y[:20]).float().mean().item() > 0.5)", token)
    assert out.stdout.strip() == "True True"

    jobs = check(k, "%aiaas jobs", token).text
    assert re.search(rf"{job_id}\s+succeeded\s+\S+ \S+\s+magic-mlp:1\s+\d\.\d{{4}}", jobs), jobs
    models = check(k, "%aiaas models", token).text
    assert re.search(rf"magic-mlp\s+1\s+{job_id}\s+classification\s+\[N, 64\]\s+\[N, 10\]", models), models

    # attach replays the finished job into new text progress and returns its result
    out = check(k, f"r2 = %aiaas attach {job_id} --no-widget\nprint(r2.status, r2.history == r.history, "
                   "type(r2.model).__name__)", token)
    assert "epoch 2/2" in out.stdout and "completed after 2 epochs" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "completed True Sequential"


def test_attach_and_cancel_errors(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    expected = (f"JOB_ID: expected a job on {aiaas_server.url}, but found 'job-nope', which it does not have. "
                "%aiaas jobs lists them.")
    assert usage_error(k, "%aiaas attach job-nope --no-widget", token) == expected
    assert usage_error(k, "%aiaas cancel job-nope", token) == expected
    assert usage_error(k, "%aiaas attach", token).startswith("the following arguments are required: JOB_ID")
    message = usage_error(k, "%aiaas predict no-such-model --data X[:2] --no-widget", token)
    assert message.startswith(f"MODEL: expected a model served at {aiaas_server.url}, but found 'no-such-model'")
    assert "Models there: magic-mlp." in message


def test_cancel_a_background_job(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    check(k, "h = %aiaas train mlp --data digits --epochs 500 --background --no-widget", token)
    out = check(k, "import time\nwhile h.client.get_job(h.job_id)['status'] == 'queued': time.sleep(0.1)\n"
                   "%aiaas cancel {h.job_id}\nprint(h.wait(60).status)", token)
    # the handle's text progress shares the cell's output; the cancel line and the result are there.
    # The server answers once the job has stopped or after a short wait, whichever comes first,
    # so the line says "cancelled" or, on a busy machine, still "running".
    assert re.search(r"job job-\w+: (cancelled|running)\n", out.stdout) and out.stdout.endswith("\nstopped\n"), out.stdout
    job_id = check(k, "print(h.job_id)", token).stdout.strip()
    with Client(aiaas_server.url, token) as c:
        assert c.get_job(job_id)["status"] == "cancelled"


def test_interrupt_cancels_the_job_on_the_server(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    msg_id = k.client.execute("r = %aiaas train mlp --data digits --epochs 500 --no-widget\nprint('after', r.status)")
    deadline = time.monotonic() + 90
    stdout, started = "", False
    while time.monotonic() < deadline and not started:
        msg = k.client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            stdout += msg["content"]["text"]
            started = "loss" in stdout
    assert started, "the job did not start"
    job_id = re.search(r"aiaas: job (job-\w+)", stdout).group(1)
    k.interrupt()
    error = None
    while True:
        msg = k.client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            stdout += msg["content"]["text"]
        elif msg["msg_type"] == "error":
            error = msg["content"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            k.client.get_shell_msg(timeout=10)
            break
    assert error is None, error
    assert "after stopped" in stdout and aiaas_server.token not in stdout
    with Client(aiaas_server.url, aiaas_server.token) as c:
        assert c.get_job(job_id)["status"] == "cancelled"
    assert check(k, "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)",
                 aiaas_server.token).stdout.strip() == "True"


def test_remote_training_drives_the_widget(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    out = check(k, "r = %aiaas train linear --data digits --epochs 2\nprint(r.status)", aiaas_server.token)
    assert out.stdout.strip().endswith("completed")
    assert out.comm_messages > 0  # the live widget, fed by the server's events


def test_attach_loads_a_custom_module_into_the_given_one(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    token = aiaas_server.token
    out = check(k, "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
                   "net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n"
                   "own = %aiaas train net --data (X, y) --epochs 2 --name own-net --no-widget\n"
                   "twin = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n"
                   "bare = %aiaas attach {own.job_id} --no-widget\n"
                   "again = %aiaas attach {own.job_id} --model twin --no-widget\n"
                   "print(bare.model is None, again.model is twin, torch.equal(twin[0].weight, net[0].weight))", token)
    assert "model sent as a torch.export graph" in out.stdout
    assert "own-net is a custom module, so it is not rebuilt here: pass --model NET" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "True True True"


def _follow(k: Any, msg_id: str, seen: dict[str, Any], until: str, timeout: float = 120) -> None:
    """Read the cell's iopub messages until its stdout shows `until`, or it ends."""
    deadline = time.monotonic() + timeout
    while until not in seen["stdout"] and not seen["idle"]:
        assert time.monotonic() < deadline, f"no {until!r} in {seen['stdout'][-2000:]!r}"
        msg = k.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            seen["stdout"] += content["text"]
        elif kind == "error":
            seen["error"] = content
        elif kind == "status" and content["execution_state"] == "idle":
            k.client.get_shell_msg(timeout=10)
            seen["idle"] = True


def test_attach_after_a_kernel_restart_follows_the_job_live(k: Any, aiaas_server: ServerProcess) -> None:  # noqa: F811
    """Last in this module: it restarts the shared kernel. The job is far too long to end on its
    own; the test cancels it only once attach is following, so attach must see that live."""
    token = aiaas_server.token
    out = check(k, "h = %aiaas train mlp --data digits --epochs 5000 --batch-size 16 --background --no-widget\n"
                   "print(h.job_id)", token)
    job_id = out.stdout.strip().splitlines()[-1]
    k.manager.restart_kernel(now=True)
    k.client.wait_for_ready(timeout=60)
    check(k, f"%load_ext aiaas_lab\nURL = {aiaas_server.url!r}\nTOKEN = {aiaas_server.token!r}", token)
    with Client(aiaas_server.url, token) as c:
        assert c.get_job(job_id)["status"] in ("queued", "running")  # the job outlived the kernel
    check(k, "%aiaas connect $URL --token $TOKEN", token)
    msg_id = k.client.execute(f"r = %aiaas attach {job_id} --no-widget\nprint('attached', r.status, r.job_id)")
    seen: dict[str, Any] = {"stdout": "", "error": None, "idle": False}
    _follow(k, msg_id, seen, "epoch 2/5000")  # training progress, replayed or live
    assert not seen["idle"], seen
    with aiaas_server.client() as http:
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
    _follow(k, msg_id, seen, "\0never printed\0")  # until the cell ends
    assert token not in seen["stdout"]
    assert seen["error"] is None, seen["error"]
    assert "epoch 1/5000" in seen["stdout"]
    assert seen["stdout"].strip().splitlines()[-1] == f"attached stopped {job_id}"
    with Client(aiaas_server.url, token) as c:
        assert c.get_job(job_id)["status"] == "cancelled"
