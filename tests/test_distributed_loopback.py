"""The kernel's own `--workers` run: its rendezvous store and every socket its ranks listen on
are on the loopback interface, never on all interfaces."""

from __future__ import annotations

import threading
import time

import psutil
import torch

import aiaas_lab


def test_workers_listen_on_loopback_only():
    X, y = torch.randn(4000, 10), torch.randint(0, 2, (4000,))
    listening: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        me = psutil.Process()
        while not done.is_set():
            for child in me.children(recursive=True):
                try:
                    listening.update(c.laddr.ip for c in child.net_connections(kind="tcp") if c.status == "LISTEN")
                except psutil.Error:
                    pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = aiaas_lab.train("mlp", (X, y), epochs=3, workers=2, progress=False, seed=0)
    finally:
        done.set()
        watcher.join(5)
    assert result.status == "completed"
    assert listening, "no listening socket was seen: the check saw nothing"
    assert listening <= {"127.0.0.1"}, listening
