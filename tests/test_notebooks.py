"""The notebooks in notebooks/: stored without outputs, and they execute (nbclient, the python3
kernel of this environment) - clip_fractions.ipynb on the tiny sweep of tests/sweep_fixture.py."""

from __future__ import annotations


import nbformat
from nbclient import NotebookClient

from tests.sweep_fixture import REPO, tiny_sweep  # noqa: F401

NOTEBOOKS = REPO / "notebooks"


def execute(name: str, timeout: int = 180) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # kernel "python3": jupyter_client starts it with this interpreter (sys.executable)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [data.get("text/markdown", ""), data.get("text/plain", "")]
    return "\n".join(parts)


def test_notebooks_are_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["clip_fractions.ipynb", "seed_walkthrough.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before saving"


def test_seed_walkthrough_executes():
    text = outputs_text(execute("seed_walkthrough.ipynb"))
    assert "ERRATUM" in text and "corrected" in text and "MISMATCH" not in text
    assert "10 steps checked" in text


def test_clip_fractions_executes_on_a_sweep(tiny_sweep, monkeypatch):
    monkeypatch.setenv("RLOPT_SWEEP_DIR", str(tiny_sweep))
    nb = execute("clip_fractions.ipynb")
    text = outputs_text(nb)
    assert f"sweep: {tiny_sweep}" in text
    assert "**grpo** (2 runs)" in text and "**gspo** (2 runs)" in text and "2 failed" in text
    pngs = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert pngs == 2  # clip fractions over steps; clip fraction against reward
