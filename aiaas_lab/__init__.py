"""aiaas-lab: train and use PyTorch models from a notebook, locally or on a remote server.

    %load_ext aiaas_lab
    %aiaas train net --data (X, y) --epochs 5

The names below load on first use (PEP 562): `import aiaas_lab` imports no torch, and a plain
script's `aiaas_lab.train(...)` imports nothing of IPython, widgets, httpx or the server.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "train": "._api", "predict": "._api", "attach": "._api",
    "TrainResult": ".launch.result", "StopSignal": ".launch.handle", "RunHandle": ".launch.handle",
    "AiaasError": "._errors", "BadArgument": "._errors",
    "Event": ".engine.events", "RunStarted": ".engine.events", "StepEnd": ".engine.events",
    "EpochEnd": ".engine.events", "CheckpointSaved": ".engine.events", "RunEnded": ".engine.events",
    "event_from_dict": ".engine.events", "event_from_json": ".engine.events",
    "Hyperparameters": ".engine.job", "Preprocessing": ".engine.inputs",
    "TextProgress": ".notebook.progress",
    "Client": ".client", "AsyncClient": ".client",
}

__all__ = [*_EXPORTS, "__version__", "load_ipython_extension", "unload_ipython_extension"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aiaas_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    from .notebook.magic import AiaasMagics

    ipython.register_magics(AiaasMagics)


def unload_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    pass
