"""``notebooks/quickstart.ipynb`` is stored without outputs and executes end to end (fast setting)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_saved_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cell"
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_executes_in_the_fast_setting(tmp_path, monkeypatch):
    # The kernel inherits this environment: a tiny budget, one thread (the cores are shared).
    monkeypatch.setenv("TSD_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except Exception as err:  # nbclient's CellExecutionError carries the failing cell and its traceback
        pytest.fail(f"the notebook failed:\n{err}")
    outputs = tmp_path / "quickstart_output"
    for name in ("teacher.pt", "results.md", "substitution_report.md", "substitution_report.png"):
        assert (outputs / name).is_file(), name
    assert "| KD+TSD (NarrowFCN) |" in (outputs / "results.md").read_text()
    assert list(outputs.glob("saliency_*.png"))
