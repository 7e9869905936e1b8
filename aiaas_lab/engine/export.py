"""A user's nn.Module as data: a torch.export graph in JSON plus safetensors weights.

This is how a model architecture travels to the server without the server running code chosen
by the client. `export_module` (client side) traces the module with torch.export, once in train
mode and once in eval mode since dropout and batch norm are baked into the graph, and writes
every node as JSON. `load_exported` (server side) rebuilds an `nn.Module` from that JSON: every
node's target must be on an allow-list of aten operators, arguments are plain JSON values, and
nothing is unpickled or evaluated. torch's own loaders (`torch.export.load`, torch's serde
deserializer) are not used on uploads: they call `torch.load` and `sympy.sympify` (which uses
`eval`) on what the file says.

`load_pickled` is the third way, by value with cloudpickle; the server only calls it when its
operator started it with `--allow-code`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import fx, nn

from .._errors import AiaasError, BadArgument, describe
from .export_limits import MAX_JSON_DEPTH, check_constant_sizes, check_forward, guarded_python_op, nested_deeper_than

__all__ = ["export_module", "load_exported", "check_graph", "load_pickled", "FORMAT"]

FORMAT = "aiaas-export"
_VERSION = 1

# aten operator packets (any overload) a graph may call. Pure tensor maths only: nothing that
# touches files (from_file), returns uninitialised memory (empty*: it could show another
# request's data) or calls back into Python.
_ATEN = frozenset("""
    linear matmul mm bmm addmm baddbmm addmv mv dot outer einsum t transpose permute
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution
    batch_norm _native_batch_norm_legit_functional _native_batch_norm_legit_no_training
    native_batch_norm layer_norm native_layer_norm group_norm native_group_norm instance_norm
    rms_norm embedding dropout native_dropout feature_dropout alpha_dropout feature_alpha_dropout
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices
    avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
    _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    upsample_nearest1d upsample_nearest2d upsample_bilinear2d upsample_linear1d pixel_shuffle
    pad constant_pad_nd reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d
    scaled_dot_product_attention lstm gru rnn_tanh rnn_relu
    relu relu_ relu6 leaky_relu leaky_relu_ gelu silu silu_ sigmoid tanh hardtanh hardtanh_
    hardswish hardsigmoid elu selu celu softplus softshrink hardshrink mish prelu glu logsigmoid
    softmax log_softmax _softmax _log_softmax
    add add_ sub sub_ rsub mul mul_ div div_ neg pow sqrt rsqrt exp exp2 expm1 log log2 log10
    log1p abs clamp clamp_ clamp_min clamp_max clip minimum maximum where sign reciprocal square
    floor ceil round trunc frac remainder fmod erf sin cos tan asin acos atan atan2 sinh cosh
    lerp addcmul addcdiv logsumexp cumsum cumprod
    view reshape _unsafe_view flatten unflatten squeeze unsqueeze expand expand_as repeat
    contiguous clone cat concat stack split split_with_sizes chunk unbind narrow select slice
    index index_select gather masked_fill masked_fill_ roll flip tril triu diagonal movedim
    sum mean var std var_mean std_mean max min amax amin argmax argmin prod norm
    linalg_vector_norm topk sort argsort
    eq ne lt le gt ge logical_and logical_or logical_not logical_xor isnan isfinite
    zeros zeros_like ones ones_like full full_like arange scalar_tensor new_zeros new_ones
    new_full fill fill_ zero_ copy_ rand rand_like randn randn_like bernoulli
    to _to_copy type_as detach alias lift_fresh_copy sym_size sym_numel sym_stride
    _assert_scalar _assert_tensor_metadata sym_constrain_range_for_size
