"""The quickstart notebook runs end to end, and the answer after `kb.update` shows the new value.

Executed with nbclient on the venv's own "python3" kernel (ipykernel). It uses the adapter shipped in
kblam, or the folder in $KBLAM_ADAPTER (the kernel inherits the environment).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
UPDATED_VALUE = "Marie Curie"  # what the notebook's kb.update sets


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs_and_follows_the_update():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert all(c.get("execution_count") for c in code)
    again = [c for c in code if "ask-again" in c.metadata.get("tags", [])]
    assert len(again) == 1
    answer_lines = [line for line in _text(again[0].outputs).splitlines() if line.startswith("answer:")]
    assert answer_lines and UPDATED_VALUE in answer_lines[0], answer_lines
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)  # the heat map
