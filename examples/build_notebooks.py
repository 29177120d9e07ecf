"""Build the executed notebooks ``examples/*.ipynb`` from the percent-format scripts ``examples/*.py``.

The scripts are the source (reviewable diffs); ``python examples/build_notebooks.py`` converts each with jupytext and
executes it with nbclient in a fresh kernel, keeping outputs and figures. Settings come from the environment
(``LMC_EPOCHS``, ``LMC_SUBSET``, ... : the variables in ``SETTINGS``, recorded in each notebook's metadata).
``tests/test_examples.py`` checks that every notebook holds exactly its script's cells, and runs each on tiny settings.

    python examples/build_notebooks.py [NAME ...]     # needs the dev extra: pip install -e '.[dev]'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("LMC_EPOCHS", "LMC_SUBSET", "LMC_POINTS", "LMC_MODELS", "LMC_SEEDS", "LMC_PAIRS", "LMC_DEEP_PAIRS",
            "LMC_RECIPES", "LMC_TEST", "LMC_BN_BATCHES")


def scripts() -> list[Path]:
    """The notebook scripts (``NN_name.py``) in ``examples/``."""
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py"))


def to_notebook(script: Path):
    """The script as an (unexecuted) notebook."""
    import jupytext

    nb = jupytext.read(script, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb, cwd: Path, timeout: int = 1800, script: Path | None = None):
    """Run every cell of ``nb`` in a fresh kernel started in ``cwd`` (outputs stored in ``nb``).

    ``script``: the source script; ``__file__`` is set to it first (scripts may locate files from it).
    """
    import nbformat
    from nbclient import NotebookClient

    if script is not None:
        nb.cells.insert(0, nbformat.v4.new_code_cell(f"__file__ = {str(Path(script).resolve())!r}"))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    if script is not None:
        nb.cells.pop(0)
    return nb


def cell_sources(nb) -> list[tuple[str, str]]:
    """``(cell type, source)`` of every cell: what must match between a script and its notebook."""
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def build(script: Path) -> Path:
    """Convert, execute in ``examples/``, and write ``script``'s ``.ipynb`` beside it."""
    import nbformat

    nb = execute(to_notebook(script), HERE.parent, script=script)
    nb.metadata["lmc_settings"] = {k: os.environ.get(k, "default") for k in SETTINGS}
    target = script.with_suffix(".ipynb")
    nbformat.write(nb, target)
    return target


if __name__ == "__main__":
    chosen = [HERE / f"{n.removesuffix('.py')}.py" for n in sys.argv[1:]] or scripts()
    for path in chosen:
        print(f"built {build(path)}")
