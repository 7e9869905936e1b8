"""`_export`: a user's nn.Module as allow-listed graph JSON plus safetensors, rebuilt without
pickle; the allow-list refuses anything but plain aten tensor operations."""

from __future__ import annotations

import json

import cloudpickle
import pytest
import torch
from torch import nn

from aiaas_lab._errors import AiaasError, BadArgument
from aiaas_lab.engine.export import check_graph, export_module, load_exported, load_pickled


class ConvNet(nn.Module):
    """Batch norm and dropout (mode-dependent), a non-persistent buffer, a shape computation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.Linear(4 * 8 * 8, 16), nn.GELU(), nn.Linear(16, 10))
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], 1, 8, 8) * self.scale
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(self.drop(x.flatten(1)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on tensor values: torch.export cannot capture it
            return self.a(x)
        return self.b(x)


@pytest.fixture(scope="module")
def exported() -> tuple[ConvNet, bytes, bytes]:
    torch.manual_seed(0)
    module = ConvNet()
    graph, weights = export_module(module, torch.randn(3, 64))
    return module, graph, weights


def test_rebuilt_module_matches_in_both_modes_and_keeps_state_dict_keys(exported: tuple[ConvNet, bytes, bytes]) -> None:
    module, graph, weights = exported
    rebuilt = load_exported(graph, weights)
    assert sorted(rebuilt.state_dict()) == sorted(module.state_dict())  # no "scale": not persistent
    x = torch.randn(7, 64)  # another batch size than the example
    module.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), module(x))
    module.train(), rebuilt.train()
    torch.manual_seed(1)
    expected = module(x)
    torch.manual_seed(1)
    torch.testing.assert_close(rebuilt(x), expected)  # same dropout mask, batch statistics


def test_rebuilt_module_trains_and_its_weights_load_back_into_the_original(exported: tuple[ConvNet, bytes, bytes]) -> None:
    module, graph, weights = exported
    rebuilt = load_exported(graph, weights)
    rebuilt.train()
    optimizer = torch.optim.Adam(rebuilt.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(rebuilt(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5
    assert rebuilt.bn.num_batches_tracked.item() == 40  # buffer updates happen in train mode
    local = ConvNet()
    local.load_state_dict(rebuilt.state_dict())
    local.eval(), rebuilt.eval()
    torch.testing.assert_close(local(X), rebuilt(X))


def test_export_failure_says_why(exported: tuple[ConvNet, bytes, bytes]) -> None:
    with pytest.raises(AiaasError, match="torch.export could not capture Branchy.*Python branch"):
        export_module(Branchy(), torch.randn(4, 4))
    with pytest.raises(BadArgument, match="MODEL"):
        export_module("mlp", torch.randn(4, 4))  # type: ignore[arg-type]


class Uninitialised(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.empty_like(x)  # aten.empty_like: not on the server's allow-list


def test_export_refuses_a_graph_the_server_would_refuse() -> None:
    with pytest.raises(AiaasError, match="cannot be sent to the server.*empty_like"):
        export_module(Uninitialised(), torch.randn(4, 4))
    with pytest.raises(BadArgument, match="at least one row"):
        export_module(ConvNet(), torch.randn(0, 64))


def _tampered(graph: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    document = json.loads(graph)
    edit(document)
    return json.dumps(document).encode()


def _set_first_target(target: str):  # type: ignore[no-untyped-def]
    def edit(document: dict) -> None:  # type: ignore[type-arg]
        document["graphs"]["train"]["nodes"][0]["target"] = target
    return edit


@pytest.mark.parametrize("target", ["builtins.eval", "os.system", "aten.from_file.default", "aten.empty.memory_format",
                                    "torch.ops.aten.linear.default", "aten.linear.no_such_overload", "aten.linear.__class__",
                                    "higher_order.cond", "_operator.setitem", "aten..default"])
def test_allow_list_rejects_targets_that_are_not_plain_aten_ops(exported: tuple[ConvNet, bytes, bytes], target: str) -> None:
    _, graph, weights = exported
    bad = _tampered(graph, _set_first_target(target))
    with pytest.raises(BadArgument, match="allow-listed aten operators"):
        check_graph(bad)
    with pytest.raises(BadArgument):
        load_exported(bad, weights)


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(format="torch"), "format"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d["graphs"].pop("eval"), "train and eval"),
    (lambda d: d["graphs"]["train"]["nodes"][0].update(args=[{"node": "undefined"}]), "earlier nodes"),
    (lambda d: d["graphs"]["train"]["nodes"][0].update(args=[{"object": "os.system"}]), "tagged"),
    (lambda d: d["graphs"]["train"]["nodes"][0].update(args=[{"dtype": "__class__"}]), "dtype"),
    (lambda d: d["graphs"]["train"]["inputs"].append({"name": "z", "kind": "custom_obj"}), "inputs of kind"),
    (lambda d: d["graphs"]["train"]["outputs"].append({"kind": "gradient"}), "outputs of kind"),
    (lambda d: d["graphs"]["eval"].update(nodes="all"), "inputs, nodes and outputs"),
])
def test_malformed_graph_documents_are_rejected(exported: tuple[ConvNet, bytes, bytes], edit, words: str) -> None:  # type: ignore[no-untyped-def]
    _, graph, _ = exported
    with pytest.raises(BadArgument, match=words):
        check_graph(_tampered(graph, edit))
    with pytest.raises(BadArgument, match="invalid JSON"):
        check_graph(b"{not json")


def test_weights_must_be_safetensors_with_every_tensor_the_graph_needs(exported: tuple[ConvNet, bytes, bytes]) -> None:
    _, graph, weights = exported
    with pytest.raises(BadArgument, match="safetensors"):
        load_exported(graph, b"\x80\x04pickle bytes")
    from safetensors.torch import load, save

    partial = {k: v for k, v in load(weights).items() if k != "conv.weight"}
    with pytest.raises(BadArgument, match="conv.weight"):
        load_exported(graph, save(partial))


def test_load_pickled_accepts_only_modules() -> None:
    module = load_pickled(cloudpickle.dumps(Branchy()))
    assert isinstance(module, Branchy)
    with pytest.raises(BadArgument, match="nn.Module"):
        load_pickled(cloudpickle.dumps({"not": "a module"}))
    with pytest.raises(BadArgument, match="failed to load"):
        load_pickled(b"garbage")
