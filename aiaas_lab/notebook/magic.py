"""`%aiaas` / `%%aiaas`: a thin router over the Python API.

The magic splits the line, evaluates MODEL and DATA in the user's namespace (falling back to the
built-in models and data sets), and calls `aiaas_lab.train` / `aiaas_lab.predict`. Every user
mistake surfaces as an IPython `UsageError`: one paragraph, no traceback.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Enum, Unicode

from .._api import predict, train
from ..engine.datasets import BUILTIN_DATASETS
from .parsing import Parser as _Parser, group as _group, split_arguments
from ..engine.loop import DEVICES, LOSSES, OPTIMIZERS
from .._errors import AiaasError, close_matches
from ..engine.models import BUILTIN_MODELS

__all__ = ["AiaasMagics", "split_arguments"]


def _number(text: str) -> Any:
    """An option's number as typed; anything else is passed on as it is, so that the job schema
    names the option and what it expected, in the same words as aiaas_lab.train()."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# The options the job schema checks; given ones are passed on, the rest keep train()'s defaults.
_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "loss", "weight_decay", "grad_accum", "clip",
            "patience", "seed", "device", "threads", "workers", "log_every", "checkpoint")


def _train_parser() -> _Parser:
    p = _Parser(prog="%aiaas train", add_help=False,
                description="Train MODEL on DATA and return a TrainResult. MODEL and DATA are Python "
                f"expressions, or built-ins: models {', '.join(BUILTIN_MODELS)}; data {', '.join(BUILTIN_DATASETS)}.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA", help="(X, y), a DataFrame (with --target), a Dataset, a DataLoader or a built-in")
    p.add_argument("--val", metavar="DATA|FRACTION", help="validation data, or a fraction to hold out (stratified for classes)")
    p.add_argument("--target", metavar="COLUMN", help="target column of a DataFrame")
    p.add_argument("--epochs", type=_number, help="epochs to train (default 10)")
    p.add_argument("--batch-size", type=_number, help="samples per batch (default 64)")
    p.add_argument("--lr", type=_number, help="learning rate (default: sgd 0.01, adam/adamw 0.001)")
    p.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default adam)")
    p.add_argument("--momentum", type=_number, help="sgd's momentum (default 0.9)")
    p.add_argument("--loss", help=f"one of {', '.join(LOSSES)} (default auto)")
    p.add_argument("--weight-decay", type=_number, help="weight decay (default 0, or 0.01 for adamw)")
    p.add_argument("--grad-accum", type=_number, metavar="K", help="accumulate gradients over K batches per step")
    p.add_argument("--clip", type=_number, help="clip the gradient norm to this value")
    p.add_argument("--patience", type=_number, help="stop early after N epochs without val_loss improvement")
    p.add_argument("--normalize", action="store_true", help="standardise features with training-split statistics")
    p.add_argument("--seed", type=_number)
    p.add_argument("--device", help=f"one of {', '.join(DEVICES)} (default auto)")
    p.add_argument("--log-every", type=_number, metavar="N", help="optimizer steps per progress event (default: ~50 an epoch)")
    p.add_argument("--threads", type=_number, help="torch threads while training (default: torch's)")
    p.add_argument("--checkpoint", metavar="DIR", help="save a safetensors checkpoint each epoch")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint DIR")
    p.add_argument("--workers", type=_number, help="data-parallel processes (torch.distributed)")
    p.add_argument("--shard", action="store_true", help="shard the model across workers (FSDP)")
    p.add_argument("--background", action="store_true", help="return a handle at once; training continues")
    p.add_argument("--backend", metavar="URL", help="train on a remote aiaas-lab server")
    p.add_argument("--name", help="model name to register on the server")
    p.add_argument("--no-widget", action="store_true", help="text progress instead of the widget")
    p.add_argument("-o", dest="output", metavar="NAME", help="also store the result in this variable")
    return p


def _predict_parser() -> _Parser:
    p = _Parser(prog="%aiaas predict", add_help=False,
                description="Run MODEL (an nn.Module, a TrainResult or a server model's name) on DATA.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="X")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--classes", action="store_true", help="return class indices instead of scores")
    p.add_argument("--backend", metavar="URL", help="predict on a remote V2 inference server")
    p.add_argument("--no-widget", action="store_true", help="no rich view of the predictions")
    p.add_argument("-o", dest="output", metavar="NAME", help="also store the result in this variable")
    return p


_HELP = """%aiaas train MODEL --data DATA [options]   train, with live progress
%aiaas predict MODEL --data X [--classes]   run a model
%aiaas connect URL [--token T]              use a remote aiaas-lab server for later commands
%aiaas jobs | attach JOB_ID | cancel JOB_ID | models   remote jobs and models

%aiaas train --help and %aiaas predict --help list the options."""


