"""The one description of a training job, and its one validation.

`Hyperparameters` is a msgspec schema (measured here, side by side on a busy 2-core machine:
msgspec and a Struct 18-46 ms to import, pydantic 2 and a model 78-171 ms; torch is 800 ms): `aiaas_lab.train()`, the `%aiaas train` magic, JOB.json for
`aiaas_lab.worker` and `POST /v1/jobs` all go through `parse_hyperparameters`, so the same bad
value gets the same one-paragraph message everywhere (the server answers it as a 400).

`JobRequest` is the wire form of a job: references to a model and to data (a built-in name, or a
blob that the carrier resolves: a sha256 on the server, a file path in JOB.json). In the kernel
the model and data are live objects; `Job` carries them beside the same hyperparameters.

Nothing here imports torch: `import aiaas_lab` stays cheap.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from .._errors import BadArgument, close_matches

__all__ = ["Hyperparameters", "JobRequest", "Job", "parse_hyperparameters", "parse_request", "OPTIMIZERS",
           "LOSSES", "DEVICES", "DEFAULT_LR", "MAX_WORKERS", "LOCAL_ONLY", "NAME_PATTERN", "option_name", "seeded",
           "replace", "check_name"]

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_MOMENTUM = 0.9  # sgd only; what most recipes use, and what this tool always used
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 0.01}  # AdamW's own default
OPTIMIZERS = tuple(DEFAULT_LR)
LOSSES = ("auto", "cross_entropy", "mse")
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_WORKERS = 16  # processes one job may start on one machine
_MAX_INT = 2**31 - 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a model name, safe in a URL path

Count = Annotated[int, msgspec.Meta(ge=1, le=_MAX_INT)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class Hyperparameters(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every option of a training run. `None` means "the documented default", which `resolved()`
    fills in; what a run records is always the resolved value."""

    epochs: Count = 10
    batch_size: Count = 64
    lr: Positive | None = None  # sgd 0.01, adam/adamw 0.001
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: Annotated[float, msgspec.Meta(ge=0, lt=1)] | None = None  # sgd only: 0.9
    loss: Literal["auto", "cross_entropy", "mse"] = "auto"
    weight_decay: Annotated[float, msgspec.Meta(ge=0)] | None = None  # 0, or 0.01 for adamw
    grad_accum: Count = 1
    clip: Positive | None = None
    patience: Count | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT)] | None = None  # None: drawn, then recorded
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    normalize: bool = False
    workers: Annotated[int, msgspec.Meta(ge=1, le=MAX_WORKERS)] = 1
    shard: bool = False
    threads: Count | None = None
    checkpoint: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    resume: bool = False
    log_every: Count | None = None  # optimizer steps per progress event; None: about 50 an epoch

    def resolved(self) -> Hyperparameters:
        """The values a run actually uses: defaults filled in, a seed drawn when none was given."""
        return msgspec.structs.replace(
            self,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.optimizer],
            momentum=(self.momentum if self.momentum is not None else DEFAULT_MOMENTUM)
            if self.optimizer == "sgd" else None,
            weight_decay=self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer],
            seed=self.seed if self.seed is not None else draw_seed(),
        )

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


def draw_seed() -> int:
    return random.SystemRandom().randrange(_MAX_INT)


def replace(h: Hyperparameters, **changes: Any) -> Hyperparameters:
    return msgspec.structs.replace(h, **changes)


def seeded(h: Hyperparameters, saved: int | None = None) -> Hyperparameters:
    """`h` with its seed fixed once, where a run starts: the one given, else the one a checkpoint
    being resumed was trained with (`saved`), else a new one. Every rank, every launcher and a
    resumed run then shuffle and split alike, and the seed is recorded."""
    if h.seed is not None:
        return h
    return replace(h, seed=saved if saved is not None else draw_seed())


def check_name(name: Any) -> None:
    if name is not None and not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise BadArgument("--name", "a model name of letters, digits, '.', '_' and '-' (at most 100)", _found(name))


# Options that only mean something where the loop runs in this kernel: a server decides these.
LOCAL_ONLY = {"checkpoint": "the server keeps its own checkpoints", "resume": "the server resumes its own jobs",
              "threads": "the server decides its threads", "device": "the server picks its device"}

