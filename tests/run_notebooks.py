"""Executes DeepScope's notebooks through the real `deepscope` kernel with nbclient.

    python tests/run_notebooks.py [--write] [--timeout S] notebooks/*.ipynb

Each notebook gets a fresh kernel. A notebook fails when any cell has an error
output or when a cell tagged as a chart (its source shows a figure) produced no
chart: `image/svg+xml`, `image/png`, or `text/html` holding an `<svg` or an
embedded PNG image (how large heatmaps show inside a bundle).
With --write, the executed notebooks (outputs included) replace the files:
this is `make notebooks`. Prints one line per notebook with its time.
"""
import argparse
import sys
import time

import nbformat
from nbclient import NotebookClient


def has_chart(output) -> bool:
    data = output.get("data", {})
    if "image/svg+xml" in data or "image/png" in data:
        return True
    html = str(data.get("text/html", ""))
    return "<svg" in html or "<img" in html and "data:image/png;base64," in html


def check(nb) -> list:
    """Problems found in an executed notebook: error outputs, charts missing."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        for o in outputs:
            if o.get("output_type") == "error":
                problems.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
        wants_chart = "chart" in cell.get("metadata", {}).get("tags", [])
        if wants_chart and not any(has_chart(o) for o in outputs):
            problems.append(f"cell {i}: tagged `chart` but produced no SVG/PNG chart")
    return problems


def run(path: str, timeout: int, write: bool) -> list:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="deepscope", allow_errors=True,
                            resources={"metadata": {"path": "notebooks"}})
    start = time.time()
    client.execute()
    took = time.time() - start
    problems = check(nb)
    print(f"{path}: {len(nb.cells)} cells in {took:.1f} s, {len(problems)} problem(s)", flush=True)
    for p in problems:
        print(f"  {p}", flush=True)
    if write:
        nbformat.write(nb, path)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell (the first one may build)")
    args = ap.parse_args()
    failed = 0
    for path in args.notebooks:
        failed += bool(run(path, args.timeout, args.write))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