@magics_class
class AiaasMagics(Magics):
    display = Enum(["auto", "widget", "html", "text"], default_value="auto", config=True,
                   help="How training progress is shown: auto-detect, the live widget, static HTML, or text.")
    backend = Unicode(None, allow_none=True, config=True,
                      help="Default server URL for --backend (set by %aiaas connect).")

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self._trained: dict[str, Any] = {}  # built-in name -> the module last trained under it

    @line_cell_magic
    def aiaas(self, line: str, cell: str | None = None) -> Any:
        text = line if cell is None else f"{line} {' '.join(cell.split())}"
        tokens = split_arguments(text)
        if not tokens or tokens[0] in ("-h", "--help", "help"):
            print(_HELP)
            return None
        command, args = tokens[0], tokens[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            commands = [n[5:] for n in dir(self) if n.startswith("_cmd_")]
            raise UsageError(f"%aiaas: unknown command {command!r}; expected one of {', '.join(commands)}. "
                             + close_matches(command, commands))
        try:
            return handler(args)
        except AiaasError as exc:
            raise UsageError(str(exc)) from None

    # -- resolving names --------------------------------------------------------------------

    def _evaluate(self, expr: str, argument: str, builtins_: tuple[str, ...] = ()) -> Any:
        namespace = self.shell.user_ns if self.shell is not None else {}
        try:
            return eval(compile(expr, f"<{argument}>", "eval"), namespace)  # noqa: S307 - the user's own code
        except NameError as exc:
            if expr in builtins_:
                return expr
            missing = getattr(exc, "name", None) or expr
            names = [n for n in namespace if not n.startswith("_")] + list(builtins_)
            hint = close_matches(missing, names)
            if builtins_:
                hint = (hint + " " if hint else "") + f"Built-ins: {', '.join(builtins_)}."
            raise UsageError(f"{argument}: expected a defined name or expression, but {missing!r} is not defined. {hint}".strip()) from None
        except SyntaxError as exc:
            raise UsageError(f"{argument}: expected a Python expression, but found {expr!r} ({exc.msg}).") from None
        except Exception as exc:
            raise UsageError(f"{argument}: evaluating {expr!r} raised {type(exc).__name__}: {exc}") from None

    def _parse(self, parser: _Parser, args: list[str]) -> argparse.Namespace | None:
        if "-h" in args or "--help" in args:
            print(parser.format_help())
            return None
        return parser.parse_args(_group(args, parser))

    def _progress(self, no_widget: bool) -> str:
        return "text" if no_widget else self.display

    def _store(self, name: str | None, value: Any) -> None:
        if name:
            if not name.isidentifier():
                raise UsageError(f"-o: expected a variable name, but found {name!r}.")
            self.shell.user_ns[name] = value

    # -- commands ---------------------------------------------------------------------------

    def _cmd_train(self, args: list[str]) -> Any:
        opts = self._parse(_train_parser(), args)
        if opts is None:
            return None
        model = self._evaluate(opts.model, "MODEL", BUILTIN_MODELS)
        data = self._evaluate(opts.data, "--data", BUILTIN_DATASETS)
        val: Any = None
        if opts.val is not None:
            try:
                val = float(ast.literal_eval(opts.val))
            except (ValueError, SyntaxError, TypeError):
                val = self._evaluate(opts.val, "--val")
        options = {name: getattr(opts, name) for name in _OPTIONS if getattr(opts, name) is not None}
        result = train(
            model, data, val=val, target=opts.target, normalize=opts.normalize, resume=opts.resume,
            shard=opts.shard, background=opts.background, backend=opts.backend or self.backend, name=opts.name,
            progress=self._progress(opts.no_widget), **options)
        if isinstance(model, str) and getattr(result, "model", None) is not None:
            # The last built-in trained by name answers to that name in `%aiaas predict mlp`, while
            # `%aiaas train mlp` always starts from a fresh one. Nothing is written into the
            # user's namespace behind their back.
            self._trained[model] = result.model
        self._store(opts.output, result)
        return result

    def _cmd_predict(self, args: list[str]) -> Any:
        opts = self._parse(_predict_parser(), args)
        if opts is None:
            return None
        backend = opts.backend or self.backend
        try:
            model = self._evaluate(opts.model, "MODEL", tuple(self._trained))
        except UsageError:
            if backend is None or not opts.model.replace("-", "_").replace(".", "_").isidentifier():
                raise
            model = opts.model  # a model name on the server
        if isinstance(model, str) and model in self._trained:
            model = self._trained[model]
        data = self._evaluate(opts.data, "--data", BUILTIN_DATASETS)
        out = predict(model, data, batch_size=opts.batch_size, classes=opts.classes, backend=backend)
        self._store(opts.output, out)
        if not opts.no_widget and self.display != "text":
            from .reporters import show_predictions

            show_predictions(data, out, classes=opts.classes, mode=self.display)
        return out

    # -- the remote backend: connect, jobs, attach, cancel, models -------------------------

    def _remote(self, command: str, args: list[str]) -> Any:
        from .remote_magic import run_remote_command

        return run_remote_command(self, command, args)

    def _cmd_connect(self, args: list[str]) -> Any:
        return self._remote("connect", args)

    def _cmd_jobs(self, args: list[str]) -> Any:
        return self._remote("jobs", args)

    def _cmd_attach(self, args: list[str]) -> Any:
        return self._remote("attach", args)

    def _cmd_cancel(self, args: list[str]) -> Any:
        return self._remote("cancel", args)

    def _cmd_models(self, args: list[str]) -> Any:
        return self._remote("models", args)
