"""The example notebooks: each .ipynb holds exactly its percent-format script's cells, and runs on tiny settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
_spec = importlib.util.spec_from_file_location("build_notebooks", EXAMPLES / "build_notebooks.py")
build_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_notebooks)
SCRIPTS = build_notebooks.scripts()


# Scripts whose executed notebook is shipped (a script added later gets one with build_notebooks.py NAME).
EXECUTED = ("01_endpoints_and_barrier", "02_align_repair_curve", "03_mmc_finetune", "03_rebasin_renorm",
            "03_zoo_barrier_matrix", "04_curves_and_surfaces", "05_distribution_connectors")


def test_every_script_has_its_executed_notebook_in_sync() -> None:
    nbformat = pytest.importorskip("nbformat")
    assert set(EXECUTED) <= {s.stem for s in SCRIPTS}
    for script in SCRIPTS:
        notebook = script.with_suffix(".ipynb")
        if script.stem not in EXECUTED and not notebook.exists():
            continue
        assert notebook.exists(), f"{notebook.name} missing: run python examples/build_notebooks.py {script.stem}"
        nb = nbformat.read(notebook, as_version=4)
        assert build_notebooks.cell_sources(nb) == build_notebooks.cell_sources(build_notebooks.to_notebook(script)), (
            f"{notebook.name} is out of sync with {script.name}: run python examples/build_notebooks.py {script.stem}")
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{notebook.name} is not executed"
        assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    for stem in set(EXECUTED) - {"03_zoo_barrier_matrix"}:  # the zoo notebook prints its matrix as a table
        cells = nbformat.read(EXAMPLES / f"{stem}.ipynb", as_version=4).cells
        figures = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if "image/png" in o.get("data", {})]
        assert figures, f"{stem}.ipynb shows no figure"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_notebook_executes_on_tiny_settings(script: Path, tmp_path: Path, monkeypatch, fmnist_dir) -> None:
    pytest.importorskip("nbclient")
    monkeypatch.setenv("LMC_EPOCHS", "1")
    monkeypatch.setenv("LMC_SUBSET", "512")
    monkeypatch.setenv("LMC_POINTS", "3")
    monkeypatch.setenv("LMC_MODELS", "2")
    monkeypatch.setenv("LMC_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = build_notebooks.execute(build_notebooks.to_notebook(script), tmp_path, timeout=300, script=script)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    assert any((tmp_path / "out").rglob("*")), f"{script.name} wrote nothing to LMC_OUT"
