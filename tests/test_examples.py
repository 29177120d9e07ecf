"""Every notebook-style example in examples/ runs end to end on tiny settings."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path, monkeypatch, fmnist_dir) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMC_EPOCHS", "1")
    monkeypatch.setenv("LMC_SUBSET", "512")
    monkeypatch.setenv("LMC_OUT", str(tmp_path / "out"))
    runpy.run_path(str(script), run_name="__main__")
    assert any((tmp_path / "out").rglob("*")), f"{script.name} wrote nothing to LMC_OUT"