""".split())

# Python operators on sizes (a graph computes `x.shape[0] * 8` this way), stored as "_operator.X";
# rebuilt as bounded versions (export_limits), since `n * n` squared often enough is a memory bomb.
_PYTHON_OPS: dict[str, Any] = {
    name: guarded_python_op(name)
    for name in "getitem add sub mul floordiv truediv mod neg eq ne lt le gt ge".split()
}

_INPUT_KINDS = ("parameter", "buffer", "constant", "user_input")


# ---------------------------------------------------------------- export (client side)

def export_module(module: nn.Module, example_input: torch.Tensor) -> tuple[bytes, bytes]:
    """The module as (graph JSON bytes, safetensors weights bytes).

    `example_input` is a batch of real inputs; its first dimension is exported as dynamic, so
    the rebuilt module accepts any batch size. Raises `AiaasError` saying why when torch.export
    cannot capture the module (for instance a Python branch on tensor values).
    """
    from safetensors.torch import save

    from .checkpoint import state_dict_to_safetensors

    if not isinstance(module, nn.Module):
        raise BadArgument("MODEL", "a torch.nn.Module", describe(module))
    if not isinstance(example_input, torch.Tensor) or example_input.ndim == 0:
        raise BadArgument("example_input", "a batch of inputs as a tensor", describe(example_input))
    x = example_input.detach().cpu()
    if x.shape[0] == 0:
        raise BadArgument("example_input", "at least one row", "an empty batch")
    if x.shape[0] == 1:  # torch.export specialises a dimension of size 1, so show it two rows
        x = torch.cat([x, x])
    module_device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    graphs: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    try:
        for mode in ("train", "eval"):
            module.train(mode == "train")
            program = _export(module, x.to(module_device))
            graphs[mode] = _graph_to_json(program)
            tensors.update(program.state_dict)
            tensors.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    finally:
        module.train(was_training)
    document = {"format": FORMAT, "version": _VERSION, "graphs": graphs}
    graph_json = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    try:  # the server's own check, here: a graph it would refuse is an export failure, said early
        check_graph(graph_json)
    except BadArgument as exc:
        raise AiaasError(f"MODEL: the exported graph cannot be sent to the server: {exc}") from None
    return graph_json, save(state_dict_to_safetensors(tensors))


def _export(module: nn.Module, x: torch.Tensor) -> Any:
    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AiaasError(
            f"MODEL: torch.export could not capture {type(module).__name__} as a graph "
            f"({type(exc).__name__}: {first_line}). Export needs forward() to run the same "
            "operations whatever the input values are (no Python branch on a tensor's values) "
            "and to accept any batch size.") from None


def _graph_to_json(program: Any) -> dict[str, Any]:
    from torch.export.graph_signature import InputKind, OutputKind

    kinds = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
             InputKind.CONSTANT_TENSOR: "constant", InputKind.USER_INPUT: "user_input"}
    inputs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind not in kinds:
            raise AiaasError(f"MODEL: the exported graph takes a {spec.kind.name.lower()} input, "
                             "which cannot be sent to the server; only tensors are supported.")
        entry = {"name": spec.arg.name, "kind": kinds[spec.kind], "target": spec.target}
        if spec.kind == InputKind.BUFFER and not spec.persistent:
            entry["kind"] = "constant"  # kept out of state_dict, exactly like a constant
        inputs.append(entry)
    outputs = []
    values = program.graph.output_node().args[0]
    for spec, value in zip(program.graph_signature.output_specs, values, strict=True):
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append({"kind": "user_output", "value": _encode(value)})
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            outputs.append({"kind": "buffer_mutation", "target": spec.target, "value": _encode(value)})
        else:
            raise AiaasError(f"MODEL: the exported graph has a {spec.kind.name.lower()} output, "
                             "which the server cannot rebuild.")
    nodes = []
    for node in program.graph.nodes:
        if node.op == "call_function":
            nodes.append({"name": node.name, "target": _target_name(node.target),
                          "args": _encode(node.args), "kwargs": _encode(node.kwargs)})
        elif node.op not in ("placeholder", "output"):
            raise AiaasError(f"MODEL: the exported graph has a {node.op} node ({node.target}); only "
                             "plain tensor operations can be sent to the server.")
    return {"inputs": inputs, "nodes": nodes, "outputs": outputs}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        return f"{namespace}.{target._opname}.{target._overloadname}"
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"_operator.{target.__name__}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise AiaasError(f"MODEL: the exported graph has an argument of type {type(value).__name__} "
                     "that cannot be sent to the server.")


# ---------------------------------------------------------------- load (server side)

def check_graph(graph_json: bytes) -> dict[str, Any]:
    """Parse the graph JSON and check it completely (structure, every target against the
    allow-list); return the parsed document. Raises `BadArgument` naming the first problem."""
    try:
        document = json.loads(graph_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadArgument("model.export.graph", "the JSON written by export_module", f"invalid JSON ({exc})") from None
    except RecursionError:
        document = None  # nested deeper than the parser goes: refused just below
    if document is None or nested_deeper_than(document, MAX_JSON_DEPTH):
        raise BadArgument("model.export.graph", f"JSON nested at most {MAX_JSON_DEPTH} levels deep",
                          "deeper nesting")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BadArgument("model.export.graph", f"a document with \"format\": \"{FORMAT}\"",
                          describe(document) if not isinstance(document, dict)
                          else f"format {document.get('format')!r}")
    if document.get("version") != _VERSION:
        raise BadArgument("model.export.graph", f"version {_VERSION}", repr(document.get("version")))
    graphs = document.get("graphs")
    if not isinstance(graphs, dict) or set(graphs) != {"train", "eval"}:
        raise BadArgument("model.export.graph", "graphs for the train and eval modes", repr(graphs)[:80])
    for mode, graph in graphs.items():
        _check_one(graph, f"model.export.graph ({mode} mode)")
    return document


def _check_one(graph: Any, where: str) -> None:
    if not isinstance(graph, dict) or not all(isinstance(graph.get(k), list) for k in ("inputs", "nodes", "outputs")):
        raise BadArgument(where, "an object with inputs, nodes and outputs lists", describe(graph))
    names: set[str] = set()
    users = 0
    for spec in graph["inputs"]:
        if (not isinstance(spec, dict) or spec.get("kind") not in _INPUT_KINDS
                or not isinstance(spec.get("name"), str)
                or (spec["kind"] != "user_input" and not isinstance(spec.get("target"), str))):
            raise BadArgument(where, f"inputs of kind {', '.join(_INPUT_KINDS)} with a name",
                              repr(spec)[:120])
        users += spec["kind"] == "user_input"
        names.add(spec["name"])
    if users != 1:
        raise BadArgument(where, "a graph with exactly one user input", f"{users}")
    for node in graph["nodes"]:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise BadArgument(where, "nodes with a name", repr(node)[:120])
        _resolve_target(node.get("target"), where)
        check_constant_sizes(node, node["target"].split(".")[1] if node["target"].startswith("aten.") else "")
        _check_value(node.get("args", []), names, where)
        _check_value(node.get("kwargs", {}), names, where)
        if node["name"] in names:
            raise BadArgument(where, "unique node names", f"{node['name']!r} twice")
        names.add(node["name"])
    for out in graph["outputs"]:
        if not isinstance(out, dict) or out.get("kind") not in ("user_output", "buffer_mutation"):
            raise BadArgument(where, "outputs of kind user_output or buffer_mutation", repr(out)[:120])
        if out["kind"] == "buffer_mutation" and not isinstance(out.get("target"), str):
            raise BadArgument(where, "a buffer name for each buffer mutation", repr(out)[:120])
        _check_value(out.get("value"), names, where)


def _resolve_target(name: Any, where: str) -> Any:
    if isinstance(name, str):
        if name in (f"_operator.{op}" for op in _PYTHON_OPS):
            return _PYTHON_OPS[name.split(".", 1)[1]]
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "aten" and parts[1] in _ATEN:
            packet = getattr(torch.ops.aten, parts[1], None)
            overload = getattr(packet, parts[2], None) if packet is not None and parts[2].isidentifier() else None
            if isinstance(overload, torch._ops.OpOverload):
                return overload
    raise BadArgument(where, "only allow-listed aten operators as node targets", f"{str(name)[:80]!r}",
                      "Graphs may call plain tensor operations; anything else needs a server started "
                      "with --allow-code.")


_TAGGED = {"node", "float", "dict", "dtype", "device", "layout", "memory_format"}


def _check_value(value: Any, names: set[str], where: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for v in value:
            _check_value(v, names, where)
        return
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _TAGGED:
        tag, inner = next(iter(value.items()))
        if tag == "node":
            if inner not in names:
                raise BadArgument(where, "arguments that refer to earlier nodes", f"{str(inner)[:40]!r}")
        elif tag == "dict" and isinstance(inner, dict):
            for v in inner.values():
                _check_value(v, names, where)
        else:
            _decode_tag(tag, inner, where)
        return
    raise BadArgument(where, "JSON values, node references and tagged dtypes as arguments", repr(value)[:80])


def _decode_tag(tag: str, inner: Any, where: str) -> Any:
    if tag == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    kinds = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
    if tag in kinds and isinstance(inner, str) and inner.isidentifier():
        found = getattr(torch, inner, None)
        if isinstance(found, kinds[tag]):
            return found
    if tag == "device" and inner in ("cpu", "cuda", "mps", "meta"):
        return torch.device("cpu")  # the server runs the graph wherever its tensors live
    raise BadArgument(where, f"a known {tag}", repr(inner)[:40])


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if isinstance(value, dict):
        tag, inner = next(iter(value.items()))
        if tag == "node":
            return env[inner]
        if tag == "dict":
            return {k: _decode(v, env) for k, v in inner.items()}
        return _decode_tag(tag, inner, "")
    return value


def _build_graph(graph: dict[str, Any]) -> tuple[fx.GraphModule, list[dict[str, Any]]]:
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in graph["inputs"]:
        env[spec["name"]] = g.placeholder(spec["name"])
    for node in graph["nodes"]:
        args = tuple(_decode(node.get("args", []), env))
        kwargs = _decode(node.get("kwargs", {}), env)
        env[node["name"]] = g.call_function(_resolve_target(node["target"], ""), args, kwargs)
    g.output(tuple(_decode(out["value"], env) for out in graph["outputs"]))
    return fx.GraphModule(nn.Module(), g), graph["outputs"]


class ExportedModule(nn.Module):
    """An exported graph per mode over one set of parameters; `train()`/`eval()` pick the graph."""

    def __init__(self, graphs: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._graphs: dict[str, tuple[fx.GraphModule, list[str | None], list[dict[str, Any]]]] = {}
        self._within_bounds: set[tuple[Any, ...]] = set()  # (mode, shape, dtype) checked by check_forward
        for mode, graph in graphs.items():
            gm, outputs = _build_graph(graph)
            targets: list[str | None] = []
            for spec in graph["inputs"]:
                if spec["kind"] == "user_input":
                    targets.append(None)
                    continue
                target = spec["target"]
                if _lookup(self, target) is None:
                    if target not in tensors:
                        raise BadArgument("model.export.weights", f"a tensor named {target!r}", "none")
                    self._attach(target, tensors[target], spec["kind"])
                targets.append(target)
            self._graphs[mode] = (gm, targets, outputs)

    def _attach(self, target: str, tensor: torch.Tensor, kind: str) -> None:
        owner: nn.Module = self
        *path, leaf = target.split(".")
        for part in path:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if kind == "parameter":
            owner.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=tensor.is_floating_point()))
        else:
            # Constants and non-persistent buffers stay out of state_dict, as in the user's module.
            owner.register_buffer(leaf, tensor.clone(), persistent=kind == "buffer")

    def forward(self, x: torch.Tensor) -> Any:
        mode = "train" if self.training else "eval"
        gm, targets, outputs = self._graphs[mode]
        args = [x if t is None else _lookup(self, t) for t in targets]
        key = (mode, tuple(x.shape), x.dtype)
        if key not in self._within_bounds:  # sizes follow from the input's shape: checked once per shape
            check_forward(gm, args, tuple(x.shape))
            if len(self._within_bounds) >= 256:
                self._within_bounds.clear()
            self._within_bounds.add(key)
        results = gm(*args)
        user = []
        for spec, value in zip(outputs, results, strict=True):
            if spec["kind"] == "buffer_mutation":
                with torch.no_grad():
                    _lookup(self, spec["target"]).copy_(value)
            else:
                user.append(value)
        return user[0] if len(user) == 1 else tuple(user)


def _lookup(module: nn.Module, target: str) -> torch.Tensor | None:
    *path, leaf = target.split(".")
    for part in path:
        module = module._modules.get(part)  # type: ignore[assignment]
        if module is None:
            return None
    found = module._parameters.get(leaf)
    return found if found is not None else module._buffers.get(leaf)


def load_exported(graph_json: bytes, weights: bytes) -> nn.Module:
    """Rebuild the module `export_module` described, without unpickling or evaluating anything."""
    from safetensors.torch import load

    document = check_graph(graph_json)
    try:
        tensors = load(weights)
    except Exception as exc:
        raise BadArgument("model.export.weights", "a safetensors file", f"unreadable bytes ({exc})") from None
    return ExportedModule(document["graphs"], tensors)


def load_pickled(payload: bytes) -> nn.Module:
    """A module sent by value. This runs code chosen by the sender: only call it when the
    operator allowed that (`aiaas-lab serve --allow-code`)."""
    import cloudpickle

    try:
        module = cloudpickle.loads(payload)
    except Exception as exc:
        hint = ("The server has only aiaas-lab's own packages: send classes by value (define them in "
                "the notebook, or cloudpickle.register_pickle_by_value(their_module)).") \
            if isinstance(exc, ModuleNotFoundError) else ""
        raise BadArgument("model.pickle", "a cloudpickle payload of an nn.Module",
                          f"bytes that failed to load ({type(exc).__name__}: {exc})", hint) from None
    if not isinstance(module, nn.Module):
        raise BadArgument("model.pickle", "a cloudpickle payload of an nn.Module", describe(module))
    return module
