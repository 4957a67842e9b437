"""Every notebook runs top to bottom through the real kernel (nbclient, a
fresh kernel per notebook): no error output, and every cell tagged `chart`
shows an SVG or PNG chart."""
import glob
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from run_notebooks import check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_seven_notebooks():
    assert len(NOTEBOOKS) == 7, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_clean(path, deepscope_kernelspec):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    client = NotebookClient(nb, timeout=900, kernel_name="deepscope", allow_errors=True,
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()
    problems = check(nb)
    assert not problems, "\n".join(problems)
    charts = sum(1 for c in nb.cells if "chart" in c.get("metadata", {}).get("tags", []))
    assert charts >= 1 or "06-" in path, f"{path}: no cell is tagged `chart`"
