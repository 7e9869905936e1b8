"""aiaas-lab: train and use PyTorch models from a notebook, locally or on a remote server.

    %load_ext aiaas_lab
    %aiaas train net --data (X, y) --epochs 5
"""

from __future__ import annotations

from ._api import StopSignal, TrainResult, predict, train
from .client.client import AsyncClient, Client
from ._errors import AiaasError, BadArgument
from .engine.events import (
    CheckpointSaved,
    EpochEnd,
    Event,
    RunEnded,
    RunStarted,
    StepEnd,
    event_from_dict,
    event_from_json,
)
from .notebook.progress import TextProgress

__version__ = "0.1.0"

__all__ = [
    "train",
    "predict",
    "TrainResult",
    "StopSignal",
    "AiaasError",
    "BadArgument",
    "Event",
    "RunStarted",
    "StepEnd",
    "EpochEnd",
    "CheckpointSaved",
    "RunEnded",
    "event_from_dict",
    "event_from_json",
    "TextProgress",
    "Client",
    "AsyncClient",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    from .notebook.magic import AiaasMagics

    ipython.register_magics(AiaasMagics)


def unload_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    pass
