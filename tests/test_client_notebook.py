"""notebooks/03-remote-backend.ipynb runs top to bottom in a real kernel against the server it
starts itself, and no output of it ever shows the token it made."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03-remote-backend.ipynb"

pytestmark = pytest.mark.slow


def test_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def test_remote_tutorial_executes_without_showing_the_token(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tutorial_cells = len(nb.cells)
    # Only in this test's copy: print the token, to look for it in every other output.
    nb.cells.append(nbformat.v4.new_code_cell("print('TOKEN=' + token)"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    token = nb.cells[-1].outputs[0]["text"].strip().removeprefix("TOKEN=")
    assert len(token) >= 24
    outputs = [o for cell in nb.cells[:tutorial_cells] if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert token not in json.dumps(outputs) and token not in json.dumps(nb.metadata)
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    for expected in ("Connected to http://127.0.0.1:", "model sent as the built-in 'mlp'",
                     "model sent as a torch.export graph", "('completed', True, 'my-net')",
                     "succeeded", "('completed', 'digits-linear', 20)", "predicted [", "digits-linear  1",
                     "Client('http://127.0.0.1:", "token=<set>)"):
        assert expected in text, expected
    assert "is a custom module" not in text  # attach rebuilt the built-in
