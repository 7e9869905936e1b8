"""Checkpoints as one safetensors file: weights, optimizer state and run state, written atomically.

safetensors holds only tensors and a str->str metadata map, so nothing in a checkpoint can run
code when it is loaded; the run state (epoch, step, history, preprocessing) travels as JSON in
the metadata.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint", "read_state", "check_resumable", "state_dict_to_safetensors",
           "save_trained_model"]

CHECKPOINT_FILE = "checkpoint.safetensors"


def state_dict_to_safetensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; tensors that share storage (tied weights) are copied apart,
    since safetensors refuses shared storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(key)
        out[prefix + name] = t
    return out


def save_checkpoint(directory: str | os.PathLike[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`extra` tensors (the random generator's state, the best weights so far) come back from
    `load_checkpoint` in its state's "tensors"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_to_safetensors(model.state_dict(), "model.")
    tensors.update(state_dict_to_safetensors(extra or {}, "extra."))
    optim_meta: dict[str, Any] = {}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in opt_state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        optim_meta = {"param_groups": opt_state["param_groups"], "scalars": scalars}
    metadata = {"aiaas.state": json.dumps(state), "aiaas.optimizer": json.dumps(optim_meta)}
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    return path


def load_checkpoint(directory: str | os.PathLike[str], model: nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; return the run state saved with them."""
    from safetensors import safe_open

    path = Path(directory) / CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    optim_meta = json.loads(metadata.get("aiaas.optimizer", "{}"))
    if optimizer is not None and optim_meta:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for index, values in optim_meta.get("scalars", {}).items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": optim_meta["param_groups"]})
    saved = json.loads(metadata.get("aiaas.state", "{}"))
    saved["tensors"] = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return saved


def read_state(directory: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The run state of the checkpoint in `directory` (no tensors read), or None without one."""
    if not directory:
        return None
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {}).get("aiaas.state", "{}"))
        state["shapes"] = {k.removeprefix("model."): list(f.get_slice(k).get_shape()) for k in f.keys()
                           if k.startswith("model.")}
    return state


def check_resumable(directory: str | os.PathLike[str], model: nn.Module, preprocessing: dict[str, Any] | None) -> None:
    """Refuse, in one clear sentence, to resume a checkpoint into another model or onto data
    encoded another way (other columns, categories or labels): it would train on nonsense, or
    fail deep inside with a size mismatch."""
    from .._errors import BadArgument

    state = read_state(directory)
    if state is None:
        return
    where = str(Path(directory) / CHECKPOINT_FILE)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    if state["shapes"] != expected:
        differing = sorted(k for k in set(state["shapes"]) | set(expected) if state["shapes"].get(k) != expected.get(k))
        raise BadArgument("--resume", f"a checkpoint of this model ({where})",
                          f"one whose weights differ in {', '.join(differing[:4])}",
                          "Resume with the model and data the checkpoint was trained on, or use another --checkpoint DIR.")
    saved = state.get("preprocessing") or {}
    for key in ("classes", "columns", "categories"):
        if preprocessing is not None and key in saved and (saved.get(key) or None) != (preprocessing.get(key) or None):
            raise BadArgument("--resume", f"data encoded as the checkpoint's was (the same {key})",
                              f"data with other {key}", "Resume on the data the run started with.")


def save_trained_model(path: str | os.PathLike[str], weights: dict[str, torch.Tensor], info: dict[str, Any],
                       extra_metadata: dict[str, str] | None = None) -> None:
    """Trained weights with their "aiaas.model" metadata, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state_dict_to_safetensors(weights), str(tmp),
              metadata={"aiaas.model": json.dumps(info), **(extra_metadata or {})})
    os.replace(tmp, path)  # a reader never sees half a file