_EXPECTED = {
    "epochs": "a positive whole number (at most 2**31 - 1)", "batch_size": "a positive whole number (at most 2**31 - 1)",
    "grad_accum": "a positive whole number (at most 2**31 - 1)",
    "patience": "a positive whole number (at most 2**31 - 1) or none",
    "threads": "a positive whole number (at most 2**31 - 1) or none", "lr": "a positive number",
    "clip": "a positive number or none", "momentum": "a number from 0 up to (not including) 1",
    "weight_decay": "a number >= 0", "seed": "a whole number from 0 to 2**31 - 1",
    "workers": f"a whole number from 1 to {MAX_WORKERS}", "normalize": "true or false", "shard": "true or false",
    "resume": "true or false", "checkpoint": "a directory path (not empty)",
    "log_every": "a positive whole number (at most 2**31 - 1) or none", "optimizer": "one of " + ", ".join(OPTIMIZERS),
    "loss": "one of " + ", ".join(LOSSES), "device": "one of " + ", ".join(DEVICES),
}
_CHOICES = {"optimizer": OPTIMIZERS, "loss": LOSSES, "device": DEVICES}
_INTS = ("epochs", "batch_size", "grad_accum", "patience", "seed", "workers", "threads", "log_every")


def option_name(field: str) -> str:
    """The option as users type it: `batch_size` is `--batch-size`, in every error message."""
    return "--" + field.replace("_", "-")


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_hyperparameters(raw: Any) -> Hyperparameters:
    """Check every option; raise `BadArgument` naming the first bad one."""
    if isinstance(raw, Hyperparameters):
        raw = raw.to_dict()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadArgument("hyperparameters", "an object of options", _found(raw))
    fields = Hyperparameters.__struct_fields__
    unknown = sorted(k for k in raw if k not in fields)
    if unknown:
        raise BadArgument(option_name(str(unknown[0])), "a known option (" + ", ".join(map(option_name, fields)) + ")",
                          "an unknown one", close_matches(option_name(str(unknown[0])), map(option_name, fields)))
    values = dict(raw)
    for name in _INTS:  # 5.0 from JSON or a float computed in a notebook is the whole number 5
        value = values.get(name)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            values[name] = int(value)
    for name, value in values.items():
        # msgspec accepts inf for "> 0"; a non-finite option is always a mistake.
        if isinstance(value, float) and not math.isfinite(value):
            raise BadArgument(option_name(name), _EXPECTED[name], _found(value))
    try:
        return msgspec.convert(values, Hyperparameters, strict=True)
    except msgspec.ValidationError as exc:
        match = re.search(r"\$\.(\w+)", str(exc))
        field = match.group(1) if match else ""
        if field not in _EXPECTED:
            raise BadArgument("hyperparameters", "valid options", str(exc)) from None
        hint = close_matches(str(values[field]), _CHOICES[field]) if field in _CHOICES else ""
        raise BadArgument(option_name(field), _EXPECTED[field], _found(values[field]), hint) from None


def check_combination(h: Hyperparameters, *, has_val: bool, remote: bool = False) -> None:
    """Rules that involve more than one option, the same on every launcher."""
    if h.patience is not None and not has_val:
        raise BadArgument("--patience", "validation data to watch (--val DATA or a fraction)", "no --val")
    if h.resume and not h.checkpoint:
        raise BadArgument("--resume", "a --checkpoint DIR to resume from", "no --checkpoint")
    if h.shard and h.workers < 2:
        raise BadArgument("--shard", "--workers 2 or more to shard the model across", f"--workers {h.workers}",
                          "Add --workers N.")
    if h.shard and h.checkpoint:
        raise BadArgument("--checkpoint", "no --checkpoint with --shard (sharded checkpoints are not supported)",
                          f"--checkpoint {h.checkpoint}")
    if h.momentum is not None and h.optimizer != "sgd":
        raise BadArgument("--momentum", "--optimizer sgd (adam and adamw keep their own moment estimates)",
                          f"--optimizer {h.optimizer}")
    if remote:
        defaults = Hyperparameters()
        for name, why in LOCAL_ONLY.items():
            value = getattr(h, name)
            if value != getattr(defaults, name):
                raise BadArgument(option_name(name), f"no {option_name(name)} with --backend ({why})", _found(value))


class JobRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A job on the wire (POST /v1/jobs) and in JOB.json. `model` is {"builtin": NAME[, "config":
    {...}]}, {"export": {"graph": REF, "weights": REF}} or {"pickle": REF}; `data` is {"builtin":
    NAME} or {"tensors": REF}; `val` null, a fraction, or like `data`. The carrier checks REFs."""

    model: dict[str, Any]
    data: dict[str, Any]
    val: float | dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = {}
    name: str | None = None
    preprocessing: dict[str, Any] | None = None  # the client's view of the raw inputs (see inputs.py)


_MAX_LABELS = 100_000


def _check_preprocessing(raw: Any) -> dict[str, Any] | None:
    """The names a client learned of its raw inputs: class labels, DataFrame columns and their
    categories. Bounded, plain JSON; the server stores them with the model."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"classes", "columns", "categories"}:
        raise BadArgument("preprocessing", "an object with classes, columns and categories", _found(raw))

    def names(value: Any, where: str) -> list[Any] | None:
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) <= _MAX_LABELS and all(
                isinstance(v, (str, int)) and not isinstance(v, bool) and len(str(v)) <= 200 for v in value)):
            raise BadArgument(where, f"a list of at most {_MAX_LABELS} short strings or numbers", _found(value))
        return value

    categories = raw.get("categories") or {}
    if not isinstance(categories, dict) or len(categories) > 10_000:
        raise BadArgument("preprocessing.categories", "an object of column -> categories", _found(categories))
    return {"classes": names(raw.get("classes"), "preprocessing.classes"),
            "columns": names(raw.get("columns"), "preprocessing.columns"),
            "categories": {str(k): names(v, f"preprocessing.categories.{k}") or [] for k, v in categories.items()}}


def parse_request(raw: Any) -> tuple[JobRequest, Hyperparameters]:
    """The request's shape and its hyperparameters, checked; the references are the carrier's."""
    if not isinstance(raw, dict):
        raise BadArgument("the request body", "a JSON object", f"a JSON {type(raw).__name__}")
    for key in ("model", "data"):
        if key not in raw:
            raise BadArgument("the request body", f"a {key!r} field", "none")
    unknown = sorted(set(raw) - set(JobRequest.__struct_fields__))
    if unknown:
        raise BadArgument("the request body", "the fields " + ", ".join(JobRequest.__struct_fields__),
                          f"an unknown field {unknown[0]!r}")
    shapes = {"model": '{"builtin": NAME}, {"export": {"graph": SHA, "weights": SHA}} or {"pickle": SHA}',
              "data": '{"builtin": NAME} or {"tensors": SHA}'}
    for key in ("model", "data"):
        if not isinstance(raw[key], dict) or not raw[key]:
            raise BadArgument(key, shapes[key], _found(raw[key]))
    val = raw.get("val")
    if isinstance(val, bool) or not (val is None or isinstance(val, (int, float, dict))):
        raise BadArgument("--val", 'null, a fraction or {"tensors": SHA}', _found(val))
    if isinstance(val, (int, float)) and not (math.isfinite(val) and 0 < val < 1):
        raise BadArgument("--val", "a fraction between 0 and 1 (or validation data)", _found(val))
    name = raw.get("name")
    check_name(name)
    hyperparameters = parse_hyperparameters(raw.get("hyperparameters"))
    request = JobRequest(model=raw["model"], data=raw["data"], val=float(val) if isinstance(val, (int, float)) else val,
                         hyperparameters=hyperparameters.to_dict(), name=name,
                         preprocessing=_check_preprocessing(raw.get("preprocessing")))
    return request, hyperparameters


@dataclass(frozen=True)
class Job:
    """A job in this process: live objects (an nn.Module, tensors, a DataFrame) or references,
    with checked hyperparameters. Every launcher takes one of these."""

    model: Any
    data: Any
    hyperparameters: Hyperparameters
    val: Any = None
    target: str | None = None
    name: str | None = None
