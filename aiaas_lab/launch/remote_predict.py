"""Prediction on a server over the V2 inference protocol (so also MLServer or Triton), with the
same preprocessing and the same labels as local predict."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._errors import AiaasError, BadArgument, close_matches, describe
from ..client.client import Client, RemoteError, _normalize_url
from ..engine.inputs import Preprocessing, class_indices, features, prediction_inputs
from .remote import SERVER_MODELS, client_for
from .result import TrainResult, preprocessing_of

__all__ = ["predict_remote"]



def _server_model(model: Any, url: str) -> tuple[str, int | None]:
    if isinstance(model, TrainResult):
        if model.model_name is None:
            raise BadArgument("MODEL", "a server model's name or a model trained with --backend",
                              "a TrainResult of local training", "Predict without --backend to use it here.")
        known = SERVER_MODELS.get(model.model) if model.model is not None else None
        return model.model_name, known[2] if known and known[1] == model.model_name else None
    if isinstance(model, str):
        return model, None
    if isinstance(model, nn.Module):
        known = SERVER_MODELS.get(model)
        if known is None:
            raise BadArgument("MODEL", "a server model's name or a model trained with --backend",
                              f"a {type(model).__name__} trained locally", "Predict without --backend to use it here.")
        if known[0] != url:
            raise BadArgument("MODEL", f"a model on {url}", f"a {type(model).__name__} trained on {known[0]}")
        return known[1], known[2]
    raise BadArgument("MODEL", "a server model's name, a TrainResult or an nn.Module trained with --backend",
                      describe(model))


def _server_preprocessing(client: Client, name: str, version: int | None) -> Preprocessing | None:
    """What the server recorded of a model's inputs; None from servers that are not aiaas-lab."""
    try:
        entries = [m for m in client.models() if m["name"] == name]
    except AiaasError:  # MLServer, Triton: no /v1/models
        return None
    entry = next((m for m in entries if version is None or m.get("version") == version), None)
    if entry is None or not entry.get("preprocessing"):
        return None
    return Preprocessing.from_dict(entry["preprocessing"])


def predict_remote(model: Any, data: Any, *, batch_size: int = 1024, classes: bool = False, backend: str,
                   token: str | None = None) -> Any:
    """Run a model served at `backend` over the V2 inference protocol (so also MLServer or Triton).
    DataFrames are encoded here as in training; the server applies the model's normalizer."""
    url = _normalize_url(backend)
    name, version = _server_model(model, url)
    data = prediction_inputs(data)
    with client_for(url, token) as client:
        prep = preprocessing_of(model) if not isinstance(model, str) else None
        if prep is None:
            prep = _server_preprocessing(client, name, version)
        encoder = None if prep is None else Preprocessing(**{**prep.__dict__, "normalizer": None})
        X = features(data, encoder)
        try:
            out = torch.cat([client.infer(name, X[i:i + int(batch_size)], version=version)
                             for i in range(0, X.shape[0], int(batch_size))])
        except RemoteError as exc:
            if exc.status != 404:
                raise
            raise BadArgument("MODEL", f"a model served at {url}", f"{name!r}, which it does not have",
                              _known_models(client, name)) from None
    if classes:
        return prep.labels(out) if prep is not None else class_indices(out)
    return out


def _known_models(client: Client, name: str) -> str:
    try:
        names = sorted({m["name"] for m in client.models()})
    except AiaasError:  # not an aiaas-lab server (MLServer, Triton): no /v1/models to list
        return ""
    if not names:
        return "The server has no models yet."
    return (close_matches(name, names) + f" Models there: {', '.join(names[:20])}.").strip()
