"""Memory bounds for exported graphs: a graph sent by a client must not make the server allocate
without limit.

An allow-listed graph can still ask for anything: `full([2**40], 0.)`, an `expand` that a later
op materialises, two broadcast operands whose sum is the square of their sizes, or sizes
squared again and again as Python ints (`mul` on `sym_size`). Three checks:

- `check_constant_sizes` (when a graph is uploaded): sizes written into the graph as numbers.
- `guarded_python_op`: arithmetic on sizes takes numbers only and stays below `MAX_SIZE_VALUE`.
- `check_forward` (before the first forward pass for each input shape): the whole graph runs
  on fake tensors (shapes and dtypes, no data), which gives every intermediate's size before
  any real memory is taken, the copies that composite ops (matmul, einsum, attention) make
  inside included: a dispatch mode counts each aten op they decompose into. The allow-list has no data-dependent shapes, so the input's shape
  decides them all and one check per shape holds for every forward pass with that shape.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from .._errors import AiaasError, BadArgument

__all__ = ["MAX_ELEMENTS", "MAX_TOTAL_ELEMENTS", "MAX_SIZE_VALUE", "MAX_JSON_DEPTH", "check_constant_sizes",
           "check_forward", "guarded_python_op", "nested_deeper_than"]

MAX_ELEMENTS = 2**26  # elements in any one tensor a graph makes (256 MiB of float32)
MAX_TOTAL_ELEMENTS = 2**28  # elements in all the tensors one forward pass makes, views counted once
MAX_SIZE_VALUE = 2**62  # any int a graph computes from sizes
MAX_JSON_DEPTH = 32  # a graph document nests ~6 levels; checking and rebuilding it recurse

_HINT = ("A graph may make tensors of at most MAX_ELEMENTS = 2**26 elements each, and 2**28 in all "
         "in one forward pass (aiaas_lab.engine.export_limits); a smaller batch size may fit.")


def _too_big(what: str, count: int) -> BadArgument:
    return BadArgument("model.export.graph", "a graph within this server's memory bounds",
                       f"{what} making {count:,} elements", _HINT)


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether parsed JSON nests lists and objects more than `limit` levels (found without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


# ---------------------------------------------------------------- sizes written into the graph

# op -> (index of its size argument, or "arange"); the size is a list of ints, or nodes
_SIZED = {"full": 0, "zeros": 0, "ones": 0, "empty": 0, "rand": 0, "randn": 0,
          "new_zeros": 1, "new_ones": 1, "new_full": 1, "new_empty": 1, "expand": 1, "repeat": 1}


def check_constant_sizes(node: dict[str, Any], packet: str) -> None:
    """Refuse a node whose size arguments are numbers that already exceed MAX_ELEMENTS (sizes
    computed from the input are checked by `check_forward`)."""
    args = node.get("args", [])
    if not isinstance(args, list):
        return
    name = node.get("name", "?")
    if packet == "arange":
        numbers = [a for a in args[:3] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if len(numbers) == len(args[:3]) and numbers:
            start, end, step = (0, numbers[0], 1) if len(numbers) == 1 else (*numbers[:2], numbers[2] if len(numbers) > 2 else 1)
            if step and math.isfinite(start) and math.isfinite(end) and math.isfinite(step):
                count = max(0, math.ceil((end - start) / step))
                if count > MAX_ELEMENTS:
                    raise _too_big(f"node {str(name)[:40]!r} (aten.arange)", count)
        return
    index = _SIZED.get(packet)
    if index is None or len(args) <= index or not isinstance(args[index], list):
        return
    sizes = [v for v in args[index] if isinstance(v, int) and not isinstance(v, bool)]
    if sizes and math.prod(max(v, 1) for v in sizes) > MAX_ELEMENTS:
        raise _too_big(f"node {str(name)[:40]!r} (aten.{packet})", math.prod(max(v, 1) for v in sizes))


# ---------------------------------------------------------------- arithmetic on sizes

def guarded_python_op(name: str) -> Callable[..., Any]:
    """operator.`name` for sizes: numbers in, a bounded number out. `[x] * n` or n squared a
    hundred times would otherwise take memory before any tensor exists."""
    fn = getattr(operator, name)
    if name == "getitem":
        return fn  # indexes what an earlier node returned; makes nothing

    def op(*args: Any) -> Any:
        for value in args:
            if not isinstance(value, (int, float, bool)):
                raise AiaasError(f"model.export.graph: operator.{name} expects numbers (sizes), but got "
                                 f"a {type(value).__name__}.")
            if isinstance(value, int) and abs(value) > MAX_SIZE_VALUE:
                raise AiaasError(f"model.export.graph: operator.{name} on a size above 2**62.")
        if name == "mul" and all(isinstance(v, int) for v in args) and \
                sum(abs(v).bit_length() for v in args) > MAX_SIZE_VALUE.bit_length() + 1:
            raise AiaasError(f"model.export.graph: operator.{name} would compute a size above 2**62.")
        result = fn(*args)
        if isinstance(result, int) and abs(result) > MAX_SIZE_VALUE:
            raise AiaasError(f"model.export.graph: operator.{name} computed a size above 2**62.")
        return result

    # Not named like the operator: fx would print `_operator.mul` inline as `a * b`, unguarded.
    op.__name__ = op.__qualname__ = f"bounded_{name}"
    return op


# ---------------------------------------------------------------- every intermediate, on fake tensors

class _Counter(TorchDispatchMode):
    """Sees every aten op the graph's nodes run, after composite ops are decomposed: a node's
    output alone would miss what `matmul` with broadcast batch dimensions, `einsum` or
    `scaled_dot_product_attention` allocate inside (expanded operands copied for a `bmm`)."""

    def __init__(self) -> None:
        super().__init__()
        self.node = "?"  # the graph node running, for the message
        self.storages: set[Any] = set()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.multiprocessing.reductions import StorageWeakRef

        result = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(result):
            if not isinstance(value, torch.Tensor):
                continue
            count = value.numel()
            if count > MAX_ELEMENTS:
                raise _too_big(f"node {self.node} ({func}), a tensor of shape {list(value.shape)},", count)
            storage = value.untyped_storage()
            key = StorageWeakRef(storage)
            if key not in self.storages:  # views share their base's storage: counted once
                self.storages.add(key)
                self.total += storage.nbytes() // max(value.element_size(), 1)
                if self.total > MAX_TOTAL_ELEMENTS:
                    raise _too_big(f"the forward pass, by node {self.node},", self.total)
        return result


class _Sizer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: _Counter) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the error says which node; fx would append its own dump
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        self.counter.node = repr(n.name)
        return super().run_node(n)


def check_forward(gm: fx.GraphModule, args: list[torch.Tensor], input_shape: tuple[int, ...]) -> None:
    """Run `gm` on fake copies of `args`; raise AiaasError if any tensor it makes is over the
    bounds, or if its sizes cannot be worked out without running it for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    _quiet_fake_tensor_log()
    with torch.inference_mode(False), torch.no_grad():
        # No fallback kernels: for an op without a meta kernel, fake mode would run the real one.
        mode = FakeTensorMode(allow_fallback_kernels=False)
        try:
            fake = [mode.from_tensor(a) for a in args]
            counter = _Counter()
            with mode, counter:  # the counter above fake mode: it sees each op, fake mode runs it
                _Sizer(gm, counter).run(*fake)
        except AiaasError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise AiaasError(f"model.export.graph: the graph fails on input of shape {list(input_shape)} "
                             f"({type(exc).__name__}{': ' + first if first else ''}).") from None


def _quiet_fake_tensor_log() -> None:
    """Fake mode logs a traceback for every op that fails on its shapes: for a client's graph
    that is a 400 (or a failed job), not something for the server's log."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    if not any(isinstance(f, _DropMetaFailures) for f in logger.filters):
        logger.addFilter(_DropMetaFailures())


class _DropMetaFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta")
