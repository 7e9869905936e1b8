"""The walls of the architecture, as the README's layout describes them: what may import what, no
import cycles (function-level imports count), modules of a readable size, and the import costs
users rely on (`import aiaas_lab` imports no torch; a script's local train imports no notebook
or HTTP library)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aiaas_lab"


def test_import_linter_contracts_hold():
    done = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    modules = sorted(m for m in graph.modules if m.startswith("aiaas_lab"))
    edges = {m: sorted(x for x in graph.find_modules_directly_imported_by(m) if x.startswith("aiaas_lab")
                       and not m.startswith(x + ".")) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return out


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("aiaas_lab", include_external_packages=False)
    assert _cycles(graph) == []


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def _imported_after(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in done.stdout.split()}


def test_import_aiaas_lab_imports_no_torch():
    assert "torch" not in _imported_after("import aiaas_lab")


def test_a_local_train_in_a_script_imports_no_notebook_or_http_library():
    loaded = _imported_after(
        "import torch, aiaas_lab\n"
        "X = torch.randn(64, 4); y = (X[:, 0] > 0).long()\n"
        "r = aiaas_lab.train('mlp', (X, y), epochs=1, progress='auto')\n"
        "assert r.status == 'completed'\n"
        "aiaas_lab.predict(r, X[:2], classes=True)")
    assert loaded.isdisjoint({"IPython", "ipywidgets", "anywidget", "httpx", "starlette", "uvicorn"}), loaded
